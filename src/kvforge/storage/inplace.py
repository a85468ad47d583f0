"""In-place row storage: each (sequence, KV head) row owns a buffer with spare capacity.

    keys[r]: (capacity_r, head_dim)   entries 0 .. length_r - 1 are held, oldest first

Appends write into the spare capacity (growth amortized: 1.25x or GROWTH_MIN entries, whichever
is more), attention reads each row's `[:length_r]` slice directly (no copy of what is held, for
rows of any length), and eviction compacts a row in place, reallocating only when more than a
quarter of its buffer would sit idle. Invariant after every operation, per row:

    capacity_r <= 1.25 * (length_r + reserve) + GROWTH_MIN

where `reserve` is the room the last compaction was asked to leave (the decoding eviction
interval). Rows are separate tensors so heads and sequences may hold very different counts
(head-wise budgets) with the bytes to show it, and a row can join or leave a batch without
touching the others: a paged block pool is the same idea with fixed-size pieces.

Rows may be borrowed from another storage (`share`, `stack`): a borrowed row is copied before its
first write, so a recorded prefill serves any number of derived caches unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from kvforge.attention import attention_probs_sum
from kvforge.storage.base import KVStorage, PaddedView, time_ordered

GROWTH = 1.25
GROWTH_MIN = 16


def valid_index(valid: torch.Tensor) -> list[slice | torch.Tensor]:
    """Per sequence, which of the chunk's T tokens are real: a slice when they are contiguous
    (left or right padding, the usual case), else an index tensor. valid: (batch, T) bool."""
    batch, t = valid.shape
    if bool(valid.all()):
        return [slice(0, t)] * batch
    out: list[slice | torch.Tensor] = []
    for row in valid:
        idx = row.nonzero().flatten()
        n = idx.numel()
        first = int(idx[0]) if n else 0
        out.append(slice(first, first + n) if n == 0 or int(idx[-1]) - first + 1 == n else idx)
    return out


def count(sel: slice | torch.Tensor) -> int:
    return sel.stop - sel.start if isinstance(sel, slice) else sel.numel()


class ChunkMasks:
    """(n, held + n) bool masks, built once per (n, held) and shared by the rows of one call: the
    last n entries of a row are the chunk's own tokens (causal among themselves); everything held
    before them is older than every query and fully visible."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.built: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, n: int, held: int) -> torch.Tensor:
        if (n, held) not in self.built:
            mask = torch.ones(n, held + n, dtype=torch.bool, device=self.device)
            mask[:, held:] = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
            self.built[(n, held)] = mask
        return self.built[(n, held)]


