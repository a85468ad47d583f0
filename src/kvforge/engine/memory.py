"""How many blocks or bytes a request needs, so the engine admits what its KV memory can hold.

Every cache takes its blocks from the engine's `KVMemory`: full-precision entries (the paged
layout) and quantized ones (codes in blocks of a codec layout, the full-precision tail in K/V
blocks: `storage/pagedquant.py`) alike. A request is admitted when the pool's free blocks cover its
prompt as the policy keeps it plus one uncompressed chunk (`prompt_blocks`); what decoding adds
later is taken as it comes, and when the pool runs dry the engine preempts. `reservation` is the
most a request can ever hold, in bytes: a request beyond the whole memory is refused at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvforge.engine.request import KVSettings
from kvforge.reading import summary_nbytes
from kvforge.storage.pagedquant import codec_layout

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


def summary_block_nbytes(kv: KVSettings, head_dim: int) -> int:
    """Bytes of key summaries each full-precision block of the memory has when requests of this
    setting read less (`memory/summaries.py`); 0 otherwise (a quantized setting's reader keeps
    its own page summaries)."""
    return summary_nbytes(kv.quant.reader, head_dim) if kv.quant.read is not None and not kv.quant.enabled else 0


def kept_entries(kv: KVSettings, tokens: int) -> int:
    """Entries per row a prompt of `tokens` leaves once compressed to the setting's ratio or budget."""
    if kv.budget is not None:
        return min(tokens, kv.budget)
    return tokens if kv.ratio == 0 else math.ceil(tokens * (1 - kv.ratio))


def compresses(kv: KVSettings) -> bool:
    return kv.ratio > 0 or kv.budget is not None


def row_blocks(entries: int, block_size: int) -> int:
    return -(-entries // block_size)


def quantized_row_blocks(kv: KVSettings, entries: int, transient: int, head_dim: int, block_size: int, block_nbytes: int) -> int:
    """Blocks one row of a quantized cache holding `entries` (and `transient` more not yet
    compressed) takes at most: its full-precision tail, and each part's groups at the codec
    layout's groups per block (every part may hold all of them: `mixed` splits by score), one
    block of slack each (a group in a fresh block)."""
    groups, _ = kv.quant.batch
    tail = min(entries, kv.quant.residual + groups * kv.quant.group) + transient
    codes = -(-entries // kv.quant.group)  # a compressed prompt is quantized whole (QuantSpec.sealed)
    per_block = [codec_layout(part, head_dim, block_nbytes).entries // part.group for part in kv.quant.parts]
    return row_blocks(tail, block_size) + 1 + sum(-(-codes // n) + 1 for n in per_block)


def prompt_blocks(shape: Shape, kv: KVSettings, prompt_tokens: int, chunk: int, block_size: int, block_nbytes: int) -> int:
    """Blocks a prompt takes from the pool: every row of every layer holds the prompt as kept, plus
    (when the setting compresses) one chunk not yet compressed, and may copy its shared last
    block once (a prefix hit)."""
    transient = min(chunk, prompt_tokens) if compresses(kv) else 0
    kept = kept_entries(kv, prompt_tokens)
    if kv.quant.enabled:
        per_row = quantized_row_blocks(kv, kept, transient, shape.head_dim, block_size, block_nbytes)
    else:
        per_row = row_blocks(kept + transient, block_size) + 1
    return shape.layers * shape.kv_heads * per_row


def reservation(shape: Shape, kv: KVSettings, prompt_tokens: int, max_tokens: int, chunk: int, block_size: int) -> int:
    """Upper bound of the K/V bytes a request holds over its whole life (see the module docstring):
    its prompt as kept, every token it may generate, the room a decoding-time budget keeps between
    evictions, one chunk not yet compressed (in one layer at a time: each layer compresses it
    before the next sees it), and the last blocks' unused entries."""
    entries = kept_entries(kv, prompt_tokens) + max_tokens + EVICT_SLACK  # per row
    transient = chunk * shape.entry_bytes * shape.kv_heads
    block_nbytes = block_size * shape.entry_bytes + summary_block_nbytes(kv, shape.head_dim)
    if kv.quant.enabled:
        per_row = quantized_row_blocks(kv, entries, 0, shape.head_dim, block_size, block_nbytes) * block_nbytes
    else:
        per_row = (row_blocks(entries, block_size) + 1) * block_nbytes
    return math.ceil(shape.layers * shape.kv_heads * per_row + transient)
