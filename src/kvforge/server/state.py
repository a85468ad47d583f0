"""What the routes share, and a request's way through the server: its body read and prepared on
a worker thread (429 while the queue is full), handed to a backend, its events relayed until it
ends; a client that goes away, streamed or not, has its request cancelled.

A backend is what generates: the engine in this process (`EngineBackend`), or engine replicas on
Ray behind this process (`kvforge.server.replicas`). The routes see only `Backend` and `Ticket`."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from fastapi import Request as HTTPRequest

from kvforge.engine import Engine, Event, Request
from kvforge.engine.engine import QueueFull
from kvforge.server.errors import APIError
from kvforge.server.limits import ServerLimits
from kvforge.server.metrics import prometheus
from kvforge.server.prepare import Preparer
from kvforge.server.schemas import KVFields

log = logging.getLogger(__name__)

PREPARE_THREADS = 2  # bodies parsed and tokenized at once (each is CPU-bound)
PREPARE_NICENESS = 10  # how much lower the preparing threads' CPU priority is than the engine's
RETRY_AFTER = "1"  # seconds a client told 429 waits: the queue moves every engine step
T = TypeVar("T")


def lower_priority() -> None:
    """Run this thread at a lower CPU priority (Linux: a thread has its own nice value), so that
    tokenizing a large prompt takes the cores the engine leaves, not the ones it decodes on."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + PREPARE_NICENESS)
    except (AttributeError, OSError) as err:  # not Linux, or not allowed: the same priority then
        log.info("preparing threads keep the engine's CPU priority (%s)", err)


def queue_full(why: str) -> APIError:
    return APIError(429, f"the server is busy: {why}; retry after {RETRY_AFTER} s", code="queue_full", headers={"Retry-After": RETRY_AFTER})


class Ticket(Protocol):
    """A request handed to a backend: its id, its events up to the end (an `APIError` raised
    from them ends the request for a reason the client is told), and a way to stop it."""

    id: str

    def events(self) -> AsyncIterator[Event]: ...

    def cancel(self) -> None: ...


class Backend(Protocol):
    """What generates the answers. `chat` and `completion` run on worker threads (CPU work) and
    return the validated body and a job; `submit` hands the job on (an `APIError` refuses it)."""

    def chat(self, raw: bytes) -> tuple[KVFields, Any]: ...

    def completion(self, raw: bytes) -> tuple[KVFields, Any]: ...

    async def submit(self, job: Any) -> Ticket: ...

    def queued(self) -> int: ...

    async def health(self) -> dict: ...

    async def metrics(self, refused: Counter[int]) -> str: ...


@dataclass
class EngineTicket:
    engine: Engine
    request: Request
    queue: asyncio.Queue[Event]

    @property
    def id(self) -> str:
        return str(self.request.id)

    async def events(self) -> AsyncIterator[Event]:
        """The request's events up to its end; cancelled if the consumer stops early."""
        finished = False
        try:
            while not finished:
                event = await self.queue.get()
                finished = event.finish_reason is not None
                yield event
        finally:
            if not finished:
                self.cancel()

    def cancel(self) -> None:
        self.engine.cancel(self.request)  # a finished request: a no-op


@dataclass
class EngineBackend:
    """The engine of this process: requests prepared by `preparer`, generated on its thread."""

    engine: Engine
    preparer: Preparer

    def chat(self, raw: bytes) -> tuple[KVFields, Request]:
        return self.preparer.chat(raw)

    def completion(self, raw: bytes) -> tuple[KVFields, Request]:
        return self.preparer.completion(raw)

    async def submit(self, request: Request) -> EngineTicket:
        """Hand `request` to the engine; its events arrive on the ticket's queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        request.deliver = lambda event: loop.call_soon_threadsafe(queue.put_nowait, event)
        try:
            self.engine.submit(request)
        except QueueFull as err:
            raise queue_full(str(err)) from None
        except ValueError as err:  # checked while preparing; the engine's state moved since
            raise APIError(400, str(err)) from None
        return EngineTicket(self.engine, request, queue)

    def queued(self) -> int:
        return self.engine.queued()

    async def health(self) -> dict:
        return self.engine.snapshot()

    async def metrics(self, refused: Counter[int]) -> str:
        return prometheus(self.engine, refused)


@dataclass
class ServerState:
    backend: Backend
    model_name: str
    limits: ServerLimits
    refused: Counter[int] = field(default_factory=Counter)  # refused requests by status, for /metrics
    pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="kvforge-prepare", initializer=lower_priority)
    )
    # Requests in the server before the backend, each counted on the event loop only: bodies being
    # read (by the guard) and bodies being prepared (on the worker threads).
    reading: int = 0
    preparing: int = 0

    def queued(self) -> int:
        """Requests not yet running: being read, being prepared, or waiting in the backend."""
        return self.reading + self.preparing + self.backend.queued()

    def full(self) -> APIError | None:
        """The 429 to answer when the queue is at its limit (--max-queued), else None."""
        if self.queued() < self.limits.max_queued:
            return None
        return queue_full(f"{self.limits.max_queued} requests are already queued (--max-queued)")

    async def prepared(self, http: HTTPRequest, prepare: Callable[[bytes], T]) -> T:
        """The body (read by the guard already) prepared on a worker thread."""
        self.preparing += 1
        try:
            raw = await http.body()
            return await asyncio.get_running_loop().run_in_executor(self.pool, prepare, raw)
        finally:
            self.preparing -= 1

    async def complete(self, http: HTTPRequest, ticket: Ticket) -> tuple[str, Event]:
        """Run the ticket's request to its end: its text and last event. The body is read, so the
        next message on the connection is the client's disconnect, which cancels the request."""

        async def cancel_on_disconnect() -> None:
            while (await http.receive())["type"] != "http.disconnect":
                pass
            ticket.cancel()

        watcher = asyncio.create_task(cancel_on_disconnect())
        text, last = [], Event()
        try:
            async for event in ticket.events():
                text.append(event.text)
                last = event
        finally:
            watcher.cancel()
        if last.finish_reason == "error":
            raise APIError(500, f"generation failed inside the server (request {ticket.id}); the server's log has the details", code="internal_error")
        if last.finish_reason == "cancelled":
            raise APIError(503, "the request was cancelled: the server is shutting down", code="shutting_down")
        return "".join(text), last
