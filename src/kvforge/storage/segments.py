"""Ragged per-row fields in flat tensors: the bookkeeping under the quantized layout.

    field: (entries, *rest)   rows r = b * kv_heads + h in order, each lengths[b, h] entries, oldest first

Every operation builds new tensors (nothing is written in place but policy state), so two
`Segments` may share fields safely: a recorded prefill serves many derived caches.

The row lengths are kept twice: on the fields' device (for index arithmetic there) and on the host
(`counts`, for sizes and shapes), so a decoding step never reads a length back from a GPU. Where
an operation knows the new lengths on the host it passes them on; otherwise they are read back
once, on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvforge.storage.base import exclusive_cumsum, sequence_rows, spans


@dataclass
class Segments:
    fields: dict[str, torch.Tensor]  # name -> (entries, *rest)
    lengths: torch.Tensor  # (batch, kv_heads) int64, on the fields' device
    host: torch.Tensor | None = field(default=None, repr=False)  # the same on the host, when known

    @classmethod
    def empty(cls, batch: int, kv_heads: int, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device) -> Segments:
        fields = {name: torch.empty(0, *rest, dtype=dtype, device=device) for name, (rest, dtype) in shapes.items()}
        host = torch.zeros(batch, kv_heads, dtype=torch.int64)
        return cls(fields, host.to(device), host)

    @property
    def counts(self) -> torch.Tensor:
        """(batch, kv_heads) int64 row lengths on the host."""
        if self.host is None:
            self.host = self.lengths.cpu()  # the one read back, for lengths decided on the device
        return self.host

    @property
    def entries(self) -> int:
        return int(self.counts.sum())

    @property
    def longest(self) -> int:
        return int(self.counts.max()) if self.counts.numel() else 0

    def uniform(self) -> int | None:
        """The common row length when every row holds the same count, else None."""
        counts = self.counts
        first = int(counts.view(-1)[0]) if counts.numel() else 0
        return first if bool((counts == first).all()) else None

    def offsets(self) -> torch.Tensor:
        """(batch, kv_heads) flat index of each row's first entry."""
        return exclusive_cumsum(self.lengths.flatten()).view_as(self.lengths)

    def slot_rows(self, slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, kv_heads, slots) flat index behind each padded slot (0 on padding) and validity."""
        width = self.longest if slots is None else slots
        ar = torch.arange(width, device=self.lengths.device)
        valid = ar < self.lengths[..., None]
        return torch.where(valid, self.offsets()[..., None] + ar, 0), valid

    def padded(self, name: str, slots: int | None = None) -> torch.Tensor:
        """(batch, kv_heads, slots, *rest): a view when rows are uniform, else a copy (zeros past a
        row's length are whatever entry 0 holds; use `slot_rows` validity)."""
        t = self.fields[name]
        batch, heads = self.lengths.shape
        n = self.uniform()
        if n is not None and (slots is None or slots == n):
            return t.view(batch, heads, n, *t.shape[1:])
        rows, valid = self.slot_rows(slots)
        if t.shape[0] == 0:
            return t.new_zeros(*rows.shape, *t.shape[1:])
        return t.index_select(0, rows.flatten()).view(*rows.shape, *t.shape[1:])

    def select(self, rows: torch.Tensor, lengths: torch.Tensor, counts: torch.Tensor | None = None) -> Segments:
        """The entries at flat `rows` (M,), in order, forming rows of `lengths` (batch, kv_heads);
        `counts`: the same lengths on the host, when the caller knows them."""
        return Segments({name: t.index_select(0, rows) for name, t in self.fields.items()}, lengths, counts)

    def sequences(self, sequences: list[int]) -> Segments:
        """Only these sequences' rows, in this order."""
        return self.select(sequence_rows(self.lengths, sequences), self.lengths[sequences], self.counts[sequences])

    def extend(self, new: dict[str, torch.Tensor], counts: torch.Tensor) -> Segments:
        """Append to each row r the first counts[b, h] entries of new[name][b, h]:
        new: name -> (batch, kv_heads, n, *rest), counts: (batch, kv_heads) int64 on the host."""
        batch, heads = self.lengths.shape
        n = next(iter(new.values())).shape[2]
        held = self.uniform()
        grown = self.counts + counts
        if held is not None and bool((counts == n).all()):
            # Every row grows by the same n: the flat tensors are dense (batch, heads, L, ...).
            def cat(old: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
                return torch.cat([old.view(batch, heads, held, *add.shape[3:]), add.to(old.dtype)], 2).reshape(-1, *add.shape[3:])

            return Segments({k: cat(t, new[k]) for k, t in self.fields.items()}, self.lengths + n, grown)
        old_len, add_len = self.lengths.flatten(), counts.flatten().to(self.lengths.device, non_blocking=True)
        new_len = old_len + add_len
        starts = exclusive_cumsum(new_len)
        # Sizes from the host: nothing here waits for the device.
        held_total, added = int(self.counts.sum()), int(counts.sum())
        dest_old = spans(starts, old_len, held_total)
        dest_new = spans(starts + old_len, add_len, added)
        rows = torch.arange(batch * heads, device=add_len.device)
        source = spans(rows * n, add_len, added)  # the first add_len[r] of row r's n new entries
        fields = {}
        for name, t in self.fields.items():
            out = t.new_empty(held_total + added, *t.shape[1:])
            out.index_copy_(0, dest_old, t)
            out.index_copy_(0, dest_new, new[name].flatten(0, 2).index_select(0, source).to(t.dtype))
            fields[name] = out
        return Segments(fields, new_len.view(batch, heads), grown)

    def with_fields(self, **fields: torch.Tensor) -> Segments:
        return Segments({**self.fields, **fields}, self.lengths, self.host)

    @staticmethod
    def cat(parts: list[Segments]) -> Segments:
        """Sequences of `parts` one after the other (batch dimension)."""
        names = parts[0].fields
        return Segments(
            {name: torch.cat([p.fields[name] for p in parts]) for name in names},
            torch.cat([p.lengths for p in parts]),
            torch.cat([p.counts for p in parts]),
        )
