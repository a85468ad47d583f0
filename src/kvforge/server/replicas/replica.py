"""One engine replica: the body of the `kvforge-engine` Ray Serve deployment. It builds a whole
engine (model, KV memory, kept prefixes, the shared store) and runs the prompts the front sends,
streaming back first `Accepted` or `Refused`, then the engine's events."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch
from ray import serve
from ray.actor import ActorHandle

from kvforge.engine import Engine, Event
from kvforge.server.errors import APIError
from kvforge.server.limits import ServerLimits
from kvforge.server.metrics import collect
from kvforge.server.prepare import Preparer, Prompt, prompter_for
from kvforge.server.replicas.board import PUSH_SECONDS
from kvforge.server.state import EngineBackend

log = logging.getLogger(__name__)


@dataclass
class Accepted:
    """The engine took the request; `id` is unique across replicas."""

    id: str


@dataclass
class Refused:
    """An `APIError` as data (it crosses processes): the request never reached the engine."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    @classmethod
    def of(cls, err: APIError) -> Refused:
        return cls(err.status, err.message, err.param, err.code, err.headers)

    def error(self) -> APIError:
        return APIError(self.status, self.message, self.param, self.code, self.headers)


class EngineReplica:
    """`build` makes the engine (not started) in this process, from the `serve` flags; `threads`:
    torch's threads here (replicas on one machine share its cores)."""

    def __init__(self, build: Callable[[], Engine], default_ratio: float, threads: int, board: ActorHandle) -> None:
        torch.set_num_threads(threads)
        self.engine = build()
        self.tag = serve.get_replica_context().replica_id.unique_id
        prompter = prompter_for(self.engine, self.engine.loaded.name, ServerLimits())
        self.backend = EngineBackend(self.engine, Preparer(self.engine, prompter, default_ratio))
        self.board = board
        self.engine.start()
        self.stopping = threading.Event()
        threading.Thread(target=self.push_every, name="kvforge-metrics-push", daemon=True).start()
        log.info("replica %s: engine started (%d threads)", self.tag, threads)

    async def run(self, prompt: Prompt, route: list[int]) -> AsyncIterator[Accepted | Refused | Event]:
        """`prompt` through the engine. `route` is for the router only. Cancelled by the front (its
        client gone), the request is cancelled in the engine (the ticket's events end early)."""
        try:
            ticket = await self.backend.submit(self.backend.preparer.request(prompt))
        except APIError as err:
            yield Refused.of(err)
            return
        yield Accepted(f"{self.tag}-{ticket.id}")
        try:
            async for event in ticket.events():
                yield event
        finally:
            self.push()

    def push(self) -> None:
        self.board.put.remote(self.tag, collect(self.engine))

    def push_every(self) -> None:
        while not self.stopping.wait(PUSH_SECONDS):
            try:
                self.push()
            except Exception:  # the board is gone: the server is stopping
                log.info("replica %s: metrics not pushed", self.tag, exc_info=True)

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine thread ended is restarted."""
        if self.engine.thread is None or not self.engine.thread.is_alive():
            raise RuntimeError(f"replica {self.tag}: the engine thread is not running")

    def __del__(self) -> None:
        self.stopping.set()
        self.engine.stop()