class InPlaceKV(KVStorage):
    """The K/V entries one attention layer holds, one growable buffer per (sequence, KV head)."""

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
        rows = batch * kv_heads
        empty = torch.empty(0, head_dim, dtype=dtype, device=self.device)
        self.k: list[torch.Tensor] = [empty] * rows  # (capacity, head_dim) each
        self.v: list[torch.Tensor] = [empty] * rows
        self.pos: list[torch.Tensor] = [torch.empty(0, dtype=torch.int32, device=self.device)] * rows  # (capacity,)
        self.aux: dict[str, list[torch.Tensor]] = {
            name: [torch.empty(0, dtype=torch.float32, device=self.device)] * rows for name in aux_names
        }
        self.len: list[int] = [0] * rows
        # False: K, V and positions may be shared with another storage; copy before writing.
        # Policy state (aux) is always this storage's own.
        self.owned: list[bool] = [False] * rows
        self._last_valid: torch.Tensor | None = None
        self._last_index: list[slice | torch.Tensor] = []

    # --- sizes -------------------------------------------------------------------------------

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor(self.len, dtype=torch.int64).view(self.batch, self.kv_heads)

    @property
    def entries(self) -> int:
        return sum(self.len)

    def capacity(self, r: int) -> int:
        return self.k[r].shape[0]

    @property
    def allocated_nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.k, self.v))

    @property
    def meta_nbytes(self) -> int:
        state = sum(t.nbytes for rows in self.aux.values() for t in rows)
        return sum(p.nbytes for p in self.pos) + state + 8 * len(self.len)

    # --- writing -----------------------------------------------------------------------------

    def _resize(self, r: int, capacity: int) -> None:
        """Give row r buffers of `capacity` entries holding its current entries (a copy)."""
        n = self.len[r]

        def moved(t: torch.Tensor) -> torch.Tensor:
            out = t.new_empty((capacity, *t.shape[1:]))
            out[:n] = t[:n]
            return out

        self.k[r], self.v[r], self.pos[r] = moved(self.k[r]), moved(self.v[r]), moved(self.pos[r])
        for rows in self.aux.values():
            rows[r] = moved(rows[r])
        self.owned[r] = True

    def _make_room(self, r: int, extra: int, exact: bool) -> None:
        need = self.len[r] + extra
        if need <= self.capacity(r) and self.owned[r]:
            return
        if need <= self.capacity(r):  # borrowed: copy at the same capacity
            self._resize(r, self.capacity(r))
            return
        # An empty row takes exactly its first chunk (a one-shot prompt allocates what it holds).
        exact = exact or self.len[r] == 0
        grown = need if exact else max(math.ceil(GROWTH * need), need + GROWTH_MIN)
        self._resize(r, grown)

    def append(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        exact: bool = False,
    ) -> None:
        positions = positions.to(device=self.device, dtype=torch.int32)
        for b, sel in enumerate(self._valid_index(valid)):
            n = count(sel)
            if n == 0:
                continue
            kb, vb, pb = keys[b][:, sel], values[b][:, sel], positions[sel]  # (heads, n, dim), (n,)
            for h in range(self.kv_heads):
                r = b * self.kv_heads + h
                self._make_room(r, n, exact)
                start = self.len[r]
                self.k[r][start : start + n] = kb[h]
                self.v[r][start : start + n] = vb[h]
                self.pos[r][start : start + n] = pb
                for rows in self.aux.values():
                    rows[r][start : start + n] = 0.0
                self.len[r] = start + n

    def _valid_index(self, valid: torch.Tensor) -> list[slice | torch.Tensor]:
        # append() and attend() of one chunk get the same mask: work it out once.
        if self._last_valid is not valid:
            self._last_valid, self._last_index = valid, valid_index(valid)
        return self._last_index

    # --- reading -----------------------------------------------------------------------------

    def _reading_rows(
        self, query: torch.Tensor, valid: torch.Tensor
    ) -> Iterator[tuple[int, int, slice | torch.Tensor, torch.Tensor]]:
        """(row, sequence, which chunk tokens, queries) for every row with real queries; the
        queries, (group, n, head_dim), are the valid ones of that sequence that read that row."""
        group = query.shape[1] // self.kv_heads
        for b, sel in enumerate(self._valid_index(valid)):
            if count(sel) == 0:
                continue
            for h in range(self.kv_heads):
                yield b * self.kv_heads + h, b, sel, query[b, h * group : (h + 1) * group][:, sel]

    def attend(
        self, query: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, scaling: float, accumulate: str | None = None
    ) -> torch.Tensor:
        batch, q_heads, t, dim = query.shape
        group = q_heads // self.kv_heads
        out = query.new_zeros(batch, q_heads, t, dim)
        masks = ChunkMasks(query.device)
        for r, b, sel, q in self._reading_rows(query, valid):
            n, length = q.shape[1], self.len[r]
            k = self.k[r][:length][None, None]  # (1, 1, length, dim): a view, no copy
            v = self.v[r][:length][None, None]
            if n == 1 and accumulate is not None:
                # A decoding step whose attention is also policy state: compute the softmax
                # once, for the output and for the state.
                probs = torch.softmax((q[:, 0] @ k[0, 0].T).float() * scaling, dim=-1)  # (group, length)
                self.aux[accumulate][r][:length] += probs.mean(0)
                o = probs.to(v.dtype) @ v[0, 0]  # (group, dim)
            elif n == 1:
                # One query: every held entry is in its past, no mask. The group's query heads
                # share the one KV head (GQA), which keeps the heads parallel inside the call.
                o = F.scaled_dot_product_attention(q[None], k, v, scale=scaling, enable_gqa=True)
            elif length == n:
                o = F.scaled_dot_product_attention(q[None], k, v, is_causal=True, scale=scaling, enable_gqa=True)
            else:
                o = F.scaled_dot_product_attention(q[None], k, v, attn_mask=masks(n, length - n), scale=scaling, enable_gqa=True)
            h = r % self.kv_heads
            out[b, h * group : (h + 1) * group, sel] = o.view(group, n, dim)
            if n > 1 and accumulate is not None:
                self._accumulate_row(accumulate, r, q, masks, scaling)
        return out

    def accumulate_attention(
        self, name: str, query: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, scaling: float
    ) -> None:
        masks = ChunkMasks(query.device)
        for r, _, _, q in self._reading_rows(query, valid):
            self._accumulate_row(name, r, q, masks, scaling)

    def _accumulate_row(self, name: str, r: int, q: torch.Tensor, masks: ChunkMasks, scaling: float) -> None:
        """Add the attention row r's entries receive from q, (group, n, dim), to aux[name]."""
        n, length = q.shape[1], self.len[r]
        keys = self.k[r][:length]  # (length, dim)
        if n == 1:  # one softmax row per query head, nothing masked
            probs = torch.softmax((q[:, 0].float() @ keys.float().T) * scaling, dim=-1)  # (group, length)
            self.aux[name][r][:length] += probs.mean(0)
            return
        allowed = masks(n, length - n)[None, None]  # (1, 1, n, length)
        weight = torch.ones(1, n, device=q.device)
        received = attention_probs_sum(q[None], keys[None, None], allowed, weight, scaling)
        self.aux[name][r][:length] += received.view(length)

    def _padded(self, rows: list[torch.Tensor], slots: int, dtype: torch.dtype) -> torch.Tensor:
        """(batch, kv_heads, slots, *rest): each row's held entries, zeros past its length."""
        out = torch.zeros(self.batch, self.kv_heads, slots, *rows[0].shape[1:], dtype=dtype, device=self.device)
        for r, n in enumerate(self.len):
            out[r // self.kv_heads, r % self.kv_heads, :n] = rows[r][:n]
        return out

    def view(self) -> PaddedView:
        slots = max(self.len, default=0)
        valid = torch.arange(slots, device=self.device) < self.lengths.to(self.device)[..., None]
        return PaddedView(
            keys=lambda: self._padded(self.k, slots, self.dtype),  # built only if a policy reads them
            values=lambda: self._padded(self.v, slots, self.dtype),
            positions=self._padded(self.pos, slots, torch.int64),
            valid=valid,
            aux={name: self._padded(rows, slots, torch.float32) for name, rows in self.aux.items()},
        )

    def add_aux(self, name: str, view: PaddedView, delta: torch.Tensor) -> None:
        delta = delta.float().masked_fill(~view.valid, 0.0)
        view.aux[name] = view.aux[name] + delta
        for r, n in enumerate(self.len):
            self.aux[name][r][:n] += delta[r // self.kv_heads, r % self.kv_heads, :n]

    def keep(self, view: PaddedView, index: torch.Tensor, keep_mask: torch.Tensor, reserve: int = 0) -> None:
        # Slot j of a row of the view is entry j of that row here, so the kept entries are read
        # from the rows themselves: the view's K/V are never needed for this.
        index, keep_mask = time_ordered(index, keep_mask, view.valid.shape[-1])
        kept = keep_mask.sum(-1).flatten().tolist()  # (rows,)
        index = index.flatten(0, 1)  # (rows, K)
        for r, n in enumerate(kept):
            if n == self.len[r]:
                continue  # nothing evicted from this row
            idx = index[r, :n]
            rows = [self.k, self.v, self.pos, *self.aux.values()]
            picked = [t[r].index_select(0, idx) for t in rows]  # the only temporaries
            target = n + reserve
            if self.owned[r] and self.capacity(r) <= GROWTH * target:
                for t, new in zip(rows, picked):
                    t[r][:n] = new  # compact in place
            else:
                # Free what would sit idle: new buffers of exactly the kept entries + reserve.
                for t, new in zip(rows, picked):
                    t[r] = torch.cat([new, new.new_empty((reserve, *new.shape[1:]))]) if reserve else new
                self.owned[r] = True
            self.len[r] = n

    # --- policy state and sharing ------------------------------------------------------------

    def export_aux(self) -> dict[str, object]:
        return {name: [t[:n].clone() for t, n in zip(rows, self.len)] for name, rows in self.aux.items()}

    def import_aux(self, state: dict[str, object]) -> None:
        for name, rows in state.items():
            assert isinstance(rows, list)
            for r, t in enumerate(rows):
                self.aux[name][r][: t.shape[0]] = t

    def _borrowing(self, aux_names: tuple[str, ...]) -> InPlaceKV:
        other = InPlaceKV.__new__(InPlaceKV)
        other.batch, other.kv_heads, other.head_dim = self.batch, self.kv_heads, self.head_dim
        other.dtype, other.device, other.aux_names = self.dtype, self.device, aux_names
        other.k, other.v, other.pos, other.len = list(self.k), list(self.v), list(self.pos), list(self.len)
        other.owned = [False] * len(self.len)
        other._last_valid, other._last_index = None, []
        return other

    def share(self, aux_names: tuple[str, ...]) -> InPlaceKV:
        other = self._borrowing(aux_names)
        other.aux = {
            name: [torch.zeros(k.shape[0], dtype=torch.float32, device=self.device) for k in self.k] for name in aux_names
        }
        return other

    @classmethod
    def stack(cls, parts: list[KVStorage], shifts: list[int]) -> InPlaceKV:
        if not all(isinstance(p, InPlaceKV) and p.batch == 1 for p in parts):
            raise ValueError("InPlaceKV.stack takes single-sequence InPlaceKV storages")
        first = parts[0]
        assert isinstance(first, InPlaceKV)
        out = first._borrowing(first.aux_names)
        out.batch = len(parts)
        out.k, out.v, out.pos, out.len = [], [], [], []
        out.aux = {name: [] for name in first.aux}
        for part, shift in zip(parts, shifts):
            assert isinstance(part, InPlaceKV)
            out.k += part.k
            out.v += part.v
            out.len += part.len
            # Positions are rewritten (a small int32 copy); K/V stay borrowed.
            out.pos += [p + shift if shift else p for p in part.pos]
            for name in out.aux:
                out.aux[name] += [t.clone() for t in part.aux[name]]
        out.owned = [False] * len(out.len)
        return out
