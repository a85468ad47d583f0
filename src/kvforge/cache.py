"""The transformers `Cache` subclass: per-layer storage driven by a compression policy.

Invariant: `get_seq_length()` is the *logical* number of tokens the model has seen (padding
included, evicted tokens included), which is what transformers derives positions and mask sizes
from. What is physically held is `storage.lengths`, smaller after compression.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, CacheLayerMixin

from kvforge.attention import ATTN_NAME, tag_layer
from kvforge.reading import all_real, attend_at, every_real, probe_attention
from kvforge.calibration import Calibration, fingerprint, require_calibration
from kvforge.calibration.lowrank import require_bases
from kvforge.policies.base import Policy, StepContext
from kvforge.memory import OutOfBlocks
from kvforge.memory.kvmemory import KVMemory
from kvforge.storage.paged import PagedKV, SwappedPaged
from kvforge.storage.pagedquant import PagedQuantKV, SwappedQuant
from kvforge.storage import DEFAULT_LAYOUT, Basis, KVStorage, QuantSpec, check_layout, make_storage
from kvforge.storage.base import PaddedView
from kvforge.storage.pageread import PageReader, reads_every_page


PREFILL, APPEND, DECODE, PROBE = "prefill", "append", "decode", "probe"
SELECT, REFRESH = "select", "refresh"  # CacheBlend's passes over spliced documents (kvforge.blend)


@dataclass
class Probe:
    """What a reconstruction pass (mode "probe") scores: the context span it repeats, per sequence."""

    start: torch.Tensor  # (batch,) first logical position of the span
    end: torch.Tensor  # (batch,) one past its last position
    sinks: int  # each sequence's first `sinks` held entries are in every score's softmax
    name: str  # policy state (aux) that keeps the highest score each entry got
    score: str = "attention"  # what a pass scores: see `Reconstruction.score`


@dataclass
class Blend:
    """What CacheBlend's passes over documents spliced into a cache read (modes "select" and
    "refresh"): their tokens sit at `positions`, already counted in the cache's length."""

    positions: torch.Tensor  # (T,) logical positions of the chunk's tokens, ascending, not contiguous
    check_layer: int = 1  # "select": the layer whose K/V deviation picks the tokens to refresh
    deviation: torch.Tensor | None = None  # (T,) set by the check layer: how far each token's V moved


class Selected(Exception):
    """Raised by the check layer of a "select" pass: the deviation is measured, the layers after
    it need not run (the pass stores nothing)."""


@dataclass
class Phase:
    """Shared by a cache's layers: what the next forward chunks are.

    - "prefill": prompt chunks the policy compresses (to its ratio of the tokens seen so far,
      or its budget) right after each chunk's attention;
    - "append": prompt chunks stored as they are (the question, in the question-agnostic setting);
    - "decode": generated tokens; the decoding budget holds;
    - "probe": a pass that reads the cache and is not stored, scoring what is held (`probe`
      says what; KVzip's reconstruction of the context);
    - "select": spliced documents' tokens read what is held up to `blend.check_layer`, where their
      new values are compared with the held ones; nothing is stored (CacheBlend's selection);
    - "refresh": some of those tokens computed again with what precedes them in the prompt; their
      new entries replace the held ones, in the rows that held them (CacheBlend's recompute).

    None infers it from the chunk (one token: decode; more: prefill), which is what
    `model.generate` needs, chunked prefill included. kvforge's own loops set it explicitly."""

    mode: str | None = None
    probe: Probe | None = None
    blend: Blend | None = None


@dataclass
class HeldBytes:
    """K/V bytes allocated by a cache's layers, and the most held at once.

    Layers report after each append and each compaction, so `peak` is the largest sum over layers
    between operations (the transient old + new buffers of one row while it grows are not seen)."""

    per_layer: dict[int, int] = field(default_factory=dict)
    total: int = 0
    peak: int = 0

    def update(self, layer_idx: int, nbytes: int) -> None:
        self.total += nbytes - self.per_layer.get(layer_idx, 0)
        self.per_layer[layer_idx] = nbytes
        self.peak = max(self.peak, self.total)


@dataclass
class PrefillRecord:
    """The prefill chunk's queries, kept so other policies can be derived from one full prefill."""

    query: torch.Tensor  # (batch, q_heads, T, head_dim)
    positions: torch.Tensor  # (T,)
    valid: torch.Tensor  # (batch, T) bool
    scaling: float


log = logging.getLogger(__name__)


