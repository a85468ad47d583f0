"""A decoding step that reads only some pages of what a layer holds (`reading/pages.py`: Quest's
key bounds, or mean keys).

Two paths:
- A layout over a block memory (`PagedKV`) keeps a summary per block of the memory
  (`memory/summaries.py`), shared by every row holding the block: its pages are its blocks, and
  a step reads the summaries, then only the chosen blocks, where they lie (`read_pages`).
- Any other layout: the reader keeps a summary per page of `PAGE` slots of each row, describing
  the storage's slots as they were after the last step: one entry appended per row since updates
  it in place; anything else (a compression, another storage) rebuilds it from the held keys. The
  step reads the layout's padded picture and gathers the chosen slots, so it answers what reading
  less costs in answers, not what it saves in time.
Either summary is held beside the entries (two half-precision key rows per page, or one float32
row) and counts in what the cache holds.
"""

from __future__ import annotations

import weakref

import torch

from kvforge.reading import (
    PAGE, attend, causal_allowed, chosen_pages, chosen_slots, entries_read, grow_summary, page_scores, page_summary, received_attention,
)  # fmt: skip
from kvforge.storage.base import KVStorage, PaddedView, buffers_of, gather_slots

# Layers that read every page: Quest leaves the first two of a 32-layer model dense, where
# attention is spread too widely for a few pages to hold it. Their steps count as reading everything.
DENSE_LAYERS = 2


