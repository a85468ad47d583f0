"""Ragged per-head K/V storage: each (sequence, KV head) pair holds its own number of entries.

Entries live in one flat tensor per layer, ordered by sequence, then KV head, then time:

    keys: (entries, head_dim)   segment s = b * kv_heads + h holds lengths[b, h] rows

so nothing is stored for padding or for evicted tokens, and heads of one sequence may keep
different counts (head-wise budgets). Attention reads a padded copy built per call
(`view()`); that copy is transient working memory, the flat tensors are what is held. Every
append rebuilds the flat tensors: exact bytes, but O(held) copies per step. The in-place layout
(`inplace.py`) is the default; this one is the reference it is tested against.
"""

from __future__ import annotations

import torch

from kvforge.reading import every_real
from kvforge.storage.viewread import ReadsView
from kvforge.storage.base import KVStorage, PaddedView, buffers_of, exclusive_cumsum, gather_slots, sequence_rows, spans, time_ordered


class RaggedKV(ReadsView):
    """The K/V entries one attention layer holds, ragged over (sequence, KV head), in one flat tensor."""

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        aux_names: tuple[str, ...] = (),
    ) -> None:
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.dtype, self.device, self.aux_names = dtype, torch.device(device), aux_names
        self.keys = torch.empty(0, head_dim, dtype=dtype, device=device)  # (entries, head_dim)
        self.values = torch.empty(0, head_dim, dtype=dtype, device=device)  # (entries, head_dim)
        # int32 is enough for any context length a model has and halves the index overhead.
        self.positions = torch.empty(0, dtype=torch.int32, device=device)  # (entries,)
        self._lengths = torch.zeros(batch, kv_heads, dtype=torch.int64, device=device)
        # Per-entry policy state (e.g. accumulated attention for H2O), float32: (entries,)
        self.aux = {name: torch.empty(0, dtype=torch.float32, device=device) for name in aux_names}

    @property
    def lengths(self) -> torch.Tensor:
        return self._lengths

    @lengths.setter
    def lengths(self, value: torch.Tensor) -> None:
        self._lengths = value

    @property
    def entries(self) -> int:
        return self.keys.shape[0]

    def buffers(self) -> dict[int, int]:
        """The K and V tensors held (no spare capacity in this layout)."""
        return buffers_of([self.keys, self.values])

    @property
    def meta_nbytes(self) -> int:
        """Bytes of the bookkeeping held beside K/V: positions, lengths, policy state."""
        return self.positions.nbytes + self.lengths.nbytes + sum(t.nbytes for t in self.aux.values())

    def append(
        self,
        keys: torch.Tensor,  # (batch, kv_heads, T, head_dim)
        values: torch.Tensor,  # (batch, kv_heads, T, head_dim)
        positions: torch.Tensor,  # (T,) logical index of each new token
        valid: torch.Tensor,  # (batch, T) bool; padding tokens are not stored
        exact: bool = False,  # no spare capacity in this layout: always exact
    ) -> None:
        batch, heads, t, dim = keys.shape
        device = self.keys.device
        if self.uniform_length() is not None and every_real(valid):
            self._append_dense(keys, values, positions)
            return
        counts = valid.sum(1)  # (batch,)
        old_len = self.lengths.flatten()  # (S,)
        new_len = (self.lengths + counts[:, None]).flatten()  # (S,)
        new_off = exclusive_cumsum(new_len)
        total = int(new_len.sum())

        # Old entries keep their order and move to the start of their (grown) segment.
        dest_old = spans(new_off, old_len)  # (entries,)

        # New valid tokens go after them, in time order, once per KV head.
        b_idx, t_idx = valid.nonzero(as_tuple=True)  # (M,)
        rank = (valid.cumsum(1) - 1)[b_idx, t_idx]  # (M,) index among the sequence's new tokens
        seg_new = b_idx[:, None] * heads + torch.arange(heads, device=device)[None, :]  # (M, heads)
        dest_new = (new_off[seg_new] + old_len[seg_new] + rank[:, None]).flatten()  # (M * heads,)

        def merge(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            out = old.new_empty((total, *old.shape[1:]))
            out.index_copy_(0, dest_old, old)
            out.index_copy_(0, dest_new, new)
            return out

        self.keys = merge(self.keys, keys[b_idx, :, t_idx].reshape(-1, dim))  # (M, heads, dim) -> rows
        self.values = merge(self.values, values[b_idx, :, t_idx].reshape(-1, dim))
        new_pos = positions.to(device=device, dtype=torch.int32)[t_idx][:, None].expand(-1, heads)
        self.positions = merge(self.positions, new_pos.flatten())
        for name, state in self.aux.items():
            self.aux[name] = merge(state, state.new_zeros(dest_new.numel()))
        self.lengths = new_len.view(batch, heads)

    def share(self, aux_names: tuple[str, ...]) -> RaggedKV:
        """A storage over the same K/V tensors with fresh policy state. Safe because K/V are
        never written in place: append and keep build new tensors."""
        other = RaggedKV.__new__(RaggedKV)
        other.batch, other.kv_heads, other.head_dim = self.batch, self.kv_heads, self.head_dim
        other.dtype, other.device, other.aux_names = self.dtype, self.device, aux_names
        other.keys, other.values, other.positions, other.lengths = self.keys, self.values, self.positions, self.lengths
        other.aux = {name: torch.zeros(self.entries, dtype=torch.float32, device=self.keys.device) for name in aux_names}
        return other

    def _append_dense(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Fast path: rows all equal and every new token real, so the flat layout is a dense
        (batch, heads, L, dim) tensor and appending is one concatenation along time."""
        batch, heads, t, dim = keys.shape
        length = self.entries // (batch * heads)

        def cat(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            return torch.cat([old.view(batch, heads, length, *new.shape[3:]), new], dim=2).reshape(-1, *new.shape[3:])

        self.keys = cat(self.keys, keys)
        self.values = cat(self.values, values)
        new_pos = positions.to(device=keys.device, dtype=torch.int32).expand(batch, heads, t)
        self.positions = cat(self.positions, new_pos)
        for name, state in self.aux.items():
            self.aux[name] = cat(state, state.new_zeros(batch, heads, t))
        self.lengths = self.lengths + t

    def _slot_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, heads, slots) row of the flat storage behind each padded slot, and its validity.
        Padding slots point at row 0 (any real row): they are masked, and must not be NaN."""
        batch, heads = self.lengths.shape
        slots = int(self.lengths.max()) if self.lengths.numel() and self.entries else 0
        offsets = exclusive_cumsum(self.lengths.flatten()).view(batch, heads)
        ar = torch.arange(slots, device=self.keys.device)
        valid = ar < self.lengths[..., None]  # (batch, heads, slots)
        return torch.where(valid, offsets[..., None] + ar, 0), valid

    def view(self) -> PaddedView:
        """What is held as (batch, kv_heads, slots, ...) tensors, padded to the longest row.

        When every row has the same length this is a view of the storage (no copy)."""
        batch, heads = self.lengths.shape
        length = self.uniform_length()
        if length is not None and self.entries:
            return PaddedView(
                keys=self.keys.view(batch, heads, length, -1),
                values=self.values.view(batch, heads, length, -1),
                positions=self.positions.view(batch, heads, length).long(),
                valid=torch.ones(batch, heads, length, dtype=torch.bool, device=self.keys.device),
                aux={name: state.view(batch, heads, length) for name, state in self.aux.items()},
            )
        idx, valid = self._slot_rows()

        def take(t: torch.Tensor) -> torch.Tensor:  # (entries, *rest) -> (batch, heads, slots, *rest)
            # index_select rather than `t[idx]`: the same copy, about 3x faster on CPU.
            return t.index_select(0, idx.flatten()).view(*idx.shape, *t.shape[1:])

        return PaddedView(
            keys=take(self.keys),
            values=take(self.values),
            positions=take(self.positions).long(),
            valid=valid,
            aux={name: take(state) for name, state in self.aux.items()},
        )

    def add_aux(self, name: str, view: PaddedView, delta: torch.Tensor) -> None:
        delta = delta.float().masked_fill(~view.valid, 0.0)
        view.aux[name] = view.aux[name] + delta
        rows, valid = self._slot_rows()
        self.aux[name].index_add_(0, rows[valid], delta[valid])

    def set_values(self, view: PaddedView, values: torch.Tensor, changed: torch.Tensor) -> None:
        changed = changed & view.valid
        view.replace_values(values, changed)
        rows, _ = self._slot_rows()
        self.values = self.values.clone()  # K/V tensors may be shared with another storage (share())
        self.values[rows[changed]] = values[changed].to(self.values.dtype)

    def set_aux(self, name: str, view: PaddedView, values: torch.Tensor) -> None:
        values = values.float().masked_fill(~view.valid, 0.0)
        view.aux[name] = values
        rows, valid = self._slot_rows()
        self.aux[name][rows[valid]] = values[valid]

    def keep(self, view: PaddedView, index: torch.Tensor, keep_mask: torch.Tensor, reserve: int = 0) -> None:
        index, keep_mask = time_ordered(index, keep_mask, view.valid.shape[-1])

        def take(t: torch.Tensor) -> torch.Tensor:  # (batch, heads, slots, *rest) -> (kept, *rest)
            return gather_slots(t, index)[keep_mask]

        self.keys = take(view.keys)
        self.values = take(view.values)
        self.positions = take(view.positions).to(torch.int32)
        self.aux = {name: take(state) for name, state in view.aux.items()}
        self.lengths = keep_mask.sum(-1)

    def export_aux(self) -> dict[str, object]:
        return {name: state.clone() for name, state in self.aux.items()}

    def import_aux(self, state: dict[str, object]) -> None:
        self.aux = {name: t.clone() for name, t in state.items()}  # type: ignore[union-attr]

    @classmethod
    def stack(cls, parts: list[KVStorage], shifts: list[int], take: bool = False) -> RaggedKV:
        if not all(isinstance(p, RaggedKV) for p in parts):
            raise ValueError("RaggedKV.stack takes RaggedKV storages")
        first = parts[0]
        out = RaggedKV(sum(p.batch for p in parts), first.kv_heads, first.head_dim, first.dtype, first.device, first.aux_names)
        out.keys = torch.cat([p.keys for p in parts])  # type: ignore[attr-defined]
        out.values = torch.cat([p.values for p in parts])  # type: ignore[attr-defined]
        out.positions = torch.cat([p.positions + shift for p, shift in zip(parts, shifts)])  # type: ignore[attr-defined]
        out.lengths = torch.cat([p.lengths for p in parts])
        out.aux = {name: torch.cat([p.aux[name] for p in parts]) for name in first.aux_names}  # type: ignore[attr-defined]
        return out

    def select(self, sequences: list[int]) -> RaggedKV:
        out = RaggedKV(len(sequences), self.kv_heads, self.head_dim, self.dtype, self.device, self.aux_names)
        rows = sequence_rows(self.lengths, sequences)
        out.keys, out.values, out.positions = (t.index_select(0, rows) for t in (self.keys, self.values, self.positions))
        out.aux = {name: t.index_select(0, rows) for name, t in self.aux.items()}
        out.lengths = self.lengths[sequences]
        return out
