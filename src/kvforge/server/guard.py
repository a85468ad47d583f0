"""What every HTTP request passes before any route sees it: the Host header (against DNS
rebinding), the API key, and the body size. A pure ASGI middleware: a refused request costs no
parsing, and a body over the limit is never held in memory."""

from __future__ import annotations

import hmac
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

from kvforge.server.errors import APIError, error_response
from kvforge.server.limits import ServerLimits

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = ("/health",)  # answered without the API key (load balancers probe it)
DRAIN_LIMIT = 64 * 2**20  # bytes of a refused body read and dropped, so the client sees the 413


def host_name(header: str) -> str:
    """'Example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Backlog(Protocol):
    """What the guard asks of the server's queue: it counts the bodies it is reading."""

    reading: int

    def full(self) -> APIError | None: ...


class Guard:
    def __init__(self, app: ASGIApp, limits: ServerLimits, refused: Counter, backlog: Backlog) -> None:
        self.app, self.limits, self.refused, self.backlog = app, limits, refused, backlog

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refuse(scope, headers)
        if refusal is not None:
            await self.reply(scope, send, refusal)
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            # A client that waits for "100 Continue" before sending gets the answer without it.
            waiting = "100-continue" in headers.get("expect", "").lower()
            await self.too_large(scope, receive, send, more=not waiting)
            return
        if scope["method"] == "POST":
            busy = self.backlog.full()
            if busy is not None:  # bodies being read count against the queue: memory stays bounded
                if await self.drain(receive):
                    await self.reply(scope, send, busy)
                return
        self.backlog.reading += 1
        try:
            body = await self.read_body(scope, receive, send)
        finally:
            self.backlog.reading -= 1
        if body is not None:
            await self.app(scope, replay(body, receive), send)

    async def read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, counted as it comes (chunked bodies declare no length); None when the
        client went away or the body is over the limit (answered 413 then)."""
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limits.max_body_bytes:
                await self.too_large(scope, receive, send, more)
                return None
        return bytes(body)

    def refuse(self, scope: Scope, headers: dict[str, str]) -> APIError | None:
        """The error of a request refused before its body is read (None: it may go on)."""
        allowed = self.limits.allowed_hosts
        host = host_name(headers.get("host", ""))
        if allowed is not None and host not in allowed:
            names = ", ".join(allowed)
            return APIError(400, f"Host header {host!r} is not allowed; this server answers to {names} (--allowed-hosts)", code="host_not_allowed")
        key = self.limits.api_key
        if key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get("authorization", "")
            token = given[7:] if given[:7].lower() == "bearer " else ""
            # compare_digest takes time independent of where the strings differ; headers arrive as
            # latin-1 bytes, and keys are ASCII (ServerLimits checks), so the bytes compare alike
            if not hmac.compare_digest(token.encode("latin-1"), key.encode("ascii")):
                why = "no API key was given" if not given else "the API key is not valid"
                message = f"{why}; send the header 'Authorization: Bearer <key>' with the server's --api-key"
                return APIError(401, message, code="invalid_api_key", headers={"www-authenticate": "Bearer"})
        return None

    async def drain(self, receive: Receive, more: bool = True) -> bool:
        """Read and drop what the client still sends (up to DRAIN_LIMIT bytes): a client that is
        still sending reads no reply. False when it went away."""
        drained = 0
        while more and drained < DRAIN_LIMIT:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        return True

    async def too_large(self, scope: Scope, receive: Receive, send: Send, more: bool) -> None:
        if not await self.drain(receive, more):
            return
        limit = self.limits.max_body_bytes
        message = f"the request body is over the limit of {limit} bytes ({limit / 2**20:.1f} MiB); shorten it, or start the server with a larger --max-request-size"
        await self.reply(scope, send, APIError(413, message, code="request_too_large"))

    async def reply(self, scope: Scope, send: Send, err: APIError) -> None:
        """Answer with `err` in the shape every route's errors have (the body is read or dropped:
        nothing more is received)."""
        self.refused[err.status] += 1
        await error_response(err)(scope, nothing_more, send)


async def nothing_more() -> Message:
    return {"type": "http.disconnect"}


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the app the body already read, then the connection's own events
    (the disconnect a handler waits for)."""
    sent = False

    async def next_message() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return next_message
