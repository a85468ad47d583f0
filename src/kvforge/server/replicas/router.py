"""The request router of the engine deployment (Ray Serve's request-router API): prefix-affine
ranking (`routing.choose`) over the replicas' requests in flight. It runs in the front's process,
inside the handle, so the table is the front's: one front, one table."""

from __future__ import annotations

import logging

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kvforge.server.replicas.routing import AffinityTable, choose

log = logging.getLogger(__name__)


def route_of_request(pending: PendingRequest | None) -> list[int]:
    """The route the front computed (`EngineReplica.run`'s `route` argument); [] for other calls."""
    return list(pending.kwargs.get("route") or []) if pending is not None else []


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, **kwargs: object) -> None:
        self.table = AffinityTable()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:  # fmt: skip
        if not candidate_replicas:
            return []
        by_tag = {r.replica_id.unique_id: r for r in candidate_replicas}
        queued = await self.requests_in_flight(candidate_replicas)
        ranks = choose(self.table, route_of_request(pending_request), queued)
        return [[by_tag[tag] for tag in rank] for rank in ranks]

    async def requests_in_flight(self, replicas: list[RunningReplica]) -> dict[str, int]:
        """Each replica's requests in flight: what the router last heard, else asked now. A replica
        that does not answer counts as full, so it ranks last."""
        known: dict[str, int] = {}
        unknown = []
        for replica in replicas:
            queued = self.replica_queue_len_cache.get(replica.replica_id)
            if queued is None:
                unknown.append(replica)
            else:
                known[replica.replica_id.unique_id] = queued
        if unknown:
            for replica, queued in await self._probe_queue_lens(unknown, 0):
                known[replica.replica_id.unique_id] = replica.max_ongoing_requests if queued is None else queued
        return known

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: object) -> None:
        self.table.record(route_of_request(pending_request), replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.forget(replica_id.unique_id)
