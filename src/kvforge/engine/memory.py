"""How many blocks or bytes a request needs, so the engine admits what its KV memory can hold.

Full-precision caches take their blocks from the engine's `KVMemory` (the paged layout): a
request is admitted when the pool's free blocks cover its prompt as the policy keeps it plus one
uncompressed chunk (`prompt_blocks`); what decoding adds later is taken as it comes, and when the
pool runs dry the engine preempts. `reservation` is the most a request can ever hold, in bytes:
a request beyond the whole memory is refused at once, and a quantized cache (held outside the
pool) sets that many blocks aside for its whole life.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvforge.engine.request import KVSettings
from kvforge.storage.codec import META_DTYPE, QuantSpec

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


def kept_entries(kv: KVSettings, tokens: int) -> int:
    """Entries per row a prompt of `tokens` leaves once compressed to the setting's ratio or budget."""
    if kv.budget is not None:
        return min(tokens, kv.budget)
    return tokens if kv.ratio == 0 else math.ceil(tokens * (1 - kv.ratio))


def compresses(kv: KVSettings) -> bool:
    return kv.ratio > 0 or kv.budget is not None


def row_blocks(entries: int, block_size: int) -> int:
    return -(-entries // block_size)


def prompt_blocks(shape: Shape, kv: KVSettings, prompt_tokens: int, chunk: int, block_size: int) -> int:
    """Blocks a prompt takes from the pool: every row of every layer holds the prompt as kept, plus
    (when the setting compresses) one chunk not yet compressed, and may copy its shared last
    block once (a prefix hit)."""
    transient = min(chunk, prompt_tokens) if compresses(kv) else 0
    per_row = row_blocks(kept_entries(kv, prompt_tokens) + transient, block_size) + 1
    return shape.layers * shape.kv_heads * per_row


def reservation(shape: Shape, kv: KVSettings, prompt_tokens: int, max_tokens: int, chunk: int, block_size: int) -> int:
    """Upper bound of the K/V bytes a request holds over its whole life (see the module docstring):
    its prompt as kept, every token it may generate, the room a decoding-time budget keeps between
    evictions, one chunk not yet compressed (in one layer at a time: each layer compresses it
    before the next sees it), and the last blocks' unused entries."""
    entries = kept_entries(kv, prompt_tokens) + max_tokens  # per row
    transient = chunk * shape.entry_bytes * shape.kv_heads
    if kv.quant.enabled:
        groups, _ = kv.quant.batch
        exact = min(entries, kv.quant.residual + groups * kv.quant.group)  # the full-precision tail
        per_row = exact * shape.entry_bytes + (entries - exact) * quantized_entry_bytes(kv.quant, shape.head_dim)
    else:
        per_row = (row_blocks(entries + EVICT_SLACK, block_size) + 1) * block_size * shape.entry_bytes
    return math.ceil(shape.layers * shape.kv_heads * per_row + transient)
