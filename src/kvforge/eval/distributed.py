"""An eval sweep on Ray actors: `kvforge eval --workers N [--ray-address auto|HOST:PORT]`.

Each actor loads the model once and rebuilds the sample groups from the configuration (seeds,
task files), so a unit of work (`runner.Unit`: a group index, a setting, the KV settings to run)
is a few integers and names, and what comes back is rows: no tensor crosses processes. The
command's process hands units to idle actors, writes rows as units finish, and stays the only
writer of `rows.jsonl` (the lock, resume and progress bar are its own). An actor that dies is
restarted by Ray and takes work again once it answers; its unit is handed out again. The rows of
a unit come back together, after it ran whole, so a death loses at most that unit's work and
nothing is written twice.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch

from kvforge.cluster import cpu_share, join
from kvforge.eval.runner import EvalConfig, EvalRow, SweepStats, Unit, Workers, built, groups, run_unit
from kvforge.models import load_model

log = logging.getLogger(__name__)

MAX_RUNS = 3  # times a unit is handed out before its worker's deaths end the sweep
RESTART_SECONDS = 300.0  # how long a dead worker may take to come back (Ray restarts it: a model load)


class Worker:
    """One Ray actor: the model loaded once, the configuration's sample groups rebuilt."""

    def __init__(self, cfg: EvalConfig, threads: int, device: str | None) -> None:
        torch.set_num_threads(threads)
        self.loaded = load_model(cfg.model, cfg.dtype, device)
        self.cfg = cfg
        self.groups = list(groups(self.loaded, cfg))
        self.policies = built(cfg.combos())

    def run(self, unit: Unit) -> tuple[list[EvalRow], SweepStats]:
        stats = SweepStats()
        rows = list(run_unit(self.loaded, self.cfg, self.groups[unit.group], unit, self.policies, stats))
        return rows, stats

    def pid(self) -> int:
        return os.getpid()


def actors(ray: Any, cfg: EvalConfig, workers: Workers) -> list[Any]:
    """`workers.count` actors sharing the cluster's CPUs: each runs torch on its share."""
    threads, cpus = cpu_share(ray, workers.count)
    remote = ray.remote(num_cpus=cpus, max_restarts=MAX_RUNS)(Worker)
    return [remote.remote(cfg, threads, workers.device) for _ in range(workers.count)]


def run_units(cfg: EvalConfig, units: list[Unit], workers: Workers, stats: SweepStats) -> Iterator[EvalRow]:
    """The rows of `units`, unit by unit as the actors finish them (in no set order).

    An actor whose call fails (it died; Ray restarts it, and calls made while it restarts fail
    too) gets no unit until it answers a ping again; its unit goes back to the queue. An actor
    silent for RESTART_SECONDS is given up, and the sweep ends when none is left."""
    ray, _ = join(workers.address, "--workers")
    pool = actors(ray, cfg, workers)
    queue: deque[Unit] = deque(units)
    runs: dict[Unit, int] = {}
    running: dict[Any, tuple[Unit | None, int]] = {}  # result reference -> (unit, or None for a ping; actor index)
    idle = list(range(len(pool)))
    down: dict[int, float] = {}  # actor index -> when it first failed to answer
    try:
        while queue or running:
            while queue and idle:
                unit, actor = queue.popleft(), idle.pop()
                runs[unit] = runs.get(unit, 0) + 1
                running[pool[actor].run.remote(unit)] = (unit, actor)
            if not running:
                raise RuntimeError(f"every worker of the sweep was lost; {len(queue)} units were not run")
            (ready,), _ = ray.wait(list(running), num_returns=1)
            unit, actor = running.pop(ready)
            try:
                result = ray.get(ready)
            except ray.exceptions.RayActorError as err:
                if unit is not None:
                    if runs[unit] >= MAX_RUNS:
                        raise RuntimeError(f"a unit of the sweep lost its worker {runs[unit]} times; the last: {err}") from None
                    log.warning("a worker died running a unit (%s): it runs again", type(err).__name__)
                    queue.appendleft(unit)
                since = down.setdefault(actor, time.monotonic())
                if time.monotonic() - since < RESTART_SECONDS:
                    running[pool[actor].pid.remote()] = (None, actor)  # back to work once it answers
                else:
                    log.warning("a worker has not come back for %.0f s: the sweep goes on without it", RESTART_SECONDS)
                continue
            down.pop(actor, None)
            idle.append(actor)
            if unit is not None:
                rows, part = result
                merge(stats, part)
                yield from rows
    finally:
        for handle in pool:
            ray.kill(handle)


def merge(stats: SweepStats, part: SweepStats) -> None:
    """Add what a worker counted for one unit to the sweep's stats."""
    stats.prefills += part.prefills
    stats.prefill_seconds += part.prefill_seconds
    if stats.per_row_prefill_seconds is None:
        stats.per_row_prefill_seconds, stats.per_row_prefill_policy = part.per_row_prefill_seconds, part.per_row_prefill_policy
