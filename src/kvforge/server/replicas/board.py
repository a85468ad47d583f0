"""Where replicas leave their metrics for the front's /metrics (a Ray actor, one per server):
each replica puts its own every PUSH_SECONDS and when a request ends; a replica not heard from
for STALE_SECONDS is gone (dead, or replaced by Ray), and its samples leave the totals."""

from __future__ import annotations

import time

from kvforge.server.metrics import Metric

PUSH_SECONDS = 1.0
STALE_SECONDS = 10.0


class MetricsBoard:
    def __init__(self) -> None:
        self.latest: dict[str, tuple[float, list[Metric]]] = {}  # replica -> (when put, its metrics)

    def put(self, replica: str, metrics: list[Metric]) -> None:
        self.latest[replica] = (time.monotonic(), metrics)

    def read(self) -> dict[str, list[Metric]]:
        """The metrics of every replica heard from lately, by replica."""
        now = time.monotonic()
        self.latest = {r: got for r, got in self.latest.items() if now - got[0] <= STALE_SECONDS}
        return {r: metrics for r, (_, metrics) in sorted(self.latest.items())}
