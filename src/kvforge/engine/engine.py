"""The serving engine: continuous batching over kvforge caches, within a KV memory budget.

One thread runs the model. Each turn it
  1. admits waiting requests, first come first served, while their reservations
     (`memory.reservation`) fit the budget: the cache never grows past it;
  2. prefills one chunk of the oldest admitted prompts (up to PREFILL_BATCH of one KV setting,
     in one forward), each on its request's own cache, compressing as it goes (a long prompt
     never stalls the running requests for more than one chunk); a prompt done joins the
     running batch of its KV settings (`KVCache.stack(take=True)`);
  3. decodes one token for every running request, one batched forward per group of requests
     with the same KV settings; finished ones leave the batch (`KVCache.select`), freeing their
     memory at once.
Requests come from other threads (`submit`, `cancel`); their events go out through each
request's `deliver`, called on the engine thread.

Prefix reuse (`prefixes.py`): while prefilling a long prompt the engine keeps a copy-on-write
fork of its compressed cache at the last chunk boundary before the prompt's end; a later request
with the same settings whose prompt starts with those tokens (the same document, another
question) starts from that fork and prefills only the rest. Chunks always start at the prompt's
first token, so a reused prefix is exactly what prefilling it again would give, for every policy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from kvforge.cache import KVCache, head_dim
from kvforge.calibration import fingerprint, require_calibration
from kvforge.engine.memory import Shape, reservation
from kvforge.engine.prefixes import PrefixCache
from kvforge.engine.request import KVSettings, Request
from kvforge.engine.sampling import sample
from kvforge.generate import DECODE, PREFILL, feed, stop_ids
from kvforge.models import LoadedModel
from kvforge.policies import make_policy
from kvforge.policies.base import Policy

log = logging.getLogger(__name__)

PREFILL_BATCH = 4  # prompts whose chunks share one forward


@dataclass
class Prefilling:
    request: Request
    cache: KVCache
    done: int = 0  # prompt tokens fed so far
    logits: torch.Tensor | None = None  # (vocab,) after the last chunk


@dataclass
class Group:
    """The running requests of one KV setting, decoded as one batch."""

    requests: list[Request] = field(default_factory=list)
    cache: KVCache | None = None
    next_tokens: list[int] = field(default_factory=list)  # each request's token to feed next
    positions: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # (batch,)


@dataclass
class Stats:
    """Counters for /metrics (read from other threads; plain numbers)."""

    completed: int = 0
    cancelled: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    peak_bytes: int = 0
    peak_running: int = 0  # the largest decoding batch so far
    prefix_hits: int = 0
    prefix_reused_tokens: int = 0


class Engine:
    def __init__(self, loaded: LoadedModel, defaults: KVSettings, kv_memory: int | None = None, prefill_chunk: int = 256) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"--prefill-chunk {prefill_chunk} must be at least 1")
        self.loaded, self.defaults, self.kv_memory, self.prefill_chunk = loaded, defaults, kv_memory, prefill_chunk
        text = loaded.model.config.get_text_config()
        self.shape = Shape(text.num_hidden_layers, text.num_key_value_heads, head_dim(loaded.model), loaded.model.dtype)
        self.stop_ids = stop_ids(loaded.tokenizer)
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[Prefilling] = deque()
        self.groups: dict[KVSettings, Group] = {}
        self.reserved: dict[int, int] = {}  # request id -> bytes
        self.policies: dict[tuple[str, float], Policy] = {}
        self.prefixes = PrefixCache(prefill_chunk)
        self.stats = Stats()
        self.wake = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.published: dict[str, float] = {}

    # --- from other threads ------------------------------------------------------------------

    def policy(self, kv: KVSettings) -> Policy:
        """The policy of a KV setting (raises ValueError naming what is wrong)."""
        key = (kv.policy, kv.ratio)
        if key not in self.policies:
            self.policies[key] = make_policy(kv.policy) if kv.policy == "full" else make_policy(kv.policy, ratio=kv.ratio)
        return self.policies[key]

    def check(self, request: Request) -> None:
        """Refuse what can never run: a prompt beyond the model's window, a request larger than
        the whole budget, an unknown policy, a policy whose calibration is missing, a quantization
        that does not fit the model (ValueError, naming the value)."""
        policy = self.policy(request.kv)
        if policy.needs_calibration:
            require_calibration(fingerprint(self.loaded.model), policy.full_name)
        request.kv.quant.check_head_dim(self.shape.head_dim)
        window = self.loaded.context_length
        if window is not None and len(request.prompt) + request.params.max_tokens > window:
            raise ValueError(
                f"prompt of {len(request.prompt)} tokens + max_tokens {request.params.max_tokens} exceeds the model's "
                f"context window of {window} tokens; shorten the prompt or lower max_tokens"
            )
        need = self.reservation(request)
        if self.kv_memory is not None and need > self.kv_memory:
            raise ValueError(
                f"this request may need {need / 2**20:.1f} MiB of KV cache, more than the server's whole budget of "
                f"{self.kv_memory / 2**20:.1f} MiB (--kv-memory); shorten it, lower max_tokens, or ask for compression"
            )

    def check_defaults(self) -> None:
        """Refuse server defaults that no request could run with (ValueError)."""
        self.defaults.quant.check_head_dim(self.shape.head_dim)
        self.policy(self.defaults)

    def reservation(self, request: Request) -> int:
        return reservation(self.shape, request.kv, len(request.prompt), request.params.max_tokens, self.prefill_chunk)

    def submit(self, request: Request) -> None:
        self.check(request)
        with self.wake:
            self.waiting.append(request)
            self.wake.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request (its client went away): its memory is freed at the engine's next turn."""
        with self.wake:
            request.cancelled = True
            self.wake.notify()

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="kvforge-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None:
            self.thread.join()

    # --- what /metrics shows -----------------------------------------------------------------

    def caches(self) -> list[KVCache]:
        """Every cache holding memory: prefilling, running, and the kept prefixes."""
        held = [p.cache for p in self.prefilling] + self.prefixes.caches()
        return held + [g.cache for g in self.groups.values() if g.cache is not None]

    def allocated(self) -> int:
        """K/V bytes allocated by every cache; buffers shared (a kept prefix and the request it
        came from, copy on write) count once. Engine thread only."""
        held: dict[int, int] = {}
        for cache in self.caches():
            held.update(cache.buffers())
        return sum(held.values())

    def snapshot(self) -> dict[str, float]:
        """What /metrics and /health show: published by the engine thread after every turn (so
        other threads never walk structures it is changing)."""
        return dict(self.published)

    def _publish(self) -> None:
        allocated = self.allocated()
        self.stats.peak_bytes = max(self.stats.peak_bytes, allocated)
        self.published = {
            "running": sum(len(g.requests) for g in self.groups.values()),
            "prefilling": len(self.prefilling),
            "waiting": len(self.waiting),
            "kv_allocated_bytes": allocated,
            "kv_kept_bytes": sum(c.kept_nbytes for c in self.caches()),
            "kv_reserved_bytes": sum(self.reserved.values()),
            "kv_peak_bytes": self.stats.peak_bytes,
            "kv_budget_bytes": self.kv_memory or 0,
            "prefix_cache_entries": len(self.prefixes),
            "prefix_cache_bytes": self.prefixes.nbytes,
        }

    # --- the engine thread -------------------------------------------------------------------

    def run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.wake:
                    if self.stopping:
                        break
                    self._admit()
                    self._publish()
                    if not (self.prefilling or any(g.requests for g in self.groups.values()) or self.waiting):
                        self.wake.wait(timeout=0.5)
                        continue
                try:
                    self._drop_cancelled()
                    self._prefill_step()
                    for group in list(self.groups.values()):
                        if group.requests:
                            self._decode_step(group)
                    self._publish()
                except Exception as err:  # a bug must not hang every client: fail what is in flight
                    log.exception("engine step failed")
                    self._fail_all(f"{type(err).__name__}: {err}")

    def _admit(self) -> None:
        """Waiting -> prefilling, in arrival order, while reservations fit (caller holds the lock)."""
        while self.waiting:
            request = self.waiting[0]
            if request.cancelled:
                self.waiting.popleft()
                self._end(request, "cancelled")
                continue
            need = self.reservation(request)
            if not self._room_for(need):
                return  # it waits for memory to be freed (the head of the queue goes first)
            self.waiting.popleft()
            self.reserved[request.id] = need
            hit = self.prefixes.lookup(request.kv, request.prompt)
            if hit is not None:
                cache, done = hit
                request.reused_tokens = done
                self.stats.prefix_hits += 1
                self.stats.prefix_reused_tokens += done
                self.prefilling.append(Prefilling(request, cache, done))
                continue
            try:
                cache = self._new_cache(request.kv)
            except ValueError as err:  # checked at submit; a calibration deleted since, say
                self._end(request, "error", str(err))
                continue
            self.prefilling.append(Prefilling(request, cache))

    def _new_cache(self, kv: KVSettings) -> KVCache:
        return KVCache(self.loaded.model, self.policy(kv), tokenizer=self.loaded.tokenizer, quant=kv.quant)

    def _drop_cancelled(self) -> None:
        for item in [p for p in self.prefilling if p.request.cancelled]:
            self.prefilling.remove(item)
            self._end(item.request, "cancelled")
        for group in self.groups.values():
            self._leave(group, [r for r in group.requests if r.cancelled], "cancelled")

    def _prefill_step(self) -> None:
        """One chunk for each of up to PREFILL_BATCH admitted prompts with the oldest one's KV
        settings, in one forward (their caches stacked for it, then split again): batching the
        chunks of several prompts costs much less than running them one by one."""
        if not self.prefilling:
            return
        kv, fresh = self.prefilling[0].request.kv, self.prefilling[0].done == 0
        # Prompts just started share a new cache; the others are stacked (an empty cache cannot be).
        items = [p for p in self.prefilling if p.request.kv == kv and (p.done == 0) == fresh][:PREFILL_BATCH]
        rows = [p.request.prompt[p.done : p.done + self.prefill_chunk] for p in items]
        positions = torch.tensor([p.done for p in items])
        if len(items) == 1:
            logits, _ = feed(self.loaded.model, items[0].cache, rows, positions, PREFILL)
        else:
            batch = self._new_cache(kv) if fresh else KVCache.stack([p.cache for p in items], take=True)
            logits, _ = feed(self.loaded.model, batch, rows, positions, PREFILL)
            for b, item in enumerate(items):
                item.cache = batch.select([b])
        for item, row, row_logits in zip(items, rows, logits):
            item.done += len(row)
            item.logits = row_logits
            prompt = item.request.prompt
            if item.done < len(prompt):
                # Counted as a copy: the request it comes from copies what it writes next.
                if item.done == self.prefixes.boundary(len(prompt)) and self._room_for(item.cache.nbytes):
                    self.prefixes.keep(kv, prompt[: item.done], item.cache)
                continue
            self.prefilling.remove(item)
            self._start_decoding(item)

    def _start_decoding(self, item: Prefilling) -> None:
        """A prompt is in: sample its first token and join the running batch of its settings."""
        assert item.logits is not None
        request, prompt = item.request, item.request.prompt
        self.stats.prompt_tokens += len(prompt)
        token = sample(item.logits, request.params, request.generator)
        reason = request.add(token, self.loaded.tokenizer, self.stop_ids)
        self.stats.generated_tokens += 1
        if reason is not None:
            self._end(request, reason)
            return
        group = self.groups.setdefault(request.kv, Group())
        group.cache = item.cache if group.cache is None else KVCache.stack([group.cache, item.cache], take=True)
        group.requests.append(request)
        group.next_tokens.append(token)
        group.positions = torch.cat([group.positions, torch.tensor([len(prompt)])])
        self.stats.peak_running = max(self.stats.peak_running, sum(len(g.requests) for g in self.groups.values()))

    def _room_for(self, extra: int) -> bool:
        """Whether `extra` bytes fit beside the reservations and the kept prefixes; kept prefixes
        give way, the oldest unused first."""
        if self.kv_memory is None:
            return True
        while sum(self.reserved.values()) + self.prefixes.nbytes + extra > self.kv_memory:
            if not self.prefixes.evict_one():
                return False
        return True

    def _decode_step(self, group: Group) -> None:
        assert group.cache is not None
        logits, group.positions = feed(self.loaded.model, group.cache, [[t] for t in group.next_tokens], group.positions, DECODE)
        finished: list[tuple[Request, str]] = []
        for b, request in enumerate(group.requests):
            token = sample(logits[b], request.params, request.generator)
            group.next_tokens[b] = token
            self.stats.generated_tokens += 1
            reason = request.add(token, self.loaded.tokenizer, self.stop_ids)
            if reason is not None:
                finished.append((request, reason))
        for request, reason in finished:
            self._leave(group, [request], reason)

    def _leave(self, group: Group, leaving: list[Request], reason: str) -> None:
        if not leaving:
            return
        keep = [b for b, r in enumerate(group.requests) if r not in leaving]
        group.requests = [group.requests[b] for b in keep]
        group.next_tokens = [group.next_tokens[b] for b in keep]
        group.positions = group.positions[keep]
        assert group.cache is not None
        group.cache = group.cache.select(keep) if keep else None
        for request in leaving:
            self._end(request, reason)

    def _end(self, request: Request, reason: str, error: str | None = None) -> None:
        self.reserved.pop(request.id, None)
        if reason == "cancelled":
            self.stats.cancelled += 1
        else:
            self.stats.completed += 1
        request.finish(reason, error)

    def _fail_all(self, error: str) -> None:
        for item in list(self.prefilling):
            self._end(item.request, "error", error)
        self.prefilling.clear()
        for group in self.groups.values():
            for request in group.requests:
                self._end(request, "error", error)
        self.groups.clear()