def reads_every_page(layer_idx: int, num_layers: int) -> bool:
    """Whether a layer reads densely: the first two, in models of 16 layers or more."""
    return layer_idx < min(DENSE_LAYERS, num_layers // 8)


class PageReader:
    """One layer's page summary, and how much its decoding steps read, per sequence."""

    def __init__(self, kind: str, fraction: float, batch: int, dense: bool = False, page: int = PAGE) -> None:
        # `page`: entries per page where the reader summarizes the padded picture itself; a
        # block memory's pages are its blocks.
        self.kind, self.fraction, self.dense, self.page = kind, fraction, dense, page
        self.summary: list[torch.Tensor] = []  # each (batch, kv_heads, pages, head_dim): `pages.page_summary`
        self.lengths: torch.Tensor | None = None  # (batch, kv_heads) the row lengths it describes
        self.source: weakref.ref[KVStorage] | None = None  # the storage they describe
        self.read = torch.zeros(batch, dtype=torch.int64)  # entries read by decoding steps, per sequence
        self.held = torch.zeros(batch, dtype=torch.int64)  # entries held at those steps, per sequence

    def select(self, sequences: list[int]) -> PageReader:
        """The counts of these sequences only; the summary is rebuilt at the next step."""
        out = PageReader(self.kind, self.fraction, len(sequences), self.dense, self.page)
        out.read, out.held = self.read[sequences], self.held[sequences]
        return out

    def stack(self, parts: list[PageReader | None], batches: list[int]) -> PageReader:
        """This (fresh) reader with the counts of stacked sequences, in order: parts[i] has
        batches[i] sequences, and none counted where it has not decoded."""
        self.read = torch.cat([p.read if p is not None else torch.zeros(n, dtype=torch.int64) for p, n in zip(parts, batches)])
        self.held = torch.cat([p.held if p is not None else torch.zeros(n, dtype=torch.int64) for p, n in zip(parts, batches)])
        return self

    def seq_nbytes(self) -> torch.Tensor:
        """(batch,) bytes of the page summary held for each sequence."""
        per_sequence = sum(t[0].numel() * t.element_size() for t in self.summary)
        return torch.full_like(self.read, per_sequence)

    def buffers(self) -> dict[int, int]:
        return buffers_of(self.summary)

    def _summary(self, storage: KVStorage, view: PaddedView, valid: torch.Tensor) -> list[torch.Tensor]:
        """The summary of what `storage` holds now; `valid` (batch,) says which sequences took an
        entry this step. Updated in place only when each row grew by exactly that since the last
        step (an eviction since, even one the append made up for, rebuilds it). Keys quantized
        since they were summarized are summarized as they were: an estimate, never a read."""
        lengths = view.lengths
        same = self.source is not None and self.source() is storage and self.lengths is not None
        added = valid.to(lengths.device)[:, None].expand_as(lengths)
        if same and self.summary and bool((lengths - self.lengths == added.long()).all()):
            slot = (lengths - 1).clamp(min=0)
            key = gather_slots(view.keys, slot[..., None])[:, :, 0]  # (batch, kv_heads, head_dim)
            self.summary = grow_summary(self.kind, self.summary, key, slot, added, self.page)
        else:
            self.summary = page_summary(self.kind, view.keys, lengths, self.page)
        self.lengths, self.source = lengths, weakref.ref(storage)
        return self.summary

    def attend(
        self,
        storage: KVStorage,
        query: torch.Tensor,  # (batch, q_heads, 1, head_dim)
        positions: torch.Tensor,  # (1,)
        valid: torch.Tensor,  # (batch, 1) bool
        scaling: float,
        accumulate: str | None = None,
    ) -> torch.Tensor:  # (batch, q_heads, 1, head_dim)
        """Attention of one decoding step over the chosen pages of what `storage` holds (the step's
        own entry appended already); with `accumulate`, the attention each entry read received is
        added to that policy state (entries not read receive none). A dense layer reads it all."""
        if self.dense:
            held = storage.lengths.sum(1).cpu() * valid[:, 0].cpu()
            self.read += held
            self.held += held
            return storage.attend(query, positions, valid, scaling, accumulate=accumulate)
        paged = storage.page_summaries(self.kind)
        if paged is not None:
            return self._attend_pages(storage, paged, query, positions, valid, scaling, accumulate)
        view = storage.view()
        score = page_scores(self.kind, query, self._summary(storage, view, valid[:, 0]), view.lengths, self.page)
        slots, read = chosen_slots(score, view.lengths, self.fraction, self.page)  # (batch, kv_heads, K)
        keys, values = gather_slots(view.keys, slots), gather_slots(view.values, slots)
        key_positions = torch.gather(view.positions, 2, slots)
        read = read & torch.gather(view.valid, 2, slots)
        out = attend(query, keys, values, causal_allowed(key_positions, read, positions), scaling)
        if accumulate is not None:
            got = received_attention(query, keys, key_positions, read, positions, valid, scaling) * read
            delta = torch.zeros(view.valid.shape, device=got.device).scatter_add_(2, slots, got)
            storage.add_aux(accumulate, view, delta)
        self._count(read.sum(2), view.lengths, valid)
        return out.masked_fill(~valid[:, None, :, None], 0.0)

    def _attend_pages(
        self,
        storage: KVStorage,
        paged: tuple[int, list[torch.Tensor]],  # (entries per page, summary per row page): `page_summaries`
        query: torch.Tensor,  # (batch, q_heads, 1, head_dim)
        positions: torch.Tensor,  # (1,)
        valid: torch.Tensor,  # (batch, 1) bool
        scaling: float,
        accumulate: str | None,
    ) -> torch.Tensor:  # (batch, q_heads, 1, head_dim)
        """The step over the chosen blocks of a block memory, read where they lie."""
        page, summary = paged
        lengths = storage.lengths
        pages, used = chosen_pages(page_scores(self.kind, query, summary, lengths, page), lengths, self.fraction, page)
        if accumulate is None and bool(valid.all()):
            out = storage.decode_pages(query, pages, used, scaling)
            if out is not None:  # a kernel read them where they lie
                self._count(entries_read(lengths, used, page), lengths, valid)
                return out
        keys, values, slots, key_positions, read = storage.read_pages(pages, used)
        out = attend(query, keys, values, causal_allowed(key_positions, read, positions), scaling)
        if accumulate is not None:
            got = received_attention(query, keys, key_positions, read, positions, valid, scaling) * read
            storage.add_aux_at(accumulate, slots, got)
        self._count(read.sum(2), lengths, valid)
        return out.masked_fill(~valid[:, None, :, None], 0.0)

    def _count(self, read: torch.Tensor, lengths: torch.Tensor, valid: torch.Tensor) -> None:
        """Entries read and held (batch, kv_heads) this step, for the sequences whose step is
        real (batch, 1) `valid`."""
        counted = valid[:, 0].cpu()
        self.read += read.sum(1).cpu() * counted
        self.held += lengths.sum(1).cpu() * counted
