"""kvforge's OpenAI-compatible HTTP API over the engine (FastAPI).

Routes (`routes.py`): POST /v1/chat/completions and /v1/completions (streamed as server-sent
events with `stream: true`), GET /v1/models, /health and /metrics (Prometheus text). Before a
route runs, the guard (`guard.py`) checks the Host header, the API key and the body size. A route
reads the body and hands it to a worker thread (`prepare.py`: parse, validate, template,
tokenize), so a large request never stalls the event loop; then it submits the request to the
engine and relays its events (`state.py`). A bad request gets a 4xx in OpenAI's error shape
(`errors.py`) and touches nothing else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from kvforge.engine import Engine
from kvforge.server import errors
from kvforge.server.guard import Guard
from kvforge.server.limits import ServerLimits
from kvforge.server.prepare import Preparer, prompter_for
from kvforge.server.routes import router
from kvforge.server.state import Backend, EngineBackend, ServerState


def create_app(engine: Engine, model_name: str, default_ratio: float = 0.5, limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (already started) as model `model_name`. A request that
    names a compressing `kv_policy` without `kv_ratio` gets `default_ratio` (the server's --ratio)."""
    limits = limits or ServerLimits()
    preparer = Preparer(engine, prompter_for(engine, model_name, limits), default_ratio)
    return app_over(EngineBackend(engine, preparer), model_name, limits)


def app_over(backend: Backend, model_name: str, limits: ServerLimits) -> FastAPI:
    """The FastAPI app of the routes over `backend`, behind the guard."""
    kv = ServerState(backend, model_name, limits)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        kv.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="kvforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.kv = kv
    errors.install(app, kv.refused)
    app.add_middleware(Guard, limits=limits, refused=kv.refused, backlog=kv)
    app.include_router(router)
    return app
