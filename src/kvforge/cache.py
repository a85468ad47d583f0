"""The transformers `Cache` subclass: per-layer ragged storage driven by a compression policy.

Invariant: `get_seq_length()` is the *logical* number of tokens the model has seen (padding
included, evicted tokens included), which is what transformers derives positions and mask sizes
from. What is physically held is `storage.lengths`, smaller after compression.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from kvforge.attention import ATTN_NAME, attend, causal_allowed, tag_layer
from kvforge.policies.base import Policy, StepContext
from kvforge.storage.ragged import PaddedView, RaggedKV


@dataclass
class Phase:
    """Shared by a cache's layers: whether the next chunks are prompt or decoding steps.

    None infers it (a 1-token chunk is a decoding step), which is what `model.generate` needs;
    kvforge's own loops say it explicitly, so a 1-token question is still a prompt chunk."""

    decoding: bool | None = None


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

    def __init__(self, layer_idx: int, policy: Policy, phase: Phase) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.policy = policy
        self.phase = phase
        self.storage: RaggedKV | None = None
        self.seen = 0  # logical tokens seen, padding included
        self.chunks = 0  # forward chunks processed
        self.decode_budget: torch.Tensor | None = None  # (batch, kv_heads), set at the first decode step
        self.pending = False  # update() ran and attend() has not yet
        # (batch,) entries ever stored per sequence: what an uncompressed cache would hold now
        self.stored: torch.Tensor | None = None
        self.policy_seconds = 0.0  # time spent observing and compressing, for benchmarks
        self.record_prefill = False
        self.prefill_record: PrefillRecord | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.storage = RaggedKV(batch, heads, dim, key_states.dtype, key_states.device, self.policy.aux_names)
        self.stored = torch.zeros(batch, dtype=torch.int64, device=key_states.device)
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
    ) -> torch.Tensor:  # (batch, q_heads, T, head_dim)
        assert self.storage is not None
        self.pending = False
        t = keys.shape[2]
        positions = torch.arange(self.seen, self.seen + t, device=keys.device)
        first = self.storage.entries == 0
        before = self.storage.lengths.clone()
        self.storage.append(keys, values, positions, new_valid)
        self.stored = self.stored + new_valid.sum(1) * keys.shape[1]

        # The first chunk attends over itself directly (no copy); later ones over what is held.
        if first:
            allowed = None
            if not bool(new_valid.all()):
                allowed = causal_allowed(positions.expand(keys.shape[0], 1, -1), new_valid[:, None], positions)
            out = attend(query, keys, values, allowed, scaling)
        view = self.storage.padded() if (not first or self._acts()) else None
        if not first:
            assert view is not None
            # One new token per row and no padding slot: every held entry is in its past, so
            # plain unmasked attention is exact (the common decoding step).
            dense_step = t == 1 and bool(new_valid.all()) and self.storage.uniform_length() is not None
            allowed = None if dense_step else causal_allowed(view.positions, view.valid, positions)
            out = attend(query, view.keys, view.values, allowed, scaling)

        if view is not None:
            self._act(view, query, positions, new_valid, scaling, before)
        if self.record_prefill and self.chunks == 0:
            self.prefill_record = PrefillRecord(query, positions, new_valid, scaling)
        self.seen += t
        self.chunks += 1
        return out

    def _act(
        self,
        view: PaddedView,
        query: torch.Tensor,  # (batch, q_heads, T, head_dim)
        positions: torch.Tensor,  # (T,)
        new_valid: torch.Tensor,  # (batch, T)
        scaling: float,
        before: torch.Tensor,  # (batch, kv_heads) entries held before this chunk
        shared: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """Let the policy observe this chunk and, when a budget applies, compress.

        `shared`: a slot for the per-entry policy state observed of this very chunk. When it holds
        the state, observing is skipped; when empty, it is filled. A sweep derives one policy at
        several ratios, and what it observes does not depend on the ratio."""
        assert self.storage is not None
        start = time.perf_counter()
        ctx = StepContext(self.layer_idx, view, query, positions, new_valid, scaling)
        if shared is not None and "state" in shared:
            self.storage.aux = {name: state.clone() for name, state in shared["state"].items()}
            view = ctx.view = self.storage.padded()
        else:
            self.policy.observe(ctx, self.storage)
            if shared is not None:
                shared["state"] = {name: state.clone() for name, state in self.storage.aux.items()}
        ctx.budget = self._budget(query.shape[2], before)
        if ctx.budget is not None and bool((ctx.budget < view.lengths).any()):
            index, mask = self.policy.select(ctx)
            self.storage.keep(view, index, mask)
        if self.storage.keys.is_cuda:
            torch.cuda.synchronize(self.storage.keys.device)
        self.policy_seconds += time.perf_counter() - start

    def _acts(self) -> bool:
        """Whether the policy may look at this layer at all (observe or compress)."""
        p = self.policy
        return bool(p.aux_names) or (p.ratio > 0 and (p.compresses_prefill or p.holds_budget_while_decoding))

    def _budget(self, t: int, before: torch.Tensor) -> torch.Tensor | None:
        """(batch, kv_heads) entries to keep after this chunk, or None to keep everything."""
        policy = self.policy
        assert self.storage is not None
        if policy.ratio == 0:
            return None
        if self.chunks == 0:
            return policy.prefill_budget(self.storage.lengths) if policy.compresses_prefill else None
        decoding = self.phase.decoding if self.phase.decoding is not None else t == 1
        if decoding and policy.holds_budget_while_decoding:
            if self.decode_budget is None:
                self.decode_budget = before.clamp(min=1)
            return self.decode_budget
        return None

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
        self.pending = False
        self.stored = None
        self.policy_seconds = 0.0
        self.prefill_record = None


class KVCache(Cache):
    """A KV cache that holds only what its policy keeps, at KV-head granularity, ragged per head.

    Use with a model switched to kvforge attention (`kvforge.enable(model)`):

        cache = KVCache(model, make_policy("snapkv", ratio=0.5))
        model.generate(input_ids, past_key_values=cache)
        cache.nbytes  # bytes of K/V actually held
    """

    def __init__(self, model: PreTrainedModel, policy: Policy, record_prefill: bool = False) -> None:
        if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
            raise ValueError(
                f"model uses attention implementation {model.config._attn_implementation!r}; "
                f"call kvforge.enable(model) first so the cache's compression is applied"
            )
        self._setup(policy, model.config.get_text_config().num_hidden_layers)
        for layer in self.layers:
            layer.record_prefill = record_prefill

    def _setup(self, policy: Policy, num_layers: int) -> None:
        self.policy, self.num_layers, self.phase = policy, num_layers, Phase()
        Cache.__init__(self, layers=[KVForgeLayer(i, policy, self.phase) for i in range(num_layers)])

    @classmethod
    def _empty(cls, policy: Policy, num_layers: int) -> KVCache:
        """A cache with fresh layers, built without a model (derive and stack fill the layers)."""
        cache = cls.__new__(cls)
        cache._setup(policy, num_layers)
        return cache

    def derive(self, policy: Policy, observed: dict | None = None) -> KVCache:
        """A cache holding what `policy` would have kept had it compressed this cache's prefill.

        This cache must hold exactly one recorded, uncompressed prefill (record_prefill=True,
        policy full). Compression happens after each layer's attention, so the prefill itself
        does not depend on the policy: deriving is exact, and a sweep pays one prefill per sample.
        `observed`, a dict kept by the caller across calls on this base, lets policies that differ
        only in ratio share what they observed of the prefill (H2O's accumulated attention).
        """
        state_key = (type(policy), tuple(sorted((k, v) for k, v in asdict(policy).items() if k != "ratio")))
        if self.policy.ratio != 0 or self.policy.aux_names:
            raise ValueError(f"derive() needs an uncompressed base cache, not policy {self.policy.name!r}")
        derived = KVCache._empty(policy, self.num_layers)
        for base, layer in zip(self.layers, derived.layers):
            record = base.prefill_record
            if base.storage is None or record is None or base.chunks != 1:
                raise ValueError("derive() needs a cache that ran exactly one recorded prefill chunk")
            layer.storage = base.storage.share(policy.aux_names)
            layer.is_initialized, layer.dtype, layer.device = True, base.dtype, base.device
            layer.seen, layer.stored = base.seen, base.stored
            if layer._acts():
                before = torch.zeros_like(layer.storage.lengths)
                shared = None
                if observed is not None and policy.aux_names:
                    shared = observed.setdefault((state_key, layer.layer_idx), {})
                view = layer.storage.padded()
                layer._act(view, record.query, record.positions, record.valid, record.scaling, before, shared)
            layer.chunks = 1
        return derived

    @property
    def policy_seconds(self) -> float:
        """Seconds spent in policy observation and compression, summed over layers."""
        return sum(layer.policy_seconds for layer in self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes of the K and V tensors held, summed over layers (read from the tensors)."""
        return sum(layer.storage.kv_nbytes for layer in self.layers if layer.storage is not None)

    @property
    def dense_nbytes(self) -> int:
        """Bytes an uncompressed cache of the same dtype would hold for the same (unpadded) tokens."""
        return int(self.seq_dense_nbytes().sum())

    def _entry_bytes(self, layer: KVForgeLayer) -> int:
        assert layer.storage is not None
        return 2 * layer.storage.head_dim * layer.storage.keys.element_size()  # one K row + one V row

    def seq_nbytes(self) -> torch.Tensor:
        """(batch,) K/V bytes held for each sequence: its rows of the held tensors."""
        return sum(layer.storage.lengths.sum(1) * self._entry_bytes(layer) for layer in self.layers if layer.storage is not None)

    def seq_dense_nbytes(self) -> torch.Tensor:
        """(batch,) K/V bytes an uncompressed cache would hold for each sequence."""
        return sum(layer.stored * self._entry_bytes(layer) for layer in self.layers if layer.storage is not None)

    @classmethod
    def stack(cls, bases: list[KVCache]) -> KVCache:
        """One batched recording cache from single-sequence recorded prefills, as if the prompts
        had been prefilled together left-padded: positions shift right by each prompt's padding.

        Prefilling one prompt at a time keeps the fast causal attention path and the memory of one
        prompt; the stacked cache then derives and decodes every policy for the whole batch."""
        if not bases or any(b.policy.name != "full" or len(b.kept_lengths(0)) != 1 for b in bases):
            raise ValueError("stack() takes recorded single-sequence caches of the full policy")
        stacked = KVCache._empty(bases[0].policy, bases[0].num_layers)
        width = max(b.get_seq_length() for b in bases)
        for i, layer in enumerate(stacked.layers):
            parts = [b.layers[i] for b in bases]
            records = [p.prefill_record for p in parts]
            if any(r is None or p.chunks != 1 for p, r in zip(parts, records)):
                raise ValueError("stack() needs caches that ran exactly one recorded prefill chunk")
            pads = [width - p.seen for p in parts]
            first = parts[0].storage
            storage = RaggedKV(len(parts), first.kv_heads, first.head_dim, first.keys.dtype, first.keys.device)
            storage.keys = torch.cat([p.storage.keys for p in parts])
            storage.values = torch.cat([p.storage.values for p in parts])
            storage.positions = torch.cat([p.storage.positions + pad for p, pad in zip(parts, pads)])
            storage.lengths = torch.cat([p.storage.lengths for p in parts])
            layer.storage, layer.is_initialized = storage, True
            layer.dtype, layer.device = parts[0].dtype, parts[0].device
            layer.seen, layer.chunks = width, 1
            layer.stored = torch.cat([p.stored for p in parts])
            layer.record_prefill = True
            # Queries left-padded with zeros to the common width; padding queries are marked invalid.
            query = torch.cat([F.pad(r.query, (0, 0, pad, 0)) for r, pad in zip(records, pads)])
            valid = torch.cat([F.pad(r.valid, (pad, 0)) for r, pad in zip(records, pads)])
            layer.prefill_record = PrefillRecord(query, torch.arange(width, device=query.device), valid, records[0].scaling)
        return stacked

    @property
    def meta_nbytes(self) -> int:
        """Bytes held beside K/V: positions, lengths, policy state."""
        return sum(layer.storage.meta_nbytes for layer in self.layers if layer.storage is not None)

    def kept_lengths(self, layer_idx: int = 0) -> torch.Tensor:
        """(batch, kv_heads) entries held by one layer."""
        storage = self.layers[layer_idx].storage
        if storage is None:
            raise ValueError("the cache is empty: run a forward pass first")
        return storage.lengths

    def entries(self) -> int:
        """Total entries held over layers, sequences and KV heads."""
        return sum(layer.storage.entries for layer in self.layers if layer.storage is not None)
