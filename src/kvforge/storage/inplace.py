"""In-place row storage: each (sequence, KV head) row owns a buffer with spare capacity.

    keys[r]: (capacity_r, head_dim)   entries 0 .. length_r - 1 are held, oldest first

Appends write into the spare capacity (growth amortized: 1.25x or GROWTH_MIN entries, whichever
is more), attention reads each row's `[:length_r]` slice directly (no copy of what is held, for
rows of any length), and eviction compacts a row in place, reallocating only when more than a
quarter of its buffer would sit idle. Invariant after every operation, per row:

    capacity_r <= 1.25 * (length_r + reserve) + GROWTH_MIN

where `reserve` is the room the last compaction was asked to leave (the decoding eviction
interval). While the heads of a sequence hold the same count (every policy but head-wise
budgets), their rows are views of one (kv_heads, capacity, head_dim) slab, so attention reads
the sequence in one call; once the heads differ, each row gets a buffer of its own size, so
heads of different lengths hold exactly their bytes. A sequence joins or leaves a batch without
touching the others: a paged block pool is the same idea with fixed-size pieces.

Rows may be borrowed from another storage (`share`, `stack`): a borrowed row is copied before its
first write, so a recorded prefill serves any number of derived caches unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from kvforge.reading import attention_probs_sum, decode, dense_rows, every_real, kernels, key_rows, received
from kvforge.storage.base import KVStorage, PaddedView, buffers_of, time_ordered

GROWTH = 1.25
GROWTH_MIN = 16


def valid_index(valid: torch.Tensor) -> list[slice | torch.Tensor]:
    """Per sequence, which of the chunk's T tokens are real: a slice when they are contiguous
    (left or right padding, the usual case), else an index tensor. valid: (batch, T) bool."""
    batch, t = valid.shape
    if every_real(valid):
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


def common(counts: list[int]) -> int | None:
    """The one value all of `counts` share, or None when they differ."""
    return counts[0] if counts.count(counts[0]) == len(counts) else None


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
        # Per sequence: (keys, values), each (kv_heads, capacity, head_dim), when the sequence's
        # K and V rows are views of one buffer each. Invariant: a slab is only ever set while the
        # sequence's heads hold the same count (keep() drops it before they differ).
        self.slab: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * batch
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

    def buffers(self) -> dict[int, int]:
        # Counted by buffer, not by row: rows of one slab share it, borrowed rows their lender's.
        return buffers_of([*self.k, *self.v])

    def _rows(self, b: int) -> range:
        return range(b * self.kv_heads, (b + 1) * self.kv_heads)

    def uniform(self, b: int) -> int | None:
        """The count every head of sequence b holds, or None when the heads differ."""
        return common(self.len[b * self.kv_heads : (b + 1) * self.kv_heads])

    @property
    def meta_nbytes(self) -> int:
        state = sum(t.nbytes for rows in self.aux.values() for t in rows)
        return sum(p.nbytes for p in self.pos) + state + 8 * len(self.len)

    # --- writing -----------------------------------------------------------------------------

    def _resize(self, r: int, capacity: int) -> None:
        """Give row r buffers of its own of `capacity` entries holding its entries (a copy)."""
        n = self.len[r]
        self.k[r], self.v[r], self.pos[r] = (self._moved(t[r], n, capacity) for t in (self.k, self.v, self.pos))
        for rows in self.aux.values():
            rows[r] = self._moved(rows[r], n, capacity)
        self.owned[r] = True

    def _resize_seq(self, b: int, capacity: int) -> None:
        """Give sequence b (heads of equal count) one K and one V slab of `capacity` entries per
        head, holding its current entries (a copy); its rows become views of them."""
        n = self.uniform(b)
        assert n is not None
        keys = self.k[0].new_empty((self.kv_heads, capacity, self.head_dim))
        values = torch.empty_like(keys)
        for h, r in enumerate(self._rows(b)):
            keys[h, :n], values[h, :n] = self.k[r][:n], self.v[r][:n]
            self.k[r], self.v[r] = keys[h], values[h]
            self.pos[r] = self._moved(self.pos[r], n, capacity)
            for rows in self.aux.values():
                rows[r] = self._moved(rows[r], n, capacity)
            self.owned[r] = True
        self.slab[b] = (keys, values)

    @staticmethod
    def _moved(t: torch.Tensor, n: int, capacity: int) -> torch.Tensor:
        out = t.new_empty((capacity, *t.shape[1:]))
        out[:n] = t[:n]
        return out

    def _grown(self, held: int, need: int, exact: bool) -> int:
        # An empty row takes exactly its first chunk (a one-shot prompt allocates what it holds).
        return need if exact or held == 0 else max(math.ceil(GROWTH * need), need + GROWTH_MIN)

    def _make_room(self, r: int, extra: int, exact: bool) -> None:
        need = self.len[r] + extra
        if need <= self.capacity(r) and self.owned[r]:
            return
        if need <= self.capacity(r):  # borrowed: copy at the same capacity
            self._resize(r, self.capacity(r))
            return
        self._resize(r, self._grown(self.len[r], need, exact))

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
            held = self.uniform(b)
            if held is not None:
                slab = self.slab[b]
                if slab is None or held + n > slab[0].shape[1] or not all(self.owned[r] for r in self._rows(b)):
                    self._resize_seq(b, self._grown(held, held + n, exact))
                    slab = self.slab[b]
                assert slab is not None
                slab[0][:, held : held + n] = kb  # one write for all heads
                slab[1][:, held : held + n] = vb
            for h, r in enumerate(self._rows(b)):
                if held is None:
                    self._make_room(r, n, exact)
                    self.k[r][self.len[r] : self.len[r] + n] = kb[h]
                    self.v[r][self.len[r] : self.len[r] + n] = vb[h]
                start = self.len[r]
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
        for b, sel in enumerate(self._valid_index(valid)):
            if count(sel) == 0:
                continue
            for h, r in enumerate(self._rows(b)):
                yield r, b, sel, self._group_queries(query, b, h, sel)

    def _group_queries(self, query: torch.Tensor, b: int, h: int, sel: slice | torch.Tensor) -> torch.Tensor:
        """(group, n, head_dim): the valid queries of sequence b whose heads read KV head h."""
        group = query.shape[1] // self.kv_heads
        return query[b, h * group : (h + 1) * group][:, sel]

    def attend(
        self, query: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, scaling: float, accumulate: str | None = None
    ) -> torch.Tensor:
        batch, q_heads, t, dim = query.shape
        if accumulate is not None and kernels.received_enabled(self.device, self.head_dim):
            # The policy state from one kernel over every row (a decoding step of H2O too: then
            # the decoding kernel below gives the output), so the attention below needs none.
            self.accumulate_attention(accumulate, query, positions, valid, scaling)
            accumulate = None
        if t == 1 and accumulate is None and kernels.enabled(self.device) and self._decoding_rows(valid):
            # A decoding step: one Triton kernel reads every row where it lies.
            rows = dense_rows(self.k, self.v, self.len, self.device)
            return decode(query[:, :, 0], [rows], self.kv_heads, scaling)[:, :, None]
        out = query.new_zeros(batch, q_heads, t, dim)
        masks = ChunkMasks(query.device)
        for b, sel in enumerate(self._valid_index(valid)):
            if count(sel) == 0:
                continue
            held, slab = self.uniform(b), self.slab[b]
            if held is not None and slab is not None:
                # Every head holds `held` entries of one slab: one call for the whole sequence.
                keys, values = slab[0][:, :held], slab[1][:, :held]  # (kv_heads, held, dim): views
                out[b, :, sel] = self._attend_rows(b, query[b][:, sel], keys, values, masks, scaling, accumulate)
                continue
            group = q_heads // self.kv_heads
            for h, r in enumerate(self._rows(b)):
                n = self.len[r]
                keys, values = self.k[r][:n][None], self.v[r][:n][None]  # (1, n, dim)
                q = self._group_queries(query, b, h, sel)
                out[b, h * group : (h + 1) * group, sel] = self._attend_rows(b, q, keys, values, masks, scaling, accumulate, first=h)
        return out

    def _decoding_rows(self, valid: torch.Tensor) -> bool:
        """Every sequence's one query is real and every row holds something (the new token)."""
        return all(count(sel) == 1 for sel in self._valid_index(valid)) and min(self.len, default=0) > 0

    def _attend_rows(
        self,
        b: int,
        q: torch.Tensor,  # (heads * group, n, dim): the valid queries that read these rows
        keys: torch.Tensor,  # (heads, held, dim): rows first .. first + heads - 1 of sequence b
        values: torch.Tensor,  # (heads, held, dim)
        masks: ChunkMasks,
        scaling: float,
        accumulate: str | None,
        first: int = 0,
    ) -> torch.Tensor:  # (heads * group, n, dim)
        heads, held, dim = keys.shape
        group, n = q.shape[0] // heads, q.shape[1]
        rows = range(b * self.kv_heads + first, b * self.kv_heads + first + heads)
        if n == 1 and accumulate is not None:
            # A decoding step whose attention is also policy state: the softmax is computed once,
            # for the output and for the state.
            logits = torch.bmm(q.view(heads, group, dim), keys.transpose(1, 2))  # (heads, group, held)
            probs = torch.softmax(logits.float() * scaling, dim=-1)
            received = probs.mean(1)  # (heads, held)
            for h, r in enumerate(rows):
                self.aux[accumulate][r][:held] += received[h]
            return torch.bmm(probs.to(values.dtype), values).view(heads * group, 1, dim)
        # One query: every held entry is in its past, no mask; the chunk alone: causal; a chunk
        # after held entries: the chunk mask. GQA: each KV head serves its group of query heads.
        if n == 1:
            o = F.scaled_dot_product_attention(q[None], keys[None], values[None], scale=scaling, enable_gqa=True)
        elif held == n:
            o = F.scaled_dot_product_attention(q[None], keys[None], values[None], is_causal=True, scale=scaling, enable_gqa=True)
        else:
            mask = masks(n, held - n)
            o = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask, scale=scaling, enable_gqa=True)
        if n > 1 and accumulate is not None:
            for h, r in enumerate(rows):
                self._accumulate_row(accumulate, r, q[h * group : (h + 1) * group], masks, scaling)
        return o[0]

    def accumulate_attention(
        self, name: str, query: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, scaling: float
    ) -> None:
        if kernels.received_enabled(self.device, self.head_dim):
            # Every row in one kernel, read where it lies. A valid query reads the entries at or
            # before its position: everything held before the chunk, and the chunk causally, as
            # ChunkMasks says. Padding queries weigh 0.
            rows = key_rows(self.k, self.pos, self.len, self.device)
            got = received(query, rows, positions, valid, self.kv_heads, scaling)  # (rows, longest)
            for r, n in enumerate(self.len):
                self.aux[name][r][:n] += got[r, :n]
            return
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

    def set_values(self, view: PaddedView, values: torch.Tensor, changed: torch.Tensor) -> None:
        changed = changed & view.valid
        view.replace_values(values, changed)
        for b in range(self.batch):
            for h, r in enumerate(self._rows(b)):
                slots = changed[b, h].nonzero()[:, 0]
                if slots.numel() == 0:
                    continue
                if not self.owned[r]:  # shared with another storage: copy the row first
                    self._resize(r, self.capacity(r))
                    self.slab[b] = None  # this row no longer views the sequence's slab
                self.v[r][slots] = values[b, h, slots].to(self.dtype)

    def set_aux(self, name: str, view: PaddedView, values: torch.Tensor) -> None:
        values = values.float().masked_fill(~view.valid, 0.0)
        view.aux[name] = values
        for r, n in enumerate(self.len):
            self.aux[name][r][:n] = values[r // self.kv_heads, r % self.kv_heads, :n]

    def keep(self, view: PaddedView, index: torch.Tensor, keep_mask: torch.Tensor, reserve: int = 0) -> None:
        # Slot j of a row of the view is entry j of that row here, so the kept entries are read
        # from the rows themselves: the view's K/V are never needed for this.
        index, keep_mask = time_ordered(index, keep_mask, view.valid.shape[-1])
        kept = keep_mask.sum(-1).tolist()  # (batch, heads)
        index = index.flatten(0, 1)  # (rows, K)
        for b, counts in enumerate(kept):
            rows = self._rows(b)
            if all(n == self.len[r] for n, r in zip(counts, rows)):
                continue  # nothing evicted from this sequence
            n = common(counts)
            slab = self.slab[b]
            in_place = (
                slab is not None
                and n is not None
                and all(self.owned[r] for r in rows)
                and slab[0].shape[1] <= GROWTH * (n + reserve)
            )
            if n is None:
                # The heads are about to differ: every row gets its own exact buffer below.
                self.slab[b] = None
            for r, count_r in zip(rows, counts):
                idx = index[r, :count_r]
                picked = [t[r].index_select(0, idx) for t in (self.k, self.v, self.pos, *self.aux.values())]
                for t, new in zip((self.k, self.v, self.pos, *self.aux.values()), picked):
                    if in_place:
                        t[r][:count_r] = new  # compact in place
                    else:
                        t[r] = new  # exactly the kept entries (regrouped into a slab below)
                self.len[r] = count_r
                self.owned[r] = True
            if n is not None and not in_place:
                # Free what would sit idle: one slab of exactly the kept entries + reserve.
                self.slab[b] = None
                self._resize_seq(b, n + reserve)

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
        other.slab = list(self.slab)
        other.owned = [False] * len(self.len)
        other._last_valid, other._last_index = None, []
        return other

    def share(self, aux_names: tuple[str, ...]) -> InPlaceKV:
        other = self._borrowing(aux_names)
        # Both sides now read the same buffers: either copies a row before writing to it.
        self.owned = [False] * len(self.len)
        other.aux = {
            name: [torch.zeros(k.shape[0], dtype=torch.float32, device=self.device) for k in self.k] for name in aux_names
        }
        return other

    @classmethod
    def stack(cls, parts: list[KVStorage], shifts: list[int], take: bool = False) -> InPlaceKV:
        if not all(isinstance(p, InPlaceKV) for p in parts):
            raise ValueError("InPlaceKV.stack takes InPlaceKV storages")
        first = parts[0]
        assert isinstance(first, InPlaceKV)
        out = first._borrowing(first.aux_names)
        out.batch = sum(p.batch for p in parts)  # type: ignore[attr-defined]
        out.k, out.v, out.pos, out.len, out.slab, out.owned = [], [], [], [], [], []
        out.aux = {name: [] for name in first.aux}
        for part, shift in zip(parts, shifts):
            assert isinstance(part, InPlaceKV)
            out.slab += part.slab
            out.k += part.k
            out.v += part.v
            out.len += part.len
            # Borrowed rows are copied before their first write; taken ones stay as they were.
            out.owned += part.owned if take else [False] * len(part.len)
            # Positions are rewritten (a small int32 copy); K/V stay where they are.
            out.pos += [p + shift if shift else p for p in part.pos]
            for name in out.aux:
                out.aux[name] += part.aux[name] if take else [t.clone() for t in part.aux[name]]
        return out

    def select(self, sequences: list[int]) -> InPlaceKV:
        out = self._borrowing(self.aux_names)
        rows = [r for b in sequences for r in self._rows(b)]
        out.batch = len(sequences)
        out.k, out.v, out.pos = [self.k[r] for r in rows], [self.v[r] for r in rows], [self.pos[r] for r in rows]
        out.len, out.owned = [self.len[r] for r in rows], [self.owned[r] for r in rows]
        out.slab = [self.slab[b] for b in sequences]
        out.aux = {name: [state[r] for r in rows] for name, state in self.aux.items()}
        return out
