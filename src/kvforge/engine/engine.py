"""The serving engine: continuous batching over kvforge caches, within a KV memory budget.

One thread runs the model. Each turn it
  1. admits waiting requests, first come first served, while the engine's block memory
     (`KVMemory`, sized by `kv_memory`) has the free blocks their prompts take
     (`memory.prompt_blocks`): the cache never grows past the memory;
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
A waiting request whose first chunks a prompt being prefilled is computing waits for them
(`_behind`) instead of computing them beside it.

Every cache is paged over that one memory (full precision: `storage/paged.py`; quantized, codes
and tail in its blocks: `storage/pagedquant.py`), so a prefix hit, a request joining or leaving a
batch and a kept prefix are block-table edits, never copies. Before
each step the engine makes sure the pool has the blocks the step takes; when it has not, it drops
kept prefixes, then preempts the most recently admitted requests (their blocks freed, they go back
to the head of the queue and are recomputed from their tokens so far when memory allows, as vLLM
does) instead of failing anyone.

Failures stay with the request that caused them. A step of one request that raises fails that
request alone. A batched step that raises (several prompts' chunks, or a decoding group) cannot
say whose row broke it, and its caches may be half-written: every request in it is *isolated*,
recomputed from its tokens so far (prompt + generated, as vLLM's recompute preemption does) on a
fresh cache, and from then on prefilled and decoded alone, so a request that fails again fails by
itself while the others go on. (For a compressing policy the recomputed cache is what a prefill
of those tokens keeps, which may differ from what decoding had kept; in a quantized one the
generated tokens are recomputed attending to each other in full precision, as a prefill does.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvforge.blend import DEFAULT_SHARE, check_share
from kvforge.cache import KVCache, head_dim
from kvforge.calibration import fingerprint, require_calibration
from kvforge.engine.blocks import BlockIndex, reusable
from kvforge.engine.memory import Shape, prompt_blocks, reservation, row_blocks, summary_block_nbytes
from kvforge.engine.prefixes import PrefixCache
from kvforge.engine.request import KVSettings, Request
from kvforge.engine.sampling import sample
from kvforge.engine.stored import StoreTier
from kvforge.generate import DECODE, PREFILL, feed, stop_ids
from kvforge.memory import OutOfBlocks
from kvforge.memory.kvmemory import KVMemory
from kvforge.models import LoadedModel
from kvforge.policies.base import Policy
from kvforge.storage.paged import PagedKV
from kvforge.storage.pagedquant import PagedQuantKV
from kvforge.store import LocalStore, RedisStore

log = logging.getLogger(__name__)

PREFILL_BATCH = 4  # prompts whose chunks share one forward
MAX_POLICIES = 32  # policies built for distinct KV settings, kept for reuse (least recently used go)


class QueueFull(Exception):
    """The engine's waiting queue is at its limit (`max_waiting`): try again later."""


def shared_tokens(a: list[int], b: list[int], chunk: int) -> int:
    """How many tokens `a` and `b` begin with alike (compared a chunk at a time, then by token)."""
    n, end = 0, min(len(a), len(b))
    while n + chunk <= end and a[n : n + chunk] == b[n : n + chunk]:
        n += chunk
    while n < end and a[n] == b[n]:
        n += 1
    return n


def settings_policy(kv: KVSettings) -> Policy:
    """The policy a KV setting names (raises ValueError naming what is wrong)."""
    return kv.build()


@dataclass
class Prefilling:
    request: Request
    cache: KVCache
    done: int = 0  # tokens fed so far
    logits: torch.Tensor | None = None  # (vocab,) after the last chunk
    tokens: list[int] = field(default_factory=list)  # what to prefill: the prompt, or prompt + generated when recomputing

    def __post_init__(self) -> None:
        self.tokens = self.tokens or self.request.prompt

    @property
    def recomputing(self) -> bool:
        return self.tokens is not self.request.prompt


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
    failed: int = 0  # requests ended by an error inside the engine
    isolated: int = 0  # requests recomputed alone after a batched step failed
    preempted: int = 0  # requests whose memory was taken back to make room (recomputed later)


