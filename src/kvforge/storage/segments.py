"""Ragged per-row fields in flat tensors: the bookkeeping under the quantized layout.

    field: (entries, *rest)   rows r = b * kv_heads + h in order, each lengths[b, h] entries, oldest first

Every operation builds new tensors (nothing is written in place but policy state), so two
`Segments` may share fields safely: a recorded prefill serves many derived caches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.storage.base import exclusive_cumsum, sequence_rows, spans


@dataclass
class Segments:
    fields: dict[str, torch.Tensor]  # name -> (entries, *rest)
    lengths: torch.Tensor  # (batch, kv_heads) int64, on the fields' device

    @classmethod
    def empty(cls, batch: int, kv_heads: int, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device) -> Segments:
        fields = {name: torch.empty(0, *rest, dtype=dtype, device=device) for name, (rest, dtype) in shapes.items()}
        return cls(fields, torch.zeros(batch, kv_heads, dtype=torch.int64, device=device))

    @property
    def entries(self) -> int:
        return int(self.lengths.sum())

    def uniform(self) -> int | None:
        """The common row length when every row holds the same count, else None."""
        first = int(self.lengths.view(-1)[0]) if self.lengths.numel() else 0
        return first if bool((self.lengths == first).all()) else None

    def offsets(self) -> torch.Tensor:
        """(batch, kv_heads) flat index of each row's first entry."""
        return exclusive_cumsum(self.lengths.flatten()).view_as(self.lengths)

    def slot_rows(self, slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, kv_heads, slots) flat index behind each padded slot (0 on padding) and validity."""
        width = int(self.lengths.max()) if slots is None and self.lengths.numel() else (slots or 0)
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

    def select(self, rows: torch.Tensor, lengths: torch.Tensor) -> Segments:
        """The entries at flat `rows` (M,), in order, forming rows of `lengths` (batch, kv_heads)."""
        return Segments({name: t.index_select(0, rows) for name, t in self.fields.items()}, lengths)

    def sequences(self, sequences: list[int]) -> Segments:
        """Only these sequences' rows, in this order."""
        return self.select(sequence_rows(self.lengths, sequences), self.lengths[sequences])

    def extend(self, new: dict[str, torch.Tensor], counts: torch.Tensor) -> Segments:
        """Append to each row r the first counts[b, h] entries of new[name][b, h]:
        new: name -> (batch, kv_heads, n, *rest), counts: (batch, kv_heads)."""
        batch, heads = self.lengths.shape
        n = next(iter(new.values())).shape[2]
        held = self.uniform()
        if held is not None and bool((counts == n).all()):
            # Every row grows by the same n: the flat tensors are dense (batch, heads, L, ...).
            def cat(old: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
                return torch.cat([old.view(batch, heads, held, *add.shape[3:]), add.to(old.dtype)], 2).reshape(-1, *add.shape[3:])

            return Segments({k: cat(t, new[k]) for k, t in self.fields.items()}, self.lengths + n)
        old_len, add_len = self.lengths.flatten(), counts.flatten().to(self.lengths.device)
        new_len = old_len + add_len
        starts = exclusive_cumsum(new_len)
        dest_old = spans(starts, old_len)
        dest_new = spans(starts + old_len, add_len)
        take = torch.arange(n, device=counts.device) < counts[..., None]  # (batch, heads, n)
        total = int(new_len.sum())
        fields = {}
        for name, t in self.fields.items():
            out = t.new_empty(total, *t.shape[1:])
            out.index_copy_(0, dest_old, t)
            out.index_copy_(0, dest_new, new[name][take].to(t.dtype))
            fields[name] = out
        return Segments(fields, new_len.view(batch, heads))

    def with_fields(self, **fields: torch.Tensor) -> Segments:
        return Segments({**self.fields, **fields}, self.lengths)

    @staticmethod
    def cat(parts: list[Segments]) -> Segments:
        """Sequences of `parts` one after the other (batch dimension)."""
        names = parts[0].fields
        return Segments(
            {name: torch.cat([p.fields[name] for p in parts]) for name in names},
            torch.cat([p.lengths for p in parts]),
        )
