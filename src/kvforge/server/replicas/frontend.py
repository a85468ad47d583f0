"""The front's backend: requests tokenized here, routed by their first blocks to an engine replica
through a Ray Serve handle, their events streamed back. A replica that dies mid-request ends its
requests with a 503 (streamed: an error event), never a hang."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray.actor import ActorHandle
from ray.exceptions import RayActorError, RayError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from kvforge.engine import Event
from kvforge.server.errors import APIError
from kvforge.server.metrics import GAUGES, Metric, combine, refused_metric, render
from kvforge.server.prepare import Prompt, Prompter
from kvforge.server.replicas.replica import Accepted, Refused
from kvforge.server.replicas.routing import route_of
from kvforge.server.schemas import KVFields

log = logging.getLogger(__name__)


def replica_lost(err: RayError) -> APIError:
    if isinstance(err, RayActorError):
        return APIError(503, "the replica serving this request stopped (Ray restarts it); send the request again", code="replica_failed")
    log.error("a replica failed a request", exc_info=err)
    return APIError(500, "generation failed inside a replica; the server's log has the details", code="internal_error")


@dataclass
class ReplicaTicket:
    id: str
    stream: DeploymentResponseGenerator

    async def events(self) -> AsyncIterator[Event]:
        finished = False
        try:
            async for event in self.stream:
                finished = event.finish_reason is not None
                yield event
        except RayError as err:
            raise replica_lost(err) from None
        finally:
            if not finished:
                self.cancel()

    def cancel(self) -> None:
        self.stream.cancel()  # the replica's request is cancelled in its engine; a finished one: a no-op


@dataclass
class ReplicaBackend:
    handle: DeploymentHandle  # the engine deployment's, routed by PrefixAffinityRouter
    prompter: Prompter
    board: ActorHandle  # MetricsBoard
    routing: int = 0  # requests handed to the handle and not yet accepted by a replica

    def chat(self, raw: bytes) -> tuple[KVFields, Prompt]:
        prompt = self.prompter.chat(raw)
        return prompt.body, prompt

    def completion(self, raw: bytes) -> tuple[KVFields, Prompt]:
        prompt = self.prompter.completion(raw)
        return prompt.body, prompt

    async def submit(self, prompt: Prompt) -> ReplicaTicket:
        stream = self.handle.options(stream=True, method_name="run").remote(prompt, route=route_of(prompt.ids))
        self.routing += 1
        try:
            first = await stream.__anext__()
        except RayError as err:
            raise replica_lost(err) from None
        finally:
            self.routing -= 1
        if isinstance(first, Refused):
            raise first.error()
        assert isinstance(first, Accepted), first
        return ReplicaTicket(first.id, stream)

    def queued(self) -> int:
        return self.routing

    async def replicas(self) -> dict[str, list[Metric]]:
        return await self.board.read.remote()

    async def health(self) -> dict:
        per_replica = await self.replicas()
        totals = {m.name: m.samples[()] for m in combine(per_replica) if m.name in GAUGES}
        return {"replicas": len(per_replica), **totals}

    async def metrics(self, refused: Counter[int]) -> str:
        per_replica = await self.replicas()
        count = Metric("replicas", "gauge", "engine replicas that reported in the last seconds", {(): len(per_replica)})
        return render([count, *combine(per_replica), refused_metric(refused)])
