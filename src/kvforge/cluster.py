"""Joining Ray, for the commands that run past one process (`eval --workers`, `serve --replicas`):
an existing cluster (`--ray-address auto|HOST:PORT`) or a local one started here, and how actors
share its cores. Ray is imported only when one of those flags is given."""

from __future__ import annotations

import os
from typing import Any

INSTALL = "pip install 'kvforge[distributed]'"


def require_ray(flag: str, serving: bool = False) -> Any:
    """Ray (and Ray Serve when `serving`), or a one-line error naming `flag` and the install."""
    try:
        import ray

        if serving:
            import ray.serve  # noqa: F401  (its own dependencies: grpcio, aiohttp, ...)
    except ImportError as err:
        what = "Ray Serve" if serving else "Ray"
        raise ValueError(f"{flag} runs on {what}, which is not installed ({err.name} is missing): {INSTALL}") from None
    return ray


def join(address: str | None, flag: str, serving: bool = False) -> tuple[Any, bool]:
    """(ray, whether this process started the cluster): joined to `address`, else a local
    cluster with as many CPUs as the machine and no dashboard."""
    ray = require_ray(flag, serving)
    if ray.is_initialized():
        return ray, False
    if address is None:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        return ray, True
    ray.init(address=address, log_to_driver=False)
    return ray, False


def cpu_share(ray: Any, count: int) -> tuple[int, float]:
    """(torch threads, Ray CPUs) of each of `count` actors sharing the cluster's CPUs: on two
    cores, two actors of one thread each; more actors than cores share them (fractional CPUs)."""
    cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    threads = max(1, cpus // count)
    return threads, min(float(threads), cpus / count)
