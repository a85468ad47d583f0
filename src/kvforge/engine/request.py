"""One generation request as the engine sees it: its prompt, how to sample, how its KV cache is
held, and the text it has produced so far (detokenized incrementally, stop strings applied)."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from kvforge.engine.sampling import SamplingParams
from kvforge.spec import KVSpec

log = logging.getLogger(__name__)
_ids = itertools.count()


# How a request's cache is compressed and held; requests with equal settings share a batch. The
# engine's name for `KVSpec` (kept: code written against `KVSettings` goes on working).
KVSettings = KVSpec


@dataclass
class Event:
    """What the engine tells a request's consumer: new text, or the end with its reason."""

    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(eq=False)  # a request is itself: compared by identity
class Request:
    prompt: list[int]
    params: SamplingParams
    kv: KVSettings
    deliver: Callable[[Event], None]  # called from the engine thread
    id: int = field(default_factory=lambda: next(_ids))
    arrived: float = field(default_factory=time.perf_counter)
    generated: list[int] = field(default_factory=list)
    sent: str = ""  # text delivered so far
    cancelled: bool = False
    first_token_at: float | None = None
    reused_tokens: int = 0  # prompt tokens served from the prefix cache
    # (start, end) spans of the prompt that are documents reused from the store wherever they sit
    # (ascending, apart; `kvforge.blend`): the server's `kv_document` content parts
    documents: list[tuple[int, int]] = field(default_factory=list)
    isolated: bool = False  # a batched step with it failed: from then on it runs alone
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        self.generator = self.params.generator()

    def add(self, token: int, tokenizer: PreTrainedTokenizerBase, stop_ids: set[int]) -> str | None:
        """Take a generated token and deliver the new text; returns the finish reason, if any."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in stop_ids:
            self._send(tokenizer.decode(self.generated, skip_special_tokens=True))  # what was held back
            return "stop"
        self.generated.append(token)
        text = tokenizer.decode(self.generated, skip_special_tokens=True)
        for stop in self.params.stop:
            cut = text.find(stop)
            if cut >= 0:
                self._send(text[:cut])
                return "stop"
        if len(self.generated) >= self.params.max_tokens:
            self._send(text)
            return "length"
        # Hold back what may still become a stop string, and half a multi-byte character.
        hold = max((len(s) - 1 for s in self.params.stop), default=0)
        ready = text[: len(text) - hold] if hold else text
        if not ready.endswith("\ufffd"):
            self._send(ready)
        return None

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.deliver(Event(text=text[len(self.sent) :]))
            self.sent = text

    def finish(self, reason: str, error: str | None = None) -> None:
        """Deliver the end. It never raises: a consumer that cannot take it (gone, say) is only
        logged, so ending one request can never disturb the engine or the others."""
        event = Event(finish_reason=reason, error=error, prompt_tokens=len(self.prompt), completion_tokens=len(self.generated))
        try:
            self.deliver(event)
        except Exception:
            log.exception("request %d: its consumer did not take the end (%s)", self.id, reason)