class Engine:
    """`kv_memory` bounds the K/V bytes of everything (None: no bound); `prefix_memory` bounds the
    kept prefixes alone (None: only `kv_memory` does); `max_waiting` bounds the requests waiting
    for admission (`submit` raises QueueFull beyond it); `policies` builds a KV setting's policy."""

    def __init__(
        self, loaded: LoadedModel, defaults: KVSettings, kv_memory: int | None = None, prefill_chunk: int = 256,
        *, prefix_memory: int | None = None, max_waiting: int | None = None,
        policies: Callable[[KVSettings], Policy] = settings_policy, store: LocalStore | RedisStore | None = None,
        blend_share: float = DEFAULT_SHARE,
    ) -> None:  # fmt: skip
        if prefill_chunk < 1:
            raise ValueError(f"--prefill-chunk {prefill_chunk} must be at least 1")
        if max_waiting is not None and max_waiting < 1:
            raise ValueError(f"--max-queued {max_waiting} must be at least 1")
        self.loaded, self.defaults, self.kv_memory, self.prefill_chunk = loaded, defaults, kv_memory, prefill_chunk
        self.prefix_memory, self.max_waiting, self.build_policy = prefix_memory, max_waiting, policies
        check_share(blend_share)
        self.blend_share = blend_share  # of a request's stored documents' tokens, computed again
        self.vocab_size = int(loaded.model.get_input_embeddings().num_embeddings)
        text = loaded.model.config.get_text_config()
        self.shape = Shape(text.num_hidden_layers, text.num_key_value_heads, head_dim(loaded.model), loaded.model.dtype)
        device = loaded.model.device
        # The one owner of full-precision K/V: bounded by kv_memory, else growing on demand.
        # A server that reads less keeps key summaries beside its blocks, inside the budget.
        summaries = summary_block_nbytes(defaults, self.shape.head_dim)
        self.memory = (
            KVMemory(self.shape.head_dim, self.shape.dtype, device, keeps=True)
            if kv_memory is None
            else KVMemory.of_bytes(kv_memory, self.shape.head_dim, self.shape.dtype, device, summary_nbytes=summaries)
        )
        self.stop_ids = stop_ids(loaded.tokenizer)
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[Prefilling] = deque()
        # Running groups by KV setting; an isolated request decodes in a group of its own (its id).
        self.groups: dict[tuple[KVSettings, int | None], Group] = {}
        self.block_index = BlockIndex(self.memory, fingerprint(loaded.model))
        # Kept prefixes also go to a persistent store, and requests start from what it holds.
        self.stored = StoreTier(store, fingerprint(loaded.model), self.shape.dtype, prefill_chunk) if store is not None else None
        # Every admitted request not yet ended, wherever it is (a turn that fails ends them all).
        self.live: dict[int, Request] = {}
        self.policies: OrderedDict[KVSettings, Policy] = OrderedDict()
        self.policies_lock = threading.Lock()  # built from request threads and the engine thread
        self.prefixes = PrefixCache(prefill_chunk)
        self.stats = Stats()
        self.wake = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.published: dict[str, float] = {}

    # --- from other threads ------------------------------------------------------------------

    def policy(self, kv: KVSettings) -> Policy:
        """The policy of a KV setting (raises ValueError naming what is wrong). The most recently
        used MAX_POLICIES are kept, so clients naming ever new ratios cannot grow the server."""
        with self.policies_lock:
            if kv in self.policies:
                self.policies.move_to_end(kv)
                return self.policies[kv]
        policy = self.build_policy(kv)
        with self.policies_lock:
            self.policies[kv] = policy
            while len(self.policies) > MAX_POLICIES:
                self.policies.popitem(last=False)
        return policy

    def check(self, request: Request) -> None:
        """Refuse what can never run: an empty prompt, a token id outside the vocabulary, a prompt
        beyond the model's window, a request larger than the whole budget, an unknown policy, a
        policy whose calibration is missing, a quantization that does not fit the model
        (ValueError, naming the value)."""
        if not request.prompt:
            raise ValueError("the prompt is empty (0 tokens); send at least one token")
        low, high = min(request.prompt), max(request.prompt)
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the model's vocabulary [0, {self.vocab_size - 1}]")
        policy = self.policy(request.kv)
        if policy.needs_calibration:
            try:
                require_calibration(fingerprint(self.loaded.model), policy.full_name)
            except ValueError as err:  # its message names this machine's paths: for the log only
                log.warning("%s", err)
                raise ValueError(
                    f"policy {policy.full_name!r} needs the model's calibration, which this server does not have; "
                    f"choose another kv_policy, or ask the operator to run `kvforge calibrate`"
                ) from None
        request.kv.quant.check_head_dim(self.shape.head_dim)
        window = self.loaded.context_length
        if window is not None and len(request.prompt) + request.params.max_tokens > window:
            raise ValueError(
                f"prompt of {len(request.prompt)} tokens + max_tokens {request.params.max_tokens} exceeds the model's "
                f"context window of {window} tokens; shorten the prompt or lower max_tokens"
            )
        need = self.reservation(request)
        if self.memory.bounded and need > self.memory.capacity_nbytes:
            raise ValueError(
                f"this request may need {need / 2**20:.1f} MiB of KV cache, more than the server's whole memory of "
                f"{self.memory.capacity_nbytes / 2**20:.1f} MiB (--kv-memory); shorten it, lower max_tokens, or ask for compression"
            )

    def check_defaults(self) -> None:
        """Refuse server defaults that no request could run with (ValueError)."""
        self.defaults.quant.check_head_dim(self.shape.head_dim)
        self.policy(self.defaults)

    def reservation(self, request: Request) -> int:
        return reservation(
            self.shape, request.kv, len(request.prompt), request.params.max_tokens, self.prefill_chunk, self.memory.block_size
        )

    def submit(self, request: Request) -> None:
        """Queue a checked request (ValueError: it can never run; QueueFull: try again later)."""
        self.check(request)
        with self.wake:
            waiting = self.queued()
            if self.max_waiting is not None and waiting >= self.max_waiting:
                raise QueueFull(f"{waiting} requests are already waiting (the limit); try again shortly")
            self.waiting.append(request)
            self.wake.notify()

    def queued(self) -> int:
        """Requests waiting for admission (those whose clients hung up do not count)."""
        return sum(1 for r in list(self.waiting) if not r.cancelled)

    def cancel(self, request: Request) -> None:
        """Stop a request (its client went away): its memory is freed at the engine's next turn."""
        with self.wake:
            request.cancelled = True
            self.wake.notify()

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="kvforge-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop the engine thread after its current step; requests still in it end as cancelled."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None:
            self.thread.join()
        if self.stored is not None:
            self.stored.close()  # what was queued for the store is written first

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
        pool = self.memory.pool
        self.published = {
            "running": sum(len(g.requests) for g in self.groups.values()),
            "prefilling": len(self.prefilling),
            "waiting": self.queued(),
            "kv_allocated_bytes": allocated,
            "kv_kept_bytes": sum(c.kept_nbytes for c in self.caches()),
            "kv_reserved_bytes": 0,  # nothing is set aside any more: quantized caches are paged too
            "kv_peak_bytes": self.stats.peak_bytes,
            "kv_budget_bytes": self.kv_memory or 0,
            "prefix_cache_entries": len(self.prefixes),
            "prefix_cache_bytes": self.prefixes.nbytes,
            "kv_blocks_used": pool.num_used,
            "kv_blocks_shared": pool.num_shared,
            "kv_blocks_free": pool.num_free,
            "kv_block_size": self.memory.block_size,
            "kv_pool_capacity_bytes": self.memory.capacity_nbytes,
        }

    # --- the engine thread -------------------------------------------------------------------

    def run(self) -> None:
        with torch.inference_mode():
            while not self.stopping:
                try:
                    self._turn()
                except Exception as err:  # a bug outside any request's step: fail what is in flight, never hang
                    log.exception("engine turn failed")
                    with self.wake:
                        self._fail_all(f"{type(err).__name__}: {err}")
            with self.wake:
                self._cancel_all()

    def _turn(self) -> None:
        """Admit what fits, then one prefill chunk and one decoding step for every group."""
        with self.wake:
            self._admit()
            self._publish()
            if not (self.prefilling or any(g.requests for g in self.groups.values()) or self.waiting):
                self.wake.wait(timeout=0.5)
                return
        self._drop_cancelled()
        self._prefill_step()
        for group in list(self.groups.values()):
            if group.requests:
                self._decode_step(group)
        self._publish()

    def _admit(self) -> None:
        """Waiting -> prefilling, in arrival order, while reservations fit (caller holds the lock)."""
        for request in [r for r in self.waiting if r.cancelled]:  # hung up while waiting: they hold no place
            self.waiting.remove(request)
            self._end(request, "cancelled")
        for request in list(self.waiting):
            if self._behind(request):
                continue  # it starts once the prompt it shares chunks with has computed them
            if not self._admissible(request):
                return  # it waits for memory to be freed (the first in the queue goes first)
            self.waiting.remove(request)
            self.live[request.id] = request
            try:
                self.prefilling.append(self._started(request))
            except Exception as err:  # a calibration deleted since submit, memory the device lacks, ...
                log.exception("request %d could not start", request.id)
                self._end(request, "error", f"{type(err).__name__}: {err}")

    def _behind(self, request: Request) -> bool:
        """Whether a prompt being prefilled with the same settings begins with at least a chunk
        of `request`'s tokens and has not computed all it shares yet. `request` then waits and
        starts from them (blocks, or the prefix kept), instead of computing the same tokens beside
        it: 16 questions arriving at once on a new document cost one prefill of it, not 16.
        Prompts sharing less than a chunk (a chat template's opening) do not wait."""
        if request.generated or request.documents:  # resumed after preemption, or blended
            return False
        for item in self.prefilling:
            if item.request.kv == request.kv and not item.recomputing:
                shared = shared_tokens(item.tokens, request.prompt[:-1], self.prefill_chunk)  # one token left to prefill
                if shared >= self.prefill_chunk and item.done < shared:
                    return True
        return False

    def _admissible(self, request: Request) -> bool:
        """Whether the pool can start `request` now (kept prefixes give way, the oldest unused
        first; nothing running is preempted for a newcomer)."""
        if not self.memory.bounded:
            return True
        need = self._prompt_blocks(request.kv, len(request.prompt) + len(request.generated))
        return self._free_blocks(need, self._promised() + self._watermark())

    def _prompt_blocks(self, kv: KVSettings, tokens: int) -> int:
        return prompt_blocks(self.shape, kv, tokens, self.prefill_chunk, self.memory.block_size, self.memory.block_nbytes)

    def _watermark(self) -> int:
        """Blocks kept free for the running requests' next step (each row may start a block):
        a newcomer admitted into the last of them would only be preempted again at once."""
        running = sum(len(g.requests) for g in self.groups.values())
        return running * self.shape.layers * self.shape.kv_heads

    def _promised(self) -> int:
        """Blocks the prompts being prefilled will still take: the rest of each as kept."""
        return sum(self._prompt_blocks(p.request.kv, len(p.tokens) - p.done) for p in self.prefilling)

    def _free_blocks(self, need: int, promised: int = 0) -> bool:
        """Whether `need` blocks are free beside `promised` ones, after dropping kept prefixes."""
        while self.memory.pool.num_free - promised < need:
            if not self.prefixes.evict_one():
                return False
        return True

    def _started(self, request: Request) -> Prefilling:
        """A request's prefill: from a kept prefix of its prompt when there is one. A preempted
        request prefills its prompt and what it generated before (recomputed, as vLLM does)."""
        tokens = request.prompt + request.generated if request.generated else request.prompt
        hit = self.prefixes.lookup(request.kv, request.prompt)
        if reusable(request.kv):
            found = self._from_blocks(request.kv, tokens)
            if found is not None and (hit is None or found[1] > hit[1]):
                hit = found
        if request.documents and self.stored is not None and (hit is None or hit[1] < request.documents[-1][1]):
            cache = self._new_cache(request.kv)  # stored documents, wherever they sit in the prompt
            done = self.stored.blend(self.loaded, request.kv, tokens, request.documents, cache, self.blend_share)
            hit = (cache, done) if done else hit
        if hit is None and self.stored is not None:
            cache = self._new_cache(request.kv)
            done = self.stored.find(request.kv, tokens, cache)
            if done:
                hit = cache, done
                self._share_found(request.kv, tokens[:done], cache)
        if hit is None:
            return Prefilling(request, self._new_cache(request.kv), tokens=tokens)
        cache, done = hit
        request.reused_tokens = done
        self.stats.prefix_hits += 1
        self.stats.prefix_reused_tokens += done
        return Prefilling(request, cache, done, tokens=tokens)

    def _share_found(self, kv: KVSettings, tokens: list[int], cache: KVCache) -> None:
        """A prefix read from the store is found in memory from now on, as one prefilled here is
        (its blocks marked, or a fork kept), so the requests after it, those admitted with it
        included, share its blocks instead of each reading and holding a copy."""
        if not reusable(kv):
            self._keep_prefix(kv, tokens, cache)
            return
        try:
            self.block_index.mark(kv, tokens, cache)
        except Exception:  # blocks found again later are an optimisation: fail no one for it
            log.exception("marking the blocks of a prefix read from the store failed")

    def _from_blocks(self, kv: KVSettings, tokens: list[int]) -> tuple[KVCache, int] | None:
        """A cache starting from the blocks that already hold a prefix of `tokens` (`blocks.py`)."""
        found = self.block_index.find(kv, tokens, self.shape.layers, self.shape.kv_heads)
        if found is None:
            return None
        tables, done = found
        cache = self._new_cache(kv)
        device = self.loaded.model.device
        for layer, table in zip(cache.layers, tables):
            layer.start_from(PagedKV.over_blocks(table, done, self.memory, device), done)
        return cache, done

    def _new_cache(self, kv: KVSettings) -> KVCache:
        """Paged over the engine's memory (quantized: codes and tail in its blocks)."""
        return KVCache(
            self.loaded.model, self.policy(kv), tokenizer=self.loaded.tokenizer, quant=kv.quant, layout="paged", memory=self.memory
        )

    # --- making room -------------------------------------------------------------------------

    def _step_blocks(self, cache: KVCache | None, tokens: int, kv: KVSettings) -> int:
        """Blocks appending `tokens` to every row of `cache` takes from the pool (its last blocks'
        copies included, and for a quantized cache the groups it may seal); a fresh cache's rows
        take that many entries' worth."""
        if cache is None or cache.layers[0].storage is None:
            if kv.quant.enabled:
                return self._prompt_blocks(kv, tokens)
            return self.shape.layers * self.shape.kv_heads * (row_blocks(tokens, self.memory.block_size) + 1)
        return sum(l.storage.blocks_to_append(tokens) for l in cache.layers if isinstance(l.storage, (PagedKV, PagedQuantKV)))

    def _make_room(self, need: Callable[[], int], keep: Request) -> bool:
        """Free blocks until `need()` of them are free: kept prefixes go first, then the requests
        admitted after `keep`, the most recent first, are preempted (an older request is never
        preempted for a newer one). False when even that is not enough."""
        while self.memory.bounded and self.memory.pool.num_free < need():
            if self.prefixes.evict_one():
                continue
            admitted = list(self.live)  # request ids in admission order
            newer = admitted[admitted.index(keep.id) + 1 :] if keep.id in self.live else []
            if not newer:
                return False
            self._preempt(self.live[newer[-1]])
        return True

    def _preempt(self, request: Request) -> None:
        """Take back `request`'s memory: it leaves wherever it is and goes back to the head of the
        queue, to be recomputed from its tokens so far when memory allows."""
        log.info("preempting request %d (%d tokens generated) to free KV memory", request.id, len(request.generated))
        self.prefilling = deque(p for p in self.prefilling if p.request is not request)
        for group in list(self.groups.values()):
            if request in group.requests:
                self._leave(group, [request], "")
        self._requeue([request])

    def _requeue(self, requests: list[Request]) -> None:
        with self.wake:
            for request in reversed(requests):
                self.live.pop(request.id, None)
                self.stats.preempted += 1
                self.waiting.appendleft(request)

    def _drop_cancelled(self) -> None:
        for item in [p for p in self.prefilling if p.request.cancelled]:
            self.prefilling.remove(item)
            self._end(item.request, "cancelled")
        for group in list(self.groups.values()):
            self._leave(group, [r for r in group.requests if r.cancelled], "cancelled")

    def _prefill_batch(self) -> list[Prefilling]:
        """The prompts whose next chunks go in one forward: up to PREFILL_BATCH with the oldest
        one's KV settings, all just started or all under way (an empty cache cannot be stacked);
        an isolated request goes alone."""
        head = self.prefilling[0]
        if head.request.isolated:
            return [head]
        kv, fresh = head.request.kv, head.done == 0
        same = [p for p in self.prefilling if not p.request.isolated and p.request.kv == kv and (p.done == 0) == fresh]
        return same[:PREFILL_BATCH]

    def _prefill_step(self) -> None:
        """One chunk for each prompt of `_prefill_batch`, in one forward (their caches stacked for
        it, then split again): batching the chunks of several prompts costs much less than running
        them one by one."""
        if not self.prefilling:
            return
        items = self._prefill_batch()
        head = items[0]

        def need() -> int:
            return sum(self._step_blocks(p.cache, self.prefill_chunk, p.request.kv) for p in items if p in self.prefilling)

        if not self._make_room(need, head.request):
            if len(self.live) > 1:
                return  # older requests hold the memory: this chunk waits for them to finish
            self.prefilling.remove(head)
            self._end(head.request, "error", "the prompt needs more KV memory than the server has (--kv-memory)")
            return
        items = [p for p in items if p in self.prefilling]
        if not items:
            return
        kv = items[0].request.kv
        rows = [p.tokens[p.done : p.done + self.prefill_chunk] for p in items]
        positions = torch.tensor([p.done for p in items])
        try:
            if len(items) == 1:
                logits, _ = feed(self.loaded.model, items[0].cache, rows, positions, PREFILL)
            else:
                batch = self._new_cache(kv) if items[0].done == 0 else KVCache.stack([p.cache for p in items], take=True)
                logits, _ = feed(self.loaded.model, batch, rows, positions, PREFILL)
                for b, item in enumerate(items):
                    item.cache = batch.select([b])
        except Exception as err:
            self._step_failed([p.request for p in items], err, "prefill")
            return
        for item, row, row_logits in zip(items, rows, logits):
            if item not in self.prefilling:  # preempted while keeping another's prefix
                continue
            if reusable(kv):
                try:
                    self.block_index.mark(kv, item.tokens[: item.done + len(row)], item.cache, since=item.done)
                except Exception:  # blocks found again later are an optimisation: fail no one for it
                    log.exception("marking the blocks of request %d failed", item.request.id)
            item.done += len(row)
            item.logits = row_logits
            if item.done < len(item.tokens):
                self._maybe_keep_prefix(item)
                continue
            self.prefilling.remove(item)
            self._start_decoding(item)

    def _maybe_keep_prefix(self, item: Prefilling) -> None:
        """Keep a fork of a prompt's cache at its prefix boundary, within the memory limits.
        Counted as a copy: the request it comes from copies what it writes next."""
        prompt = item.request.prompt
        if item.recomputing or item.done != self.prefixes.boundary(len(prompt)):
            return
        tokens = prompt[: item.done]
        if self._keep_prefix(item.request.kv, tokens, item.cache) and self.stored is not None:
            self.stored.keep(item.request.kv, tokens, item.cache)

    def _keep_prefix(self, kv: KVSettings, tokens: list[int], cache: KVCache) -> bool:
        """Keep a fork of `cache` (holding `tokens`) among the prefixes, the oldest giving way
        beyond --prefix-memory; False when it is larger than that memory or keeping failed."""
        if self.prefix_memory is not None and cache.nbytes > self.prefix_memory:
            return False
        try:
            self.prefixes.keep(kv, tokens, cache)
        except Exception:  # a cache kept for later is an optimisation: fail no one for it
            log.exception("keeping a prefix of %d tokens failed", len(tokens))
            return False
        while self.prefix_memory is not None and self.prefixes.nbytes > self.prefix_memory:
            self.prefixes.evict_one()
        return True

    def _start_decoding(self, item: Prefilling) -> None:
        """A prompt is in: sample its first token and join the running batch of its settings."""
        assert item.logits is not None
        request = item.request
        if not item.recomputing:
            self.stats.prompt_tokens += len(request.prompt)
        token, reason = self._advance(request, item.logits)
        if token is None:
            return
        if reason is not None:
            self._end(request, reason)
            return
        group = self.groups.setdefault((request.kv, request.id if request.isolated else None), Group())
        try:
            group.cache = item.cache if group.cache is None else KVCache.stack([group.cache, item.cache], take=True)
        except Exception as err:  # the group's cache may be consumed: every request in it starts again
            self._drop_group(group)
            self._step_failed([*group.requests, request], err, "join", blame=False)
            return
        group.requests.append(request)
        group.next_tokens.append(token)
        group.positions = torch.cat([group.positions, torch.tensor([len(item.tokens)])])
        self.stats.peak_running = max(self.stats.peak_running, sum(len(g.requests) for g in self.groups.values()))

    def _advance(self, request: Request, logits: torch.Tensor) -> tuple[int | None, str | None]:
        """Sample `request`'s next token from logits (vocab,) and deliver its text: the token and
        the finish reason, if any. A failure here is this request's alone: it ends with an error
        (token None) and the caller drops it."""
        try:
            token = sample(logits, request.params, request.generator)
            self.stats.generated_tokens += 1
            return token, request.add(token, self.loaded.tokenizer, self.stop_ids)
        except Exception as err:
            log.exception("request %d failed while sampling or detokenizing", request.id)
            self._end(request, "error", f"{type(err).__name__}: {err}")
            return None, None

    def _decode_step(self, group: Group) -> None:
        assert group.cache is not None
        # Room for one more entry in every row; when there is none, newer requests give theirs back
        # (this group's included); if even that is not enough the step runs and, should the pool
        # run dry in it, its requests are recomputed later (`_step_failed`).
        admitted = list(self.live)
        kv = group.requests[0].kv
        self._make_room(lambda: self._step_blocks(group.cache, 1, kv), min(group.requests, key=lambda r: admitted.index(r.id)))
        if not group.requests or group.cache is None:
            return
        try:
            logits, group.positions = feed(self.loaded.model, group.cache, [[t] for t in group.next_tokens], group.positions, DECODE)
        except Exception as err:
            self._drop_group(group)
            self._step_failed(group.requests, err, "decode")
            return
        leaving: list[tuple[Request, str]] = []
        for b, request in enumerate(group.requests):
            token, reason = self._advance(request, logits[b])
            if token is None:  # it failed and has ended; it leaves the batch without a second end
                leaving.append((request, ""))
                continue
            group.next_tokens[b] = token
            if reason is not None:
                leaving.append((request, reason))
        for request, reason in leaving:
            self._leave(group, [request], reason)

    def _step_failed(self, requests: list[Request], err: Exception, step: str, blame: bool = True) -> None:
        """A step over `requests` raised; their caches may be half-written. One request (when
        `blame`: the step was its own): it fails alone. Otherwise each is isolated and recomputed
        from its tokens on a fresh cache (see the module docstring), ahead of the other prompts."""
        ids = ", ".join(str(r.id) for r in requests)
        self.prefilling = deque(p for p in self.prefilling if p.request not in requests)
        if isinstance(err, OutOfBlocks):  # the pool ran dry inside the step: no one's fault
            log.info("%s step of requests %s ran out of KV blocks (%s); recomputing them when memory allows", step, ids, err)
            self._requeue(requests)
            return
        if len(requests) == 1 and blame:
            log.error("%s step of request %s failed: %s: %s", step, ids, type(err).__name__, err, exc_info=err)
            self._end(requests[0], "error", f"{type(err).__name__}: {err}")
            return
        log.warning("%s step of requests %s failed (%s: %s); recomputing each alone", step, ids, type(err).__name__, err)
        for request in reversed(requests):
            request.isolated = True
            self.stats.isolated += 1
            try:
                cache = self._new_cache(request.kv)
            except Exception as new_err:
                self._end(request, "error", f"{type(new_err).__name__}: {new_err}")
                continue
            tokens = request.prompt + request.generated if request.generated else request.prompt
            self.prefilling.appendleft(Prefilling(request, cache, tokens=tokens))

    def _drop_group(self, group: Group) -> None:
        for key in [k for k, g in self.groups.items() if g is group]:
            del self.groups[key]

    def _leave(self, group: Group, leaving: list[Request], reason: str) -> None:
        """`leaving` leave the batch; each ends with `reason` ("": it has ended already)."""
        if not leaving:
            return
        keep = [b for b, r in enumerate(group.requests) if r not in leaving]
        group.requests = [group.requests[b] for b in keep]
        group.next_tokens = [group.next_tokens[b] for b in keep]
        group.positions = group.positions[keep]
        assert group.cache is not None
        try:
            group.cache = group.cache.select(keep) if keep else None
        except Exception as err:  # the group's cache may be consumed: those staying start again
            self._drop_group(group)
            self._step_failed(group.requests, err, "leave", blame=False)
            keep = []
        if not keep:  # settings no request runs with any more hold no group (their number is the clients')
            self._drop_group(group)
        for request in leaving:
            if reason:
                self._end(request, reason)

    def _end(self, request: Request, reason: str, error: str | None = None) -> None:
        self.live.pop(request.id, None)
        if reason == "cancelled":
            self.stats.cancelled += 1
        elif reason == "error":
            self.stats.failed += 1
        else:
            self.stats.completed += 1
        request.finish(reason, error)

    def _fail_all(self, error: str) -> None:
        """Every admitted request ends with `error` (caller holds the lock); those waiting stay."""
        for request in list(self.live.values()):
            self._end(request, "error", error)
        self.prefilling.clear()
        self.groups.clear()

    def _cancel_all(self) -> None:
        """The engine stops: whatever is still in it ends as cancelled (caller holds the lock)."""
        for request in list(self.waiting) + list(self.live.values()):
            self._end(request, "cancelled")
        self.waiting.clear()
        self.prefilling.clear()
        self.groups.clear()
