"""Every error the server sends, in one shape (OpenAI's):
`{"error": {"message", "type", "param", "code"}}`, whatever raised it: our own checks (`APIError`),
routing (404, 405), the guard (401, 413, a refused Host) or a bug (500). A client never sees an
internal path or exception text: a 500 says only that the log has the details, under an id.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

# OpenAI's error types by status (its clients map them to exception classes)
TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


class APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), status_code=err.status, headers=err.headers)


def install(app: FastAPI, refused: Counter) -> None:
    """Route every error through `error_response`; `refused` counts them by status (/metrics)."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        refused[err.status] += 1
        return error_response(err)

    @app.exception_handler(HTTPException)
    async def routing(request: Request, err: HTTPException) -> JSONResponse:
        if err.status_code == 404:
            message = f"no route {request.url.path!r}; this server serves /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics"
        elif err.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path!r}; see the Allow header"
        else:
            message = str(err.detail)
        return await api_error(request, APIError(err.status_code, message, headers=err.headers))

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception) -> JSONResponse:
        incident = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s %s", incident, request.method, request.url.path, exc_info=err)
        return await api_error(request, APIError(500, f"internal server error (incident {incident}); the server's log has the details", code="internal_error"))
