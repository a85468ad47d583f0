"""What a request may hold at most, so the engine admits only what fits its KV memory budget.

A reservation is an upper bound on the K/V bytes a request's cache allocates over its whole life:
its prompt as the policy keeps it, every token it may generate, one prompt chunk not yet
compressed (in one layer at a time: each layer compresses it before the next sees it), and the
spare room the in-place layout keeps (at most a quarter, plus a few entries per row). Quantized caches hold all but their full-precision tail at the codes' size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvforge.engine.request import KVSettings
from kvforge.storage.codec import META_DTYPE, QuantSpec
from kvforge.storage.inplace import GROWTH, GROWTH_MIN

EVICT_SLACK = 16  # room a decoding-time budget keeps between evictions (the default evict_every)


@dataclass(frozen=True)
class Shape:
    """What sizes a model's cache: per layer, per KV head."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def entry_bytes(self) -> int:
        """One full-precision entry of one row: a K row and a V row."""
        return 2 * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()


def quantized_entry_bytes(spec: QuantSpec, head_dim: int) -> float:
    """Bytes one quantized entry costs, its share of its key group's scales included (the widest
    part of `mixed`)."""
    part = spec.parts[0]
    meta = torch.empty(0, dtype=META_DTYPE).element_size() * part.meta_fields
    codes = 2 * part.code_bytes(head_dim)
    return codes + meta * head_dim / part.group + meta * head_dim / part.group  # value scales + key group share


def reservation(shape: Shape, kv: KVSettings, prompt_tokens: int, max_tokens: int, chunk: int) -> int:
    """Upper bound of the K/V bytes a request allocates (see the module docstring)."""
    kept = prompt_tokens if kv.ratio == 0 else math.ceil(prompt_tokens * (1 - kv.ratio))
    entries = kept + max_tokens  # per row
    # A prompt chunk sits uncompressed (and unquantized) in one layer at a time.
    transient = GROWTH * chunk * shape.entry_bytes * shape.kv_heads
    if kv.quant.enabled:
        groups, _ = kv.quant.batch
        exact = min(entries, kv.quant.residual + groups * kv.quant.group)  # the full-precision tail
        per_row = exact * shape.entry_bytes + (entries - exact) * quantized_entry_bytes(kv.quant, shape.head_dim)
    else:
        per_row = (GROWTH * (entries + EVICT_SLACK) + GROWTH_MIN) * shape.entry_bytes
    return math.ceil(shape.layers * shape.kv_heads * per_row + transient)