class KVForgeLayer(CacheLayerMixin):
    """One attention layer's cache: stores each chunk, attends over it, then lets the policy act."""

    is_sliding = False

    def __init__(
        self, layer_idx: int, num_layers: int, policy: Policy, phase: Phase, held: HeldBytes, layout: str, quant: QuantSpec,
        memory: KVMemory | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.layer_idx, self.num_layers = layer_idx, num_layers
        self.policy = policy
        self.phase = phase
        self.held = held
        self.layout, self.quant, self.memory = layout, quant, memory
        self.basis: Basis | None = None  # the model's, for a low-rank quantization (quant.rank)
        self.storage: KVStorage | None = None
        self.seen = 0  # logical tokens seen, padding included
        self.chunks = 0  # forward chunks processed
        self.decode_budget: torch.Tensor | None = None  # (batch, kv_heads), set at the first decode step
        self.quiet_steps = 0  # decoding steps before any row can reach its eviction point
        self.pending = False  # update() ran and attend() has not yet
        # (batch,) real tokens ever stored per sequence: what an uncompressed cache would hold now
        self.tokens: torch.Tensor | None = None
        self.policy_seconds = 0.0  # time spent observing and compressing, for benchmarks
        self.record_prefill = False
        self.prefill_record: PrefillRecord | None = None
        self.calibration: Calibration | None = None  # the model's, when the policy needs it
        self.policy_state: dict[str, torch.Tensor] = {}  # per-layer values a policy keeps (StepContext.state)
        self.reader: PageReader | None = None  # decoding steps read some pages only (quant.read), from the first

    def page_reader(self, batch: int) -> PageReader:
        """A fresh reader of `batch` sequences for this layer's decoding steps (quant.read is set)."""
        assert self.quant.read is not None
        return PageReader(self.quant.reader, self.quant.read, batch, dense=reads_every_page(self.layer_idx, self.num_layers))

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.storage = make_storage(
            self.layout, batch, heads, dim, key_states.dtype, key_states.device, self.policy.aux_names, self.quant, self.memory,
            self.basis,
        )
        self.tokens = torch.zeros(batch, dtype=torch.int64)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # keys: (batch, kv_heads, T, head_dim). Storing waits for attend(): only the attention
        # function sees the padding mask, and padding must not be stored.
        if self.pending:
            raise RuntimeError(
                f"kvforge cache layer {self.layer_idx} was updated twice without kvforge attention running; "
                f"call kvforge.enable(model) (attention implementation {ATTN_NAME!r}) before generating"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending = True
        tag_layer(key_states, self)
        return key_states, value_states

    def attend(
        self,
        query: torch.Tensor,  # (batch, q_heads, T, head_dim)
        keys: torch.Tensor,  # (batch, kv_heads, T, head_dim)
        values: torch.Tensor,  # (batch, kv_heads, T, head_dim)
        new_valid: torch.Tensor,  # (batch, T) bool
        scaling: float,
        out_proj: torch.Tensor | None = None,  # (hidden, q_heads * head_dim): for output-aware scores
    ) -> torch.Tensor:  # (batch, q_heads, T, head_dim)
        assert self.storage is not None and self.tokens is not None
        self.pending = False
        t = keys.shape[2]
        mode = self.phase.mode or (DECODE if t == 1 else PREFILL)
        if mode == PROBE:
            return self._probe(query, keys, values, new_valid, scaling, out_proj)
        if mode in (SELECT, REFRESH):
            return self._blend(mode, query, keys, values, scaling)
        if mode == PREFILL and self.policy.defers and self.phase.mode is None:
            raise ValueError(
                f"policy {self.policy.full_name!r} compresses a prompt chunk once it has passed every layer "
                f"(kvzip: and its extra passes), which model.generate() cannot drive: prefill with "
                f"kvforge.prefill(model, cache, ids) first, then generate from that cache"
            )
        positions = torch.arange(self.seen, self.seen + t, device=keys.device)
        # A chunk compressed at once is stored without spare room; otherwise rows grow
        # geometrically, so appends (decoding steps, uncompressed prompt chunks) are amortized.
        exact = mode == PREFILL and self.policy.compresses_prompt
        if self.layer_idx == 0 and t > 1:
            self.storage.expect(t, self.num_layers)  # every layer will append this chunk
        self.storage.append(keys, values, positions, new_valid, exact=exact)
        # (batch,) tokens stored per sequence: known on the host when the chunk has no padding.
        added = torch.full((keys.shape[0],), t) if every_real(new_valid) else new_valid.sum(1).cpu()
        self.tokens += added
        self.held.update(self.layer_idx, self.storage.allocated_nbytes)
        # A decoding step takes the attention policy state out of the attention itself; a prompt
        # chunk observes it apart (timed as the policy's).
        fused = self.policy.attention_state if t == 1 else None
        if mode == DECODE and t == 1 and self.quant.read is not None:
            if self.reader is None:
                self.reader = self.page_reader(keys.shape[0])
            out = self.reader.attend(self.storage, query, positions, new_valid, scaling, accumulate=fused)
        else:
            out = self.storage.attend(query, positions, new_valid, scaling, accumulate=fused)
        self._act(query, positions, new_valid, scaling, mode, added, attended=fused is not None)
        recording = self.record_prefill and self.chunks == 0
        if recording:
            self.prefill_record = PrefillRecord(query, positions, new_valid, scaling)
        # A recorded prefill stays as it was stored until each derived cache compresses it; a
        # deferring policy's chunk waits for its compression (KVCache.compress).
        if not recording and not (mode == PREFILL and self.policy.defers):
            self.seal(query, positions, new_valid, scaling, prompt=mode == PREFILL)
        self.seen += t
        self.chunks += 1
        return out

    def _probe(
        self,
        query: torch.Tensor,  # (batch, q_heads, T, head_dim)
        keys: torch.Tensor,  # (batch, kv_heads, T, head_dim)
        values: torch.Tensor,  # (batch, kv_heads, T, head_dim)
        new_valid: torch.Tensor,  # (batch, T)
        scaling: float,
        out_proj: torch.Tensor | None = None,  # (hidden, q_heads * head_dim)
    ) -> torch.Tensor:
        """A probe chunk: attend over what is held plus the chunk, store nothing, and raise each
        scored entry's policy state to the highest score it got (see `Probe`)."""
        assert self.storage is not None and self.phase.probe is not None
        start = time.perf_counter()
        probe = self.phase.probe
        view = self.storage.view()
        pos = view.positions
        span = (pos >= probe.start[:, None, None]) & (pos < probe.end[:, None, None])
        first = pos.masked_fill(~view.valid, torch.iinfo(pos.dtype).max).amin(dim=(1, 2))  # (batch,)
        scored = view.valid & (span | (pos < (first + probe.sinks)[:, None, None]))
        out, best = probe_attention(
            query, view.keys, view.values, view.valid, scored, keys, values, new_valid, scaling, score=probe.score,
            out_proj=out_proj,
        )
        old = view.aux[probe.name]
        # Scored entries stay above 0 (an entry at 0 was never scored; see kvzip).
        self.storage.add_aux(probe.name, view, (best.clamp_min(1e-30) - old).clamp(min=0) * span)
        self.policy_seconds += time.perf_counter() - start
        return out

    def _blend(
        self,
        mode: str,
        query: torch.Tensor,  # (1, q_heads, T, head_dim)
        keys: torch.Tensor,  # (1, kv_heads, T, head_dim)
        values: torch.Tensor,  # (1, kv_heads, T, head_dim)
        scaling: float,
    ) -> torch.Tensor:
        """A "select" or "refresh" chunk (see `Phase`): its tokens are already counted in `seen`
        and sit among the held entries, so attention reads a picture of what is held, causal
        by position (a layout's own reader takes the chunk to be the newest entries)."""
        assert self.storage is not None and self.phase.blend is not None
        blend = self.phase.blend
        positions = blend.positions
        if mode == SELECT and self.layer_idx == blend.check_layer:
            _, old, held = held_at(self.storage.view(), positions)  # (1, kv_heads, T, dim), (1, kv_heads, T)
            blend.deviation = ((values - old.to(values.dtype)) ** 2).sum(-1).mul(held).sum((0, 1))
            raise Selected
        if mode == REFRESH:
            self._refresh(keys, values, positions)
        view = self.storage.view()
        out = attend_at(query, view.keys, view.values, view.positions, view.valid, positions, scaling)
        if mode == REFRESH:
            self.seal(prompt=True)
        return out

    def _refresh(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Replace the held entries at `positions` by (1, kv_heads, T, dim) `keys` and `values`,
        in the rows that held them: a compressed row keeps the entries it kept, refreshed."""
        storage = self.storage
        assert storage is not None
        view = storage.view()
        slot, held = slots_at(view, positions)  # (1, kv_heads, T) each
        # Per slot of the view: the new entry for it, and whether it has one (a spare last slot
        # takes the positions a row does not hold).
        spare = view.valid.shape[-1]
        index = slot.masked_fill(~held, spare)
        changed = torch.zeros(*index.shape[:2], spare + 1, dtype=torch.bool, device=index.device).scatter_(2, index, held)[..., :spare]
        dense = lambda t: t.new_zeros(*t.shape[:2], spare + 1, t.shape[-1]).scatter_(2, index[..., None].expand_as(t), t)[:, :, :spare]  # noqa: E731
        if not storage.set_entries(view, dense(keys), dense(values), changed):
            self.append_where(keys, values, positions, held, replace=True)
        self.held.update(self.layer_idx, storage.allocated_nbytes)

    def append_where(
        self,
        keys: torch.Tensor,  # (1, kv_heads, T, head_dim)
        values: torch.Tensor,  # (1, kv_heads, T, head_dim)
        positions: torch.Tensor,  # (T,)
        wanted: torch.Tensor,  # (1, kv_heads, T) bool: which rows keep which new entry
        replace: bool = False,  # drop the entries held at `positions` before
    ) -> None:
        """Store a chunk in the rows `wanted` says (head-wise, as a compressed cache holds it):
        appended whole, then the unwanted entries (and with `replace` the ones they replace)
        dropped. The layer's count of tokens seen is the caller's to keep."""
        if self.storage is None:
            self.lazy_initialization(keys, values)
        storage = self.storage
        assert storage is not None
        before = storage.lengths.to(storage.device)  # (1, kv_heads)
        storage.append(keys, values, positions, all_real(1, keys.shape[2], keys.device))
        if replace or not bool(wanted.all()):
            after = storage.view()
            slot = torch.arange(after.valid.shape[-1], device=after.valid.device)
            # Row h's new entries sit at slots before_h .. before_h + T - 1, in chunk order.
            chunk_index = slot - before[..., None]  # (1, kv_heads, slots)
            new = chunk_index >= 0
            kept_new = wanted.gather(-1, chunk_index.clamp(0, positions.numel() - 1))
            stale = ~new & torch.isin(after.positions, positions) if replace else torch.zeros_like(new)
            keep = after.valid & ~stale & (~new | kept_new)
            storage.keep(after, slot.expand_as(keep).contiguous(), keep)
        self.held.update(self.layer_idx, storage.allocated_nbytes)

    def seal(
        self,
        query: torch.Tensor | None = None,  # (batch, q_heads, T, head_dim): the chunk's, when there is one
        positions: torch.Tensor | None = None,  # (T,)
        valid: torch.Tensor | None = None,  # (batch, T)
        scaling: float = 1.0,
        prompt: bool = False,  # the chunk was a prompt's, now compressed (judged): nothing kept back
    ) -> None:
        """Let the storage convert what this chunk left (quantize it), then count its bytes. A
        storage that holds what matters more with more bits asks the policy (`Policy.importance`)."""
        storage = self.storage
        if storage is None:
            return
        importance = None
        if storage.wants_importance:
            ctx = self._context(query, positions, valid, scaling)
            # Keep-all budgets: a score that depends on the budget (H2O's recent window) is defined.
            ctx.budget = ctx.target = storage.lengths.to(storage.device)
            importance = lambda: self.policy.importance(ctx)  # noqa: E731
        storage.seal(importance, prompt)
        self.held.update(self.layer_idx, storage.allocated_nbytes)

    def _context(
        self,
        query: torch.Tensor | None = None,  # (batch, q_heads, T, head_dim); None after the fact
        positions: torch.Tensor | None = None,  # (T,)
        valid: torch.Tensor | None = None,  # (batch, T)
        scaling: float = 1.0,
        decoding: bool = False,
    ) -> StepContext:
        """What the policy may look at now (no queries: empty positions and validity)."""
        assert self.storage is not None
        device = self.storage.device
        return StepContext(
            self.layer_idx, self.storage, query,
            positions if positions is not None else torch.zeros(0, dtype=torch.long, device=device),
            valid if valid is not None else torch.zeros(self.storage.batch, 0, dtype=torch.bool, device=device),
            scaling, num_layers=self.num_layers, decoding=decoding, calibration=self.calibration, state=self.policy_state,
        )  # fmt: skip

    def start_from(self, storage: KVStorage, tokens: int) -> None:
        """Begin from `storage`, which already holds the first `tokens` tokens of one sequence
        uncompressed (a prefix found block by block); what follows is prefilled as usual."""
        self.storage = storage
        self.is_initialized, self.dtype, self.device = True, storage.dtype, storage.device
        self.seen, self.chunks, self.tokens = tokens, 1, torch.tensor([tokens], dtype=torch.int64)
        self.held.update(self.layer_idx, storage.allocated_nbytes)

    def adopt(self, base: KVForgeLayer, storage: KVStorage, sequences: list[int] | None = None) -> None:
        """Take over `base`'s state over `storage`: all of it (a fork), or only the given
        sequences' (what stays of a batch)."""
        pick = (lambda t: t.clone()) if sequences is None else (lambda t: t[sequences])
        assert base.tokens is not None
        budget = pick(base.decode_budget) if base.decode_budget is not None else None
        self.restore(storage, base.seen, base.chunks, pick(base.tokens), budget, {k: pick(v) for k, v in base.policy_state.items()})
        if base.reader is not None:
            self.reader = base.reader.select(sequences if sequences is not None else list(range(len(base.tokens))))

    def restore(
        self, storage: KVStorage, seen: int, chunks: int, tokens: torch.Tensor, decode_budget: torch.Tensor | None,
        policy_state: dict[str, torch.Tensor],
    ) -> None:  # fmt: skip
        """Hold `storage` with this state (what `state()` gave, of a fork or of a stored cache)."""
        self.storage = storage
        self.is_initialized, self.dtype, self.device = True, storage.dtype, storage.device
        self.seen, self.chunks, self.tokens = seen, chunks, tokens
        if decode_budget is not None:
            self.decode_budget = decode_budget
        self.policy_state = policy_state
        self.held.update(self.layer_idx, storage.allocated_nbytes)

    def state(self) -> tuple[int, int, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """What this layer keeps beside its storage: seen, chunks, tokens, decode_budget, policy_state."""
        assert self.tokens is not None, "a layer that has seen nothing has no state"
        return self.seen, self.chunks, self.tokens, self.decode_budget, self.policy_state

    def deferred_context(self) -> StepContext | None:
        """A context for compressing what is held now, after the fact (no queries), its `target`
        what the prompt budget asks of each row; None when the layer holds nothing or no budget
        applies."""
        if self.storage is None or self.tokens is None:
            return None
        target = self.policy.prefill_budget(self.tokens, self.storage.lengths)
        if target is None:
            return None
        ctx = self._context()
        ctx.target = target.to(self.storage.device)
        return ctx

    def compress(self, ctx: StepContext | None, target: torch.Tensor | None) -> None:
        """Compress what is held to `target` (batch, kv_heads) entries per row now, by the policy
        state gathered so far: for policies that defer compression until the whole chunk, or
        their extra passes, have run. `ctx` is this layer's `deferred_context`."""
        if ctx is None or target is None:
            return
        start = time.perf_counter()
        held = self.storage.lengths
        if bool((target < held).any()):
            ctx.budget, ctx.target = target.minimum(held), target
            index, mask = self.policy.select(ctx)
            self.storage.keep(ctx.view, index, mask)
            self.held.update(self.layer_idx, self.storage.allocated_nbytes)
        self.policy_seconds += time.perf_counter() - start

    def _act(
        self,
        query: torch.Tensor,  # (batch, q_heads, T, head_dim)
        positions: torch.Tensor,  # (T,)
        new_valid: torch.Tensor,  # (batch, T)
        scaling: float,
        mode: str,
        added: torch.Tensor,  # (batch,) tokens this chunk stored per sequence
        shared: dict[str, dict[str, object]] | None = None,
        attended: bool = False,  # the storage already added the attention to policy state
    ) -> None:
        """Let the policy observe this chunk and, when a budget applies, compress.

        `shared`: a slot for the per-entry policy state observed of this very chunk. When it holds
        the state, observing is skipped; when empty, it is filled. A sweep derives one policy at
        several ratios, and what it observes does not depend on the ratio."""
        assert self.storage is not None
        budgets = self._budget(mode, added)
        if budgets is None and not self.policy.aux_names:
            return
        start = time.perf_counter()
        ctx = self._context(query, positions, new_valid, scaling, decoding=mode == DECODE)
        if shared is not None and "state" in shared:
            self.storage.import_aux(shared["state"])
            self.policy_state = dict(shared["layer"])  # type: ignore[arg-type]
        elif self.policy.aux_names:
            name = self.policy.attention_state
            if name is not None and not attended:
                self.storage.accumulate_attention(name, query, positions, new_valid, scaling)
            self.policy.observe(ctx)
            if shared is not None:
                shared["state"] = self.storage.export_aux()
                shared["layer"] = dict(self.policy_state)
        if budgets is not None:
            ctx.budget, ctx.target = (b.to(query.device) for b in budgets)
            index, mask = self.policy.select(ctx)
            self.storage.keep(ctx.view, index, mask, reserve=self.policy.evict_every if mode == DECODE else 0)
            self.held.update(self.layer_idx, self.storage.allocated_nbytes)
        if query.is_cuda:
            torch.cuda.synchronize(query.device)
        self.policy_seconds += time.perf_counter() - start

    def _budget(self, mode: str, added: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(budget, target), each (batch, kv_heads): entries to keep after this chunk, and what
        the budget asks of each row before it is capped by what the row holds (StepContext);
        None when nothing is evicted."""
        policy, storage = self.policy, self.storage
        assert storage is not None and self.tokens is not None
        if mode == APPEND:
            return None
        if mode == DECODE:
            if self.decode_budget is None and (policy.decode_budget is None) and not (
                policy.holds_budget_while_decoding and policy.compresses
            ):
                return None  # this policy lets decoding grow the cache
            if self.quiet_steps > 0:  # no row can have reached its eviction point yet
                self.quiet_steps -= 1
                return None
        held = storage.lengths
        if mode == PREFILL:
            if policy.defers:
                return None  # compress() runs once the policy's extra passes have scored the chunk
            target = policy.prefill_budget(self.tokens, held)
            if target is None or not bool((target < held).any()):
                return None
            return target.minimum(held), target
        if self.decode_budget is None:
            if policy.decode_budget is not None:
                self.decode_budget = torch.full_like(held, policy.decode_budget)
            else:
                # What was held before this first step: the size the prompt left.
                self.decode_budget = (held - added[:, None]).clamp(min=1)
        # Rows reaching budget + evict_every go back to their budget; the others keep all.
        limit = self.decode_budget + policy.evict_every
        due = held >= limit
        # A row grows by at most one entry per step: skip the checks until one could be due.
        self.quiet_steps = int((limit - held).clamp(min=1).min()) - 1
        if not bool(due.any()):
            return None
        budget = torch.where(due, self.decode_budget, held)
        return budget, budget

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.storage = None
        self.is_initialized = False
        self.seen = self.chunks = 0
        self.decode_budget = None
        self.quiet_steps = 0
        self.pending = False
        self.tokens = None
        self.policy_seconds = 0.0
        self.prefill_record = None
        self.policy_state = {}
        self.held.update(self.layer_idx, 0)


def slots_at(view: PaddedView, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row of `view` holds `positions` (T,): (batch, kv_heads, T) slot indices (0
    where none) and (batch, kv_heads, T) bool, whether it does."""
    batch, heads, slots = view.valid.shape
    size = int(positions.max()) + 1 if positions.numel() else 0
    # slot_of[b, h, p]: the slot row (b, h) holds position p in, -1 where none; index `size`
    # takes every entry at a later position (and the padding), and is never read.
    slot_of = torch.full((batch, heads, size + 1), -1, dtype=torch.int64, device=view.positions.device)
    where = view.positions.clamp(max=size).masked_fill(~view.valid, size)
    slot_of.scatter_(2, where, torch.arange(slots, device=where.device).expand(batch, heads, slots))
    slot = slot_of[..., positions]
    return slot.clamp(min=0), slot >= 0


def held_at(view: PaddedView, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The held keys and values at `positions` (T,), each (batch, kv_heads, T, head_dim), zero
    where a row does not hold that position, and (batch, kv_heads, T) bool, whether it does."""
    slot, held = slots_at(view, positions)
    index = slot[..., None].expand(-1, -1, -1, view.keys.shape[-1])
    pick = lambda t: t.gather(2, index) * held[..., None]  # noqa: E731
    return pick(view.keys), pick(view.values), held


def head_dim(model: PreTrainedModel) -> int:
    text = model.config.get_text_config()
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def restored(
    storage: KVStorage, record: PrefillRecord, layout: str, aux_names: tuple[str, ...], quant: QuantSpec, memory: KVMemory | None,
    basis: Basis | None = None,
) -> KVStorage:
    """A new storage (of `layout`, or quantized) holding what an uncompressed one-chunk prefill
    stored in `storage`, appended as that chunk was: the same tokens, padding left out."""
    view = storage.view()
    batch, heads, _, dim = view.keys.shape
    t = record.valid.shape[1]
    keys = view.keys.new_zeros(batch, heads, t, dim)  # (batch, heads, T, dim): the chunk's layout
    values = torch.zeros_like(keys)
    for b in range(batch):
        n = int(record.valid[b].sum())
        keys[b][:, record.valid[b]] = view.keys[b, :, :n]
        values[b][:, record.valid[b]] = view.values[b, :, :n]
    out = make_storage(layout, batch, heads, dim, keys.dtype, keys.device, aux_names, quant, memory, basis)
    out.append(keys, values, record.positions, record.valid, exact=True)
    return out


class KVCache(Cache):
    """A KV cache that holds only what its policy keeps, at KV-head granularity, ragged per head.

    Use with a model switched to kvforge attention (`kvforge.enable(model)`):

        cache = KVCache(model, make_policy("snapkv", ratio=0.5))
        model.generate(input_ids, past_key_values=cache)
        cache.nbytes  # bytes of K/V actually allocated

    `layout` picks how entries are held (`kvforge.storage.LAYOUTS`); the policy never knows.
    `memory`: the block memory the paged layout takes its blocks from (default: the process's
    shared one); every cache derived from this one (fork, derive, stack, select) uses it too.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        policy: Policy,
        record_prefill: bool = False,
        layout: str = DEFAULT_LAYOUT,
        tokenizer: PreTrainedTokenizerBase | None = None,  # for policies that prompt the model (kvzip)
        quant: QuantSpec | str | None = None,
        memory: KVMemory | None = None,
    ) -> None:
        if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
            raise ValueError(
                f"model uses attention implementation {model.config._attn_implementation!r}; "
                f"call kvforge.enable(model) first so the cache's compression is applied"
            )
        check_layout(layout)
        spec = quant if isinstance(quant, QuantSpec) else QuantSpec.parse(quant or "none")
        spec.check_head_dim(head_dim(model))
        self._setup(policy, model.config.get_text_config().num_hidden_layers, layout, fingerprint(model), spec, memory)
        self.tokenizer = tokenizer
        for layer in self.layers:
            layer.record_prefill = record_prefill

    def _setup(self, policy: Policy, num_layers: int, layout: str, model: str, quant: QuantSpec, memory: KVMemory | None = None) -> None:
        self.policy, self.num_layers, self.phase, self.layout, self.quant = policy, num_layers, Phase(), layout, quant
        self.memory = memory
        self.model_fingerprint = model  # which model's calibration applies (`calibration.py`)
        self.held = HeldBytes()
        layers = [KVForgeLayer(i, num_layers, policy, self.phase, self.held, layout, quant, memory) for i in range(num_layers)]
        if policy.needs_calibration:
            calibration = require_calibration(model, policy.full_name)
            for layer in layers:
                layer.calibration = calibration
        if quant.rank is not None:
            bases = require_bases(model, quant.label)
            for layer in layers:
                layer.basis = bases.layer(layer.layer_idx, quant.rank, quant.key_basis)
        Cache.__init__(self, layers=layers)

    @classmethod
    def _empty(cls, policy: Policy, num_layers: int, layout: str, model: str, quant: QuantSpec, memory: KVMemory | None) -> KVCache:
        """A cache with fresh layers, built without a model (derive and stack fill the layers)."""
        cache = cls.__new__(cls)
        cache._setup(policy, num_layers, layout, model, quant, memory)
        cache.tokenizer = None
        return cache

    def derive(self, policy: Policy, observed: dict | None = None, quant: QuantSpec | None = None) -> KVCache:
        """A cache holding what `policy` would have kept had it compressed this cache's prefill.

        This cache must hold exactly one recorded, uncompressed prefill (record_prefill=True,
        policy full). Compression happens after each layer's attention, so the prefill itself
        does not depend on the policy: deriving is exact, and a sweep pays one prefill per sample.
        (A chunked prefill does depend on the policy: later chunks attend over what was kept.)
        `observed`, a dict kept by the caller across calls on this base, lets policies that differ
        only in budget share what they observed of the prefill (H2O's accumulated attention).
        A policy that defers compression (kvzip) is compressed by `generate.settle` afterwards.
        `quant` holds the derived entries another way than the base does (the base's prefill is
        stored as computed, so deriving a quantized cache from it is as exact as deriving any).
        """
        quant = quant if quant is not None else self.quant
        if quant.rank is not None:
            raise ValueError(f"derive() cannot give a low-rank cache (--quant {quant.label}): it attends its own prompt in coordinates; prefill it")
        state_key = policy.state_key()
        if self.policy.compresses or self.policy.aux_names:
            raise ValueError(f"derive() needs an uncompressed base cache, not policy {self.policy.name!r}")
        derived = KVCache._empty(policy, self.num_layers, self.layout, self.model_fingerprint, quant, self.memory)
        derived.tokenizer = self.tokenizer
        for base, layer in zip(self.layers, derived.layers):
            record = base.prefill_record
            if base.storage is None or record is None or base.chunks != 1:
                raise ValueError("derive() needs a cache that ran exactly one recorded prefill chunk")
            if quant == self.quant:
                layer.storage = base.storage.share(policy.aux_names)
            else:
                layer.storage = restored(base.storage, record, self.layout, policy.aux_names, quant, self.memory, layer.basis)
            layer.is_initialized, layer.dtype, layer.device = True, base.dtype, base.device
            layer.seen, layer.tokens = base.seen, base.tokens.clone()
            derived.held.update(layer.layer_idx, layer.storage.allocated_nbytes)
            shared = None
            if observed is not None and policy.aux_names:
                shared = observed.setdefault((state_key, layer.layer_idx), {})
            added = record.valid.sum(1).cpu()
            layer._act(record.query, record.positions, record.valid, record.scaling, PREFILL, added, shared)
            layer.chunks = 1
            if not policy.defers:
                layer.seal(record.query, record.positions, record.valid, record.scaling, prompt=True)
        return derived

    def fork(self) -> KVCache:
        """A cache over the same entries and policy state that can be written without changing
        this one (copy on write): one compressed context answers many questions, each on a fork."""
        forked = KVCache._empty(self.policy, self.num_layers, self.layout, self.model_fingerprint, self.quant, self.memory)
        forked.tokenizer = self.tokenizer
        for base, layer in zip(self.layers, forked.layers):
            if base.storage is None or base.tokens is None:
                continue
            storage = base.storage.share(self.policy.aux_names)
            storage.import_aux(base.storage.export_aux())
            layer.adopt(base, storage)
        return forked

    def swap_out(self, device: torch.device | str = "cpu") -> list[SwappedPaged | SwappedQuant]:
        """Move every layer's K/V out of the block memory (to `device`, bytes as they are: what a
        CPU or disk tier keeps; quantized codes stay codes) and give the blocks back; the cache
        holds nothing until `swap_in`. Paged caches only (`layout="paged"`, quantized or not)."""
        storages = [layer.storage for layer in self.layers]
        if not all(isinstance(s, PagedKV | PagedQuantKV) for s in storages):
            raise ValueError(f"swap_out() moves blocks of the paged layout; this cache's layout is {self.layout!r}")
        swapped = [s.swap_out(device) for s in storages]  # type: ignore[union-attr]
        for layer in self.layers:
            layer.storage = None
            self.held.update(layer.layer_idx, 0)
        return swapped

    def swap_in(self, swapped: list[SwappedPaged | SwappedQuant]) -> None:
        """Bring back what `swap_out` moved, into this cache's memory (the process's shared one
        when it has none); raises OutOfBlocks, holding nothing, when a bounded memory is full."""
        layers: list[PagedKV | PagedQuantKV] = []
        try:
            for layer, part in zip(self.layers, swapped):
                kind = PagedQuantKV if isinstance(part, SwappedQuant) else PagedKV
                layers.append(kind.swap_in(part, self.memory, layer.device))  # type: ignore[arg-type]
        except OutOfBlocks:
            layers.clear()  # what was brought in goes back to the pool
            raise
        for layer, storage in zip(self.layers, layers):
            layer.storage = storage
            self.held.update(layer.layer_idx, storage.allocated_nbytes)

    def compress(self) -> None:
        """Compress every layer to the prompt budget now (see `KVForgeLayer.compress`); the
        policy may first move budget between layers (`Policy.layer_budgets`)."""
        contexts = [layer.deferred_context() for layer in self.layers]
        start = time.perf_counter()
        targets = self.policy.layer_budgets(contexts)
        self.layers[0].policy_seconds += time.perf_counter() - start
        for layer, ctx, target in zip(self.layers, contexts, targets):
            layer.compress(ctx, target)
            layer.seal(prompt=True)

    @property
    def policy_seconds(self) -> float:
        """Seconds spent in policy observation and compression, summed over layers."""
        return sum(layer.policy_seconds for layer in self.layers)

    def _storages(self) -> list[KVStorage]:
        return [layer.storage for layer in self.layers if layer.storage is not None]

    def _readers(self) -> list[PageReader]:
        return [layer.reader for layer in self.layers if layer.reader is not None]

    @property
    def nbytes(self) -> int:
        """K/V bytes allocated, spare capacity included, summed over layers (read from the tensors);
        the page summaries of a cache that reads less (quant.read) count too."""
        return sum(s.allocated_nbytes for s in self._storages()) + sum(sum(r.buffers().values()) for r in self._readers())

    def buffers(self) -> dict[int, int]:
        """{address: bytes} of every buffer standing for K/V (see `KVStorage.buffers`), page summaries included."""
        held = {ptr: n for s in self._storages() for ptr, n in s.buffers().items()}
        return held | {ptr: n for r in self._readers() for ptr, n in r.buffers().items()}

    @property
    def kept_nbytes(self) -> int:
        """K/V bytes of the entries kept: entries x (one K row + one V row)."""
        return sum(s.kept_nbytes for s in self._storages())

    @property
    def bits_per_element(self) -> float:
        """Effective bits per K/V element kept: every byte that stands for K/V (codes, scales,
        minimums, the full-precision tail) over the elements held (two per channel per entry)."""
        elements = sum(s.entries * 2 * s.head_dim for s in self._storages())
        return 8 * self.kept_nbytes / elements if elements else 0.0

    @property
    def peak_nbytes(self) -> int:
        """The most K/V bytes allocated at once so far (see `HeldBytes`)."""
        return self.held.peak

    @property
    def dense_nbytes(self) -> int:
        """Bytes an uncompressed cache of the same dtype would hold for the same (unpadded) tokens."""
        return int(self.seq_dense_nbytes().sum())

    def seq_nbytes(self) -> torch.Tensor:
        """(batch,) K/V bytes kept for each sequence: its entries x entry size, and its page summaries."""
        return sum(s.seq_nbytes() for s in self._storages()) + sum(r.seq_nbytes() for r in self._readers())

    def seq_read_fraction(self) -> torch.Tensor | None:
        """(batch,) of the entries held at its decoding steps, the fraction each sequence read
        (quant.read); None when every step reads everything."""
        readers = self._readers()
        if not readers:
            return None
        return sum(r.read for r in readers) / torch.as_tensor(sum(r.held for r in readers)).clamp(min=1)

    def seq_bits_per_element(self) -> torch.Tensor:
        """(batch,) effective bits per K/V element each sequence holds (see `bits_per_element`)."""
        entries = sum(s.lengths.cpu().sum(1) * 2 * s.head_dim for s in self._storages())
        return self.seq_nbytes() * 8 / torch.as_tensor(entries).clamp(min=1)

    def seq_dense_nbytes(self) -> torch.Tensor:
        """(batch,) K/V bytes an uncompressed cache would hold for each sequence."""
        return sum(
            layer.tokens * layer.storage.kv_heads * layer.storage.entry_nbytes
            for layer in self.layers
            if layer.storage is not None and layer.tokens is not None
        )

    @classmethod
    def stack(cls, bases: list[KVCache], take: bool = False) -> KVCache:
        """One batched cache from the sequences of `bases` (caches of one policy, each of any batch
        size), as if the prompts had been prefilled together left-padded: positions shift right by
        each prompt's padding. With `take` the bases are consumed (what they own moves, nothing is
        copied): a running batch takes in a newly prefilled request.

        Prefilling one prompt at a time keeps the fast causal attention path and the memory of one
        prompt; the stacked cache then decodes the whole batch (and, for recorded full prefills,
        derives every policy for it)."""
        if not bases or any(b.layers[0].storage is None for b in bases):
            raise ValueError("stack() takes caches that hold something (prefill them first)")
        if any(b.policy != bases[0].policy or (b.layout, b.quant) != (bases[0].layout, bases[0].quant) for b in bases):
            raise ValueError("stack() takes caches of one policy, one layout and one quantization")
        first = bases[0]
        stacked = KVCache._empty(first.policy, first.num_layers, first.layout, first.model_fingerprint, first.quant, first.memory)
        stacked.tokenizer = first.tokenizer
        width = max(b.get_seq_length() for b in bases)
        for i, layer in enumerate(stacked.layers):
            parts = [b.layers[i] for b in bases]
            pads = [width - p.seen for p in parts]
            layer.storage = type(parts[0].storage).stack([p.storage for p in parts], pads, take)
            layer.is_initialized = True
            layer.dtype, layer.device = parts[0].dtype, parts[0].device
            layer.seen, layer.chunks = width, parts[0].chunks
            layer.tokens = torch.cat([p.tokens for p in parts])
            if any(p.decode_budget is not None for p in parts):
                # A part not decoding yet holds its prompt's size, as its first step would set.
                layer.decode_budget = torch.cat(
                    [p.decode_budget if p.decode_budget is not None else p.storage.lengths.clamp(min=1) for p in parts]
                )
            # Per-sequence policy values (first dimension: batch) are stacked like the sequences.
            layer.policy_state = {k: torch.cat([p.policy_state[k] for p in parts]) for k in parts[0].policy_state}
            if first.quant.read is not None and any(p.reader is not None for p in parts):
                layer.reader = layer.page_reader(0).stack([p.reader for p in parts], [len(p.tokens) for p in parts])
            stacked.held.update(i, layer.storage.allocated_nbytes)
            records = [p.prefill_record for p in parts]
            if any(r is None for r in records) or any(p.chunks != 1 for p in parts):
                continue
            layer.record_prefill = True
            # Queries left-padded with zeros to the common width; padding queries are marked invalid.
            query = torch.cat([F.pad(r.query, (0, 0, pad, 0)) for r, pad in zip(records, pads)])
            valid = torch.cat([F.pad(r.valid, (pad, 0)) for r, pad in zip(records, pads)])
            layer.prefill_record = PrefillRecord(query, torch.arange(width, device=query.device), valid, records[0].scaling)
        return stacked

    def select(self, sequences: list[int]) -> KVCache:
        """A cache of only these sequences, in this order; this cache is consumed (finished
        requests leave a running batch, their memory freed)."""
        kept = KVCache._empty(self.policy, self.num_layers, self.layout, self.model_fingerprint, self.quant, self.memory)
        kept.tokenizer = self.tokenizer
        for layer, out in zip(self.layers, kept.layers):
            if layer.storage is None or layer.tokens is None:
                continue
            out.adopt(layer, layer.storage.select(sequences), sequences)
            out.policy_seconds = layer.policy_seconds
        return kept

    @property
    def meta_nbytes(self) -> int:
        """Bytes held beside K/V: positions, lengths, policy state."""
        return sum(s.meta_nbytes for s in self._storages())

    def kept_lengths(self, layer_idx: int = 0) -> torch.Tensor:
        """(batch, kv_heads) entries held by one layer."""
        storage = self.layers[layer_idx].storage
        if storage is None:
            raise ValueError("the cache is empty: run a forward pass first")
        return storage.lengths

    def entries(self) -> int:
        """Total entries held over layers, sequences and KV heads."""
        return sum(s.entries for s in self._storages())
