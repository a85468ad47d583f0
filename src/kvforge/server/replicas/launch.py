"""Starting `kvforge serve --replicas N`: Ray joined (or a local cluster started), the board, the
engine deployment with its router, then the front's HTTP server in this process; on the way out
the deployment is deleted (and a cluster started here stopped)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI

from kvforge.cluster import cpu_share, join
from kvforge.engine import Engine
from kvforge.models import TextSide
from kvforge.server.app import app_over
from kvforge.server.limits import ServerLimits
from kvforge.server.prepare import serving_prompter

log = logging.getLogger(__name__)

DEPLOYMENT = "kvforge-engine"
HEALTH_CHECK_SECONDS = 5.0
CONSTRUCTOR_TRIES = 3  # a replica that cannot build its engine this often fails the start (each try loads the model)


@dataclass(frozen=True)
class Replicas:
    count: int
    address: str | None  # --ray-address; None: a local cluster
    threads: int | None  # torch threads per replica; None: the cluster's CPUs shared out
    app_name: str  # the Ray Serve application, one per front (by port)


def deploy(replicas: Replicas, build: Callable[[], Engine], default_ratio: float, limits: ServerLimits) -> tuple[object, object, Callable[[], None]]:
    """(handle, board, stop): the engine deployment running on Ray, routed by prefix."""
    ray, started_here = join(replicas.address, "--replicas", serving=True)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's start-up lines; its warnings stay
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from kvforge.server.replicas.board import MetricsBoard
    from kvforge.server.replicas.replica import EngineReplica
    from kvforge.server.replicas.router import PrefixAffinityRouter

    threads, cpus = cpu_share(ray, replicas.count)
    if replicas.threads is not None:
        threads = cpus = replicas.threads
    board = ray.remote(num_cpus=0)(MetricsBoard).remote()
    deployment = serve.deployment(
        EngineReplica, name=DEPLOYMENT, num_replicas=replicas.count, ray_actor_options={"num_cpus": cpus},
        # the engine's own queue (--max-queued) answers 429 first; Ray holds back only beyond it
        max_ongoing_requests=2 * limits.max_queued + 1,
        request_router_config=RequestRouterConfig(request_router_class=PrefixAffinityRouter),
        health_check_period_s=HEALTH_CHECK_SECONDS, graceful_shutdown_timeout_s=limits.shutdown_timeout,
        logging_config={"log_level": "WARNING", "enable_access_log": False}, max_constructor_retry_count=CONSTRUCTOR_TRIES,
    )  # fmt: skip

    def stop() -> None:
        if started_here:  # the whole local cluster goes, Serve and the replicas with it
            ray.shutdown()
            return
        serve.delete(replicas.app_name)  # on a cluster that stays: this server's replicas and board only
        ray.kill(board)

    serve.start(proxy_location="Disabled")  # the front is this process's HTTP server, not Serve's proxy
    try:
        handle = serve.run(deployment.bind(build, default_ratio, threads, board), name=replicas.app_name, route_prefix=None)
    except RuntimeError as err:  # the application failed to deploy: a replica could not build its engine
        stop()
        raise ValueError(f"the replicas did not start ({str(err).splitlines()[0]}); Ray's logs say why (/tmp/ray/session_latest/logs/serve)") from None
    return handle, board, stop


def start_front(
    replicas: Replicas, build: Callable[[], Engine], text: TextSide, default_ratio: float, limits: ServerLimits
) -> tuple[FastAPI, Callable[[], None]]:  # fmt: skip
    """(app, stop): the replicas running, and the front's app over them, to serve until a signal
    (`run.serve`); `stop` takes the replicas down."""
    from kvforge.server.replicas.frontend import ReplicaBackend

    prompter = serving_prompter(text.tokenizer, text.name, text.context_length, text.name, limits)
    handle, board, stop = deploy(replicas, build, default_ratio, limits)
    return app_over(ReplicaBackend(handle, prompter, board), text.name, limits), stop  # type: ignore[arg-type]
