"""kvforge's OpenAI-compatible HTTP API over the engine (FastAPI).

Routes: POST /v1/chat/completions and /v1/completions (streamed as server-sent events with
`stream: true`), GET /v1/models, /health and /metrics (Prometheus text). A bad request gets a 4xx
with an OpenAI-style error body and the server goes on serving everyone else; a client that goes
away has its request cancelled and its KV memory freed at the engine's next turn.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from kvforge.engine import Engine, Event, KVSettings, Request, SamplingParams
from kvforge.server.metrics import prometheus
from kvforge.server.schemas import ChatRequest, CompletionRequest, KVFields
from kvforge.storage import QuantSpec

DEFAULT_MAX_TOKENS = 256


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(engine: Engine, model_name: str, default_ratio: float = 0.5) -> FastAPI:
    """The FastAPI app serving `engine` (already started) as model `model_name`. A request that
    names a compressing `kv_policy` without `kv_ratio` gets `default_ratio` (the server's --ratio)."""
    app = FastAPI(title="kvforge", docs_url=None, redoc_url=None)
    tokenizer = engine.loaded.tokenizer
    names = {model_name, "default", engine.loaded.name}

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, err: APIError) -> JSONResponse:
        return JSONResponse(error_body(err.message, param=err.param, code=err.code), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HTTPRequest, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = f"{first.get('msg', 'invalid request')}" + (f" (field {where})" if where else "")
        return JSONResponse(error_body(message, param=where), status_code=400)

    def settings(body: KVFields, prompt: list[int]) -> Request:
        """The engine request for `body`, validated: ValueErrors become 400s naming the field."""
        if body.model not in names:
            raise APIError(404, f"model {body.model!r} is not served here; use {model_name!r}", "model", "model_not_found")
        if body.n != 1:
            raise APIError(400, f"n={body.n} is not supported; use n=1", "n")
        try:
            stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
            params = SamplingParams(body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS, body.temperature, body.top_p, body.seed, stop)
            base = engine.defaults
            quant = base.quant if body.kv_quant is None else QuantSpec(body.kv_quant, base.quant.group, base.quant.residual, base.quant.split)
            policy = body.kv_policy or base.policy
            ratio = body.kv_ratio if body.kv_ratio is not None else (base.ratio if body.kv_policy is None else default_ratio)
            kv = KVSettings(policy, 0.0 if policy == "full" else ratio, quant)
            request = Request(prompt, params, kv, deliver=lambda _: None)
            engine.check(request)
        except ValueError as err:
            raise APIError(400, str(err)) from err
        return request

    async def run(http: HTTPRequest, request: Request) -> AsyncIterator[Event]:
        """Submit `request` and yield its events; cancel it when the client goes away."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        request.deliver = lambda event: loop.call_soon_threadsafe(queue.put_nowait, event)
        engine.submit(request)
        finished = False
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                yield event
                if event.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                engine.cancel(request)

    async def complete(http: HTTPRequest, request: Request) -> tuple[str, Event]:
        text, last = [], Event()
        async for event in run(http, request):
            text.append(event.text)
            last = event
        if last.finish_reason == "error":
            raise APIError(500, f"generation failed: {last.error}")
        return "".join(text), last

    def usage(event: Event) -> dict:
        return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                "total_tokens": event.prompt_tokens + event.completion_tokens}  # fmt: skip

    def stream(http: HTTPRequest, request: Request, chunk: callable, include_usage: bool) -> StreamingResponse:  # type: ignore[valid-type]
        async def events() -> AsyncIterator[str]:
            first = chunk(None, None, True)
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            async for event in run(http, request):
                if event.text:
                    yield f"data: {json.dumps(chunk(event.text, None, False))}\n\n"
                if event.finish_reason is not None:
                    final = chunk(None, event.finish_reason, False)
                    if include_usage:
                        final["usage"] = usage(event)
                    yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HTTPRequest) -> object:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        except Exception as err:  # a template the messages do not fit
            raise APIError(400, f"messages do not fit the model's chat template: {err}", "messages") from err
        request = settings(body, list(prompt))
        ident, created = f"chatcmpl-{request.id}", int(time.time())

        def chunk(text: str | None, reason: str | None, first: bool) -> dict:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}  # fmt: skip

        if body.stream:
            return stream(http, request, chunk, bool((body.stream_options or {}).get("include_usage")))
        text, last = await complete(http, request)
        return {"id": ident, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": last.finish_reason}],
                "usage": usage(last)}  # fmt: skip

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest) -> object:
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise APIError(400, "prompt takes one string here (one completion per request)", "prompt")
            body.prompt = body.prompt[0]
        request = settings(body, tokenizer(body.prompt)["input_ids"])
        ident, created = f"cmpl-{request.id}", int(time.time())

        def chunk(text: str | None, reason: str | None, first: bool) -> dict | None:
            if first:
                return None
            return {"id": ident, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]}  # fmt: skip

        if body.stream:
            return stream(http, request, chunk, bool((body.stream_options or {}).get("include_usage")))
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
        return PlainTextResponse(prometheus(engine), media_type="text/plain; version=0.0.4")

    return app
