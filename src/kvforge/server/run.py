"""Running the server process: uvicorn with kvforge's shutdown. The first SIGTERM or SIGINT stops
accepting connections and lets the requests in flight finish for at most `shutdown_timeout`
seconds, then cancels what is left, stops the engine (or the replicas) and exits 0. A second signal exits at once
(status 1), whatever is running."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI


log = logging.getLogger(__name__)

class DrainingServer(uvicorn.Server):
    """uvicorn's server, but a second SIGTERM forces the exit as a second SIGINT does (uvicorn's
    own handler forces only on SIGINT), and no signal is raised again after the shutdown (uvicorn
    re-raises what it caught, which would kill the process before the engine stops)."""

    forced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self.force_exit = self.forced = True
            log.warning("second %s: exiting now", signal.Signals(sig).name)
        else:
            self.should_exit = True
            log.warning("%s: draining requests in flight (at most %s s; send it again to exit now)",
                        signal.Signals(sig).name, self.config.timeout_graceful_shutdown)  # fmt: skip


def serve(app: FastAPI, stop: Callable[[], None], host: str, port: int, shutdown_timeout: float) -> int:
    """Serve until a signal, then `stop` what generates (the engine, after its current step; or
    the replicas); returns 0. Forced by a second signal, the process ends here with status 1,
    without waiting: an interpreter shutting down under a thread that is inside a forward would
    abort instead."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_timeout)
    server = DrainingServer(config)
    try:
        server.run()
    finally:
        if server.forced:
            exit_now()
        # uvicorn has put the default handlers back: a signal while the engine finishes its step
        # must still mean "exit at once", not a traceback or death by signal
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: exit_now())
        stop()
    return 0


def exit_now() -> None:
    log.warning("exiting now")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
