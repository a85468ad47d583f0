"""Per block of a memory, a summary of the keys it holds: what a decoding step that reads less
scores pages by (what a summary is, `reading/pages.py` says; this file only keeps them). Kept
where the keys are, rows sharing a block (a fork, a prefix hit) share its summary, and a block
found again by its hash brings its summary with it.

    tensors[i]: (num_blocks, head_dim)   quest: least and most key per channel (float16);
                                         centroid: the sum of the keys (float32)
    covered:    (num_blocks,) int64      leading entries of each block its summary describes

Invariant: where covered[b] = c > 0, the summary of block b is `page_summary` of its entries
0 .. c-1 as the store holds them now. The store tells this object of every write
(`BlockStore.summaries`): keys written at an offset below `covered` make the block forget its
summary (a bound cannot shrink), keys written past it leave it describing the entries before, a
copied block takes its source's summary, a block given codes or swapped in forgets. `refresh`
brings the blocks a step reads up to the entries their rows hold, recomputing only those whose
`covered` differs (each decoding step: the last block of every row it appended to).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# What a reader gives to summarize blocks: keys (n, block_size, head_dim) of n blocks and the
# entries each holds (n,) -> one (n, head_dim) tensor per summary field.
Summarize = Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]]


class BlockSummaries:
    def __init__(
        self,
        fields: list[tuple[torch.dtype, float]],  # (dtype, value of an empty block) per summary tensor
        num_blocks: int,
        head_dim: int,
        device: torch.device,
    ) -> None:
        self.fields, self.head_dim, self.device = fields, head_dim, device
        with torch.inference_mode(False):  # outlives the call that made it, as the store's arena
            self.tensors = [torch.full((num_blocks, head_dim), fill, dtype=dtype, device=device) for dtype, fill in self.fields]
            self.covered = torch.zeros(num_blocks, dtype=torch.int64, device=device)

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block's summary."""
        return sum(t[0].nbytes for t in self.tensors)

    @property
    def nbytes(self) -> int:
        """Bytes of the summaries of every block (`covered` is bookkeeping, as the pool's counts are)."""
        return sum(t.nbytes for t in self.tensors)

    def names(self, ids: set[int]) -> dict[int, int]:
        """{address of block b's summary row: its bytes} for each id (see `BlockStore.block_names`)."""
        return {t.data_ptr() + b * t[0].nbytes: t[0].nbytes for t in self.tensors for b in ids}

    # --- what the store tells -------------------------------------------------------------------

    def grow(self, count: int) -> None:
        with torch.inference_mode(False):
            self.tensors = [torch.cat([t, t.new_full((count, self.head_dim), fill)]) for t, (_, fill) in zip(self.tensors, self.fields)]
            self.covered = torch.cat([self.covered, self.covered.new_zeros(count)])

    def written(self, blocks: torch.Tensor, offsets: torch.Tensor) -> None:
        """Keys were written at (blocks, offsets) (n,) each: a block written below what its
        summary describes forgets it."""
        blocks = blocks.to(self.device)
        stale = blocks[offsets.to(self.device) < self.covered[blocks]]
        self.covered[stale] = 0  # duplicates all write 0: deterministic

    def forget(self, blocks: torch.Tensor) -> None:
        """These blocks hold other things now (codes, swapped-in bytes)."""
        self.covered[blocks.to(self.device)] = 0

    def copied(self, sources: torch.Tensor, targets: torch.Tensor) -> None:
        """Whole blocks were copied: each target describes what its source did."""
        sources, targets = sources.to(self.device), targets.to(self.device)
        for t in self.tensors:
            t[targets] = t[sources]
        self.covered[targets] = self.covered[sources]

    # --- what readers ask ------------------------------------------------------------------------

    def refresh(self, keys: torch.Tensor, blocks: torch.Tensor, held: torch.Tensor, summarize: Summarize) -> None:
        """Make the summaries of `blocks` (n,) describe their first `held` (n,) entries of
        `keys` (num_blocks, block_size, head_dim), the store's keys; a block listed twice is
        listed with the same count (rows sharing a block hold the same entries of it)."""
        blocks, held = blocks.to(self.device), held.to(self.device)
        stale = self.covered[blocks] != held
        if not bool(stale.any()):
            return
        blocks, held = blocks[stale], held[stale]
        for t, s in zip(self.tensors, summarize(keys.index_select(0, blocks), held), strict=True):
            t[blocks] = s.to(t.dtype)
        self.covered[blocks] = held

    def of_table(self, table: torch.Tensor) -> list[torch.Tensor]:
        """Each summary tensor read through a block table (rows, width): (rows, width, head_dim)."""
        flat = table.flatten().to(self.device)
        return [t.index_select(0, flat).view(*table.shape, self.head_dim) for t in self.tensors]
