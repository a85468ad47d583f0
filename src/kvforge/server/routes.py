"""The HTTP routes, one small handler each, over `ServerState` (in `app.state.kv`)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask

from kvforge.engine import Event
from kvforge.server.errors import APIError, error_body
from kvforge.server.schemas import KVFields
from kvforge.server.state import ServerState, Ticket

router = APIRouter()
Chunk = Callable[[str | None, str | None, bool], dict | None]  # (text, finish reason, first) -> event body


def state(http: HTTPRequest) -> ServerState:
    return http.app.state.kv


def usage(event: Event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}  # fmt: skip


def stream(kv: ServerState, ticket: Ticket, chunk: Chunk, body: KVFields) -> StreamingResponse:
    """The request's events as server-sent events. An error after the 200 (a replica gone) is
    sent as an `error` event, which OpenAI's clients raise."""
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    async def events() -> AsyncIterator[str]:
        first = chunk(None, None, True)
        if first is not None:
            yield f"data: {json.dumps(first)}\n\n"
        try:
            async for event in ticket.events():
                if event.text:
                    yield f"data: {json.dumps(chunk(event.text, None, False))}\n\n"
                if event.finish_reason is not None:
                    final = chunk(None, event.finish_reason, False)
                    assert final is not None
                    if include_usage:
                        final["usage"] = usage(event)
                    yield f"data: {json.dumps(final)}\n\n"
        except APIError as err:
            kv.refused[err.status] += 1
            yield f"data: {json.dumps(error_body(err.status, err.message, err.param, err.code))}\n\n"
            return
        yield "data: [DONE]\n\n"

    # The background task runs however the response ends: a client gone before the first event
    # (the generator never started) is cancelled too. Cancelling a finished request is a no-op.
    return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(ticket.cancel))


@router.post("/v1/chat/completions")
async def chat(http: HTTPRequest) -> object:
    kv = state(http)
    body, job = await kv.prepared(http, kv.backend.chat)
    ticket = await kv.backend.submit(job)  # before the 200: a refusal is still an error status
    ident, created = f"chatcmpl-{ticket.id}", int(time.time())

    def chunk(text: str | None, reason: str | None, first: bool) -> dict:
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": kv.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}  # fmt: skip

    if body.stream:
        return stream(kv, ticket, chunk, body)
    text, last = await kv.complete(http, ticket)
    return {"id": ident, "object": "chat.completion", "created": created, "model": kv.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": last.finish_reason}],
            "usage": usage(last)}  # fmt: skip


@router.post("/v1/completions")
async def completions(http: HTTPRequest) -> object:
    kv = state(http)
    body, job = await kv.prepared(http, kv.backend.completion)
    ticket = await kv.backend.submit(job)  # before the 200: a refusal is still an error status
    ident, created = f"cmpl-{ticket.id}", int(time.time())

    def chunk(text: str | None, reason: str | None, first: bool) -> dict | None:
        if first:
            return None
        return {"id": ident, "object": "text_completion", "created": created, "model": kv.model_name,
                "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]}  # fmt: skip

    if body.stream:
        return stream(kv, ticket, chunk, body)
    text, last = await kv.complete(http, ticket)
    return {"id": ident, "object": "text_completion", "created": created, "model": kv.model_name,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}],
            "usage": usage(last)}  # fmt: skip


@router.get("/v1/models")
async def models(http: HTTPRequest) -> dict:
    return {"object": "list", "data": [{"id": state(http).model_name, "object": "model", "created": 0, "owned_by": "kvforge"}]}


@router.get("/health")
async def health(http: HTTPRequest) -> dict:
    return {"status": "ok", **(await state(http).backend.health())}


@router.get("/metrics")
async def metrics(http: HTTPRequest) -> PlainTextResponse:
    kv = state(http)
    return PlainTextResponse(await kv.backend.metrics(kv.refused), media_type="text/plain; version=0.0.4")
