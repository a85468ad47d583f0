"""kvforge's OpenAI-compatible HTTP API over the engine (FastAPI).

Routes: POST /v1/chat/completions and /v1/completions (streamed as server-sent events with
`stream: true`), GET /v1/models, /health and /metrics (Prometheus text). Before a route runs, the
guard (`guard.py`) checks the Host header, the API key and the body size. A route reads the body
and hands it to a worker thread (`prepare.py`: parse, validate, template, tokenize), so a large
request never stalls the event loop; then it submits the request to the engine and relays its
events. A bad request gets a 4xx in OpenAI's error shape and touches nothing else; a client that
goes away, streamed or not, has its request cancelled and its KV memory freed at the engine's
next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask

from kvforge.engine import Engine, Event, Request
from kvforge.engine.engine import QueueFull
from kvforge.server import errors
from kvforge.server.errors import APIError
from kvforge.server.guard import Guard
from kvforge.server.limits import ServerLimits
from kvforge.server.metrics import prometheus
from kvforge.server.prepare import Preparer

log = logging.getLogger(__name__)

PREPARE_THREADS = 2  # bodies parsed and tokenized at once (each is CPU-bound)
PREPARE_NICENESS = 10  # how much lower the preparing threads' CPU priority is than the engine's
RETRY_AFTER = "1"  # seconds a client told 429 waits: the queue moves every engine step
T = TypeVar("T")


def create_app(engine: Engine, model_name: str, default_ratio: float = 0.5, limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (already started) as model `model_name`. A request that
    names a compressing `kv_policy` without `kv_ratio` gets `default_ratio` (the server's --ratio)."""
    limits = limits or ServerLimits()
    refused: Counter[int] = Counter()  # refused requests by status, for /metrics
    pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="kvforge-prepare", initializer=lower_priority)
    preparer = Preparer(engine, {model_name, "default", engine.loaded.name}, model_name, default_ratio, limits)
    preparing = 0  # requests whose bodies are being read or prepared (changed on the event loop only)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="kvforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    errors.install(app, refused)
    app.add_middleware(Guard, limits=limits, refused=refused)

    async def prepared(http: HTTPRequest, prepare: Callable[[bytes], T]) -> T:
        """The body, read and prepared on a worker thread; 429 while the queue is full."""
        nonlocal preparing
        if preparing + len(engine.waiting) >= limits.max_queued:
            raise full(f"{limits.max_queued} requests are already queued (--max-queued)")
        preparing += 1
        try:
            raw = await http.body()
            return await asyncio.get_running_loop().run_in_executor(pool, prepare, raw)
        finally:
            preparing -= 1

    def submit(request: Request) -> asyncio.Queue[Event]:
        """Hand `request` to the engine; its events arrive on the returned queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        request.deliver = lambda event: loop.call_soon_threadsafe(queue.put_nowait, event)
        try:
            engine.submit(request)
        except QueueFull as err:
            raise full(str(err)) from None
        except ValueError as err:  # checked while preparing; the engine's state moved since
            raise APIError(400, str(err)) from None
        return queue

    async def relay(queue: asyncio.Queue[Event], request: Request) -> AsyncIterator[Event]:
        """The request's events up to its end; cancelled if the consumer stops early."""
        finished = False
        try:
            while not finished:
                event = await queue.get()
                finished = event.finish_reason is not None
                yield event
        finally:
            if not finished:
                engine.cancel(request)

    async def cancel_on_disconnect(http: HTTPRequest, request: Request) -> None:
        """Wait for the client to hang up (the body is read: the next message is the disconnect)."""
        while (await http.receive())["type"] != "http.disconnect":
            pass
        engine.cancel(request)

    async def complete(http: HTTPRequest, request: Request) -> tuple[str, Event]:
        queue = submit(request)
        watcher = asyncio.create_task(cancel_on_disconnect(http, request))
        text, last = [], Event()
        try:
            async for event in relay(queue, request):
                text.append(event.text)
                last = event
        finally:
            watcher.cancel()
        if last.finish_reason == "error":
            raise APIError(500, f"generation failed inside the server (request {request.id}); the server's log has the details", code="internal_error")
        if last.finish_reason == "cancelled":
            raise APIError(503, "the request was cancelled: the server is shutting down", code="shutting_down")
        return "".join(text), last

    def usage(event: Event) -> dict:
        return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                "total_tokens": event.prompt_tokens + event.completion_tokens}  # fmt: skip

    def stream(request: Request, chunk: Callable, include_usage: bool) -> StreamingResponse:
        queue = submit(request)  # before the 200: a refusal is still an error status

        async def events() -> AsyncIterator[str]:
            first = chunk(None, None, True)
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            async for event in relay(queue, request):
                if event.text:
                    yield f"data: {json.dumps(chunk(event.text, None, False))}\n\n"
                if event.finish_reason is not None:
                    final = chunk(None, event.finish_reason, False)
                    if include_usage:
                        final["usage"] = usage(event)
                    yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"

        # The background task runs however the response ends: a client gone before the first
        # event (the generator never started) is cancelled too. Cancelling a finished request is a no-op.
        return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(engine.cancel, request))

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest) -> object:
        body, request = await prepared(http, preparer.chat)
        ident, created = f"chatcmpl-{request.id}", int(time.time())

        def chunk(text: str | None, reason: str | None, first: bool) -> dict:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}  # fmt: skip

        if body.stream:
            return stream(request, chunk, bool((body.stream_options or {}).get("include_usage")))
        text, last = await complete(http, request)
        return {"id": ident, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": last.finish_reason}],
                "usage": usage(last)}  # fmt: skip

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest) -> object:
        body, request = await prepared(http, preparer.completion)
        ident, created = f"cmpl-{request.id}", int(time.time())

        def chunk(text: str | None, reason: str | None, first: bool) -> dict | None:
            if first:
                return None
            return {"id": ident, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]}  # fmt: skip

        if body.stream:
            return stream(request, chunk, bool((body.stream_options or {}).get("include_usage")))
        text, last = await complete(http, request)
        return {"id": ident, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}],
                "usage": usage(last)}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "kvforge"}]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **engine.snapshot()}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus(engine, refused), media_type="text/plain; version=0.0.4")

    return app


def lower_priority() -> None:
    """Run this thread at a lower CPU priority (Linux: a thread has its own nice value), so that
    tokenizing a large prompt takes the cores the engine leaves, not the ones it decodes on."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + PREPARE_NICENESS)
    except (AttributeError, OSError) as err:  # not Linux, or not allowed: the same priority then
        log.info("preparing threads keep the engine's CPU priority (%s)", err)


def full(why: str) -> APIError:
    return APIError(429, f"the server is busy: {why}; retry after {RETRY_AFTER} s", code="queue_full", headers={"Retry-After": RETRY_AFTER})
