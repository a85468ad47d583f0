"""Quantized K/V storage: old entries held as packed low-bit codes, recent ones in full precision.

Each row (sequence, KV head) holds, oldest first:

    quantized part   codes of keys and values (`codec.py`), one key group per `group` tokens
    tail             the most recent entries in the model's dtype (KIVI's residual)

in three sets of flat ragged tensors (`Segments`, rows in order, entries oldest first):

    quant   kc (N, code_bytes) uint8   vc (N, code_bytes) uint8   vm (N, fields, head_dim / group) f16
            pos (N,) int32   aux:<name> (N,) f32
    groups  km (NG, fields, head_dim) f16: per-channel scale (and minimum) of one key group
            count (NG,) int32: entries of the group still held
    tail    k (M, head_dim)   v (M, head_dim)   pos (M,) int32   aux:<name> (M,) f32

A group's codes are `count` consecutive (code_bytes,) rows of kc, so a kernel can read a group as
one contiguous block with its scale row beside it.

When entries are quantized (`seal`, called once a chunk has been attended and its policy has
compressed): a row's tail is cut down to fewer than `residual + group` entries by quantizing its
oldest `group` entries at a time. The chunk just appended is therefore always attended in full
precision (as KIVI's prefill is), a policy scores and evicts it before it is quantized, and the
quantized part only ever holds entries older than every query (its attention needs no mask).

Eviction of quantized entries (decoding-time budgets, policies that compress after extra passes)
is exact, with no requantization: an entry's codes and value scales go with it; a key group's
scale and minimum stay, counted in the bytes, until the group's last entry is evicted.

Attention dequantizes at most `BLOCK` tokens of a row set at a time (never the whole cache) and
combines them with the tail in one softmax.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kvforge.attention import attend as dense_attend
from kvforge.attention import attention_probs_sum, causal_allowed
from kvforge.storage.base import KVStorage, PaddedView, time_ordered
from kvforge.storage.codec import (
    META_DTYPE, QuantSpec, code_values, dequantize_keys, dequantize_values, quantize_keys, quantize_values,
)  # fmt: skip
from kvforge.storage.segments import Segments

BLOCK = 4096  # quantized tokens read at once per row (a bounded transient: 4096 x head_dim floats per row)
QUERY_CHUNK = 128  # queries of a prompt chunk attended at once over the quantized part
FOLD_QUERIES = 32  # up to this many queries per KV head, scales are folded into the queries


def aux_field(name: str) -> str:
    return f"aux:{name}"


class QuantizedKV(KVStorage):
    """The K/V entries one attention layer holds, quantized beyond a full-precision recent tail."""

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        aux_names: tuple[str, ...] = (),
        spec: QuantSpec | None = None,
    ) -> None:
        spec = spec if spec is not None else QuantSpec("int4")
        if not spec.enabled:
            raise ValueError("QuantizedKV needs a quantization mode other than 'none'")
        spec.check_head_dim(head_dim)
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.dtype, self.device, self.aux_names, self.spec = dtype, torch.device(device), aux_names, spec
        aux = {aux_field(n): ((), torch.float32) for n in aux_names}
        cb, fields = spec.code_bytes(head_dim), spec.meta_fields
        self.quant = Segments.empty(batch, kv_heads, {
            "kc": ((cb,), torch.uint8), "vc": ((cb,), torch.uint8),
            "vm": ((fields, head_dim // spec.group), META_DTYPE), "pos": ((), torch.int32), **aux,
        }, self.device)  # fmt: skip
        self.groups = Segments.empty(batch, kv_heads, {"km": ((fields, head_dim), META_DTYPE), "count": ((), torch.int32)}, self.device)
        self.tail = Segments.empty(
            batch, kv_heads, {"k": ((head_dim,), dtype), "v": ((head_dim,), dtype), "pos": ((), torch.int32), **aux}, self.device
        )

    # --- sizes -------------------------------------------------------------------------------

    @property
    def lengths(self) -> torch.Tensor:
        return (self.quant.lengths + self.tail.lengths).cpu()

    def _kv_fields(self) -> Iterator[torch.Tensor]:
        yield from (self.quant.fields[n] for n in ("kc", "vc", "vm"))
        yield self.groups.fields["km"]
        yield from (self.tail.fields[n] for n in ("k", "v"))

    @property
    def allocated_nbytes(self) -> int:
        """Codes, scales, minimums and the full-precision tail: every byte that stands for K/V."""
        return sum(t.nbytes for t in self._kv_fields())

    @property
    def kept_nbytes(self) -> int:
        return self.allocated_nbytes  # no spare capacity in this layout

    @property
    def meta_nbytes(self) -> int:
        counts = self.groups.fields["count"].nbytes
        lengths = 3 * self.quant.lengths.nbytes
        other = sum(t.nbytes for s in (self.quant, self.tail) for n, t in s.fields.items() if n == "pos" or n.startswith("aux:"))
        return counts + lengths + other

    def seq_nbytes(self) -> torch.Tensor:
        per_quant = sum(self.quant.fields[n][0:1].nbytes for n in ("kc", "vc", "vm")) if self.quant.fields["kc"].shape[0] else 0
        per_group = self.groups.fields["km"][0:1].nbytes if self.groups.fields["km"].shape[0] else 0
        per_tail = 2 * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()
        total = self.quant.lengths * per_quant + self.groups.lengths * per_group + self.tail.lengths * per_tail
        return total.sum(1).cpu()

    # --- writing -----------------------------------------------------------------------------

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, exact: bool = False) -> None:
        batch, heads, t, _ = keys.shape
        positions = positions.to(device=self.device, dtype=torch.int32)
        if bool(valid.all()):
            pos = positions.expand(batch, heads, t)
        else:
            # Real tokens of each sequence first, in time order (padding is not stored).
            order = torch.sort((~valid).int(), dim=1, stable=True).indices  # (batch, T)
            keys = keys.gather(2, order[:, None, :, None].expand_as(keys))
            values = values.gather(2, order[:, None, :, None].expand_as(values))
            pos = positions[order][:, None].expand(batch, heads, t)
        counts = valid.sum(1)[:, None].expand(batch, heads)
        new = {"k": keys, "v": values, "pos": pos}
        new.update({aux_field(n): keys.new_zeros(batch, heads, t, dtype=torch.float32) for n in self.aux_names})
        self.tail = self.tail.extend(new, counts)

    def seal(self) -> None:
        """Quantize each row's oldest tail entries, a whole key group at a time, until fewer than
        residual + group remain in full precision."""
        group = self.spec.group
        moved = ((self.tail.lengths - self.spec.residual).clamp(min=0) // group) * group  # (batch, heads)
        width = int(moved.max()) if moved.numel() else 0
        if width == 0:
            return
        batch, heads = moved.shape
        take = {name: self.tail.padded(name)[:, :, :width] for name in self.tail.fields}  # (batch, heads, width, ...)
        keys = take.pop("k").reshape(batch, heads, width // group, group, self.head_dim)
        kc, km = quantize_keys(keys, self.spec)  # (b, h, G#, group, cb), (b, h, G#, fields, dim)
        vc, vm = quantize_values(take.pop("v"), self.spec)
        new = {"kc": kc.flatten(2, 3), "vc": vc, "vm": vm, **take}
        self.quant = self.quant.extend(new, moved)
        count = torch.full((batch, heads, width // group), group, dtype=torch.int32, device=self.device)
        self.groups = self.groups.extend({"km": km, "count": count}, moved // group)
        self.tail = self._drop_front(self.tail, moved)

    @staticmethod
    def _drop_front(seg: Segments, counts: torch.Tensor) -> Segments:
        rows, valid = seg.slot_rows()
        ar = torch.arange(rows.shape[-1], device=rows.device)
        keep = valid & (ar >= counts[..., None])
        return seg.select(rows[keep], seg.lengths - counts)

    # --- reading -----------------------------------------------------------------------------

    def _groups_full(self) -> bool:
        """Every row holds the same number of whole groups: the codes are a dense
        (batch, heads, groups, group, code_bytes) tensor."""
        return (
            self.quant.uniform() is not None
            and self.groups.uniform() is not None
            and bool((self.groups.fields["count"] == self.spec.group).all())
        )

    def _entry_group(self) -> torch.Tensor:
        """(N,) the flat group of each quantized entry."""
        counts = self.groups.fields["count"].long()
        return torch.repeat_interleave(torch.arange(counts.numel(), device=self.device), counts)

    def _quant_keys(self, start: int, stop: int) -> torch.Tensor:
        """(batch, heads, stop - start, dim) float32 keys of quantized slots [start, stop)."""
        batch, heads = self.quant.lengths.shape
        if self._groups_full():
            g = self.spec.group
            kc = self.quant.padded("kc")[:, :, start:stop]
            km = self.groups.padded("km")[:, :, start // g : -(-stop // g)]
            keys = dequantize_keys(kc.unflatten(2, (-1, g)), km, self.spec)
            return keys.flatten(2, 3)
        rows, valid = self.quant.slot_rows()
        rows, valid = rows[:, :, start:stop], valid[:, :, start:stop]
        flat = rows[valid]
        meta = self.groups.fields["km"].index_select(0, self._entry_group().index_select(0, flat))  # (n, fields, dim)
        keys = dequantize_keys(self.quant.fields["kc"].index_select(0, flat)[:, None], meta, self.spec)[:, 0]
        out = keys.new_zeros(batch, heads, stop - start, self.head_dim)
        out[valid] = keys
        return out

    def _quant_values(self, start: int, stop: int) -> torch.Tensor:
        """(batch, heads, stop - start, dim) float32 values of quantized slots [start, stop)."""
        vc = self.quant.padded("vc")[:, :, start:stop]
        vm = self.quant.padded("vm")[:, :, start:stop]
        return dequantize_values(vc, vm, self.spec)

    def _blocks(self) -> Iterator[tuple[int, int]]:
        """Slot ranges of at most about BLOCK quantized tokens, aligned to whole key groups."""
        slots = int(self.quant.lengths.max()) if self.quant.lengths.numel() else 0
        step = max(BLOCK // self.spec.group, 1) * self.spec.group
        for start in range(0, slots, step):
            yield start, min(start + step, slots)

    def _attention(
        self, query: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, scaling: float, received: bool
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
        """For each chunk of queries: (first query, output (batch, q_heads, c, dim), attention
        received by the quantized slots (batch, heads, Sq) and by the tail slots (batch, heads, St),
        summed over the chunk's valid queries and averaged over each GQA group; None unless
        `received`)."""
        batch, q_heads, t, dim = query.shape
        heads = self.kv_heads
        group = q_heads // heads
        qlen = self.quant.lengths
        q_slots = int(qlen.max())
        q_valid = torch.arange(q_slots, device=self.device) < qlen[..., None]  # (batch, heads, Sq)
        reader = QuantReader(self) if self._groups_full() else None
        blocks = list(self._blocks())
        tail_k, tail_v = self.tail.padded("k").float(), self.tail.padded("v").float()
        tail_pos, tail_valid = self.tail.padded("pos"), self.tail.slot_rows()[1]
        # (batch, heads, T, St); one query reads its whole tail (every entry held is in its past)
        allowed_t = tail_valid[:, :, None] if t == 1 else causal_allowed(tail_pos.long(), tail_valid, positions)
        for first in range(0, t, QUERY_CHUNK):
            last = min(first + QUERY_CHUNK, t)
            c = last - first
            q = query[:, :, first:last].float().reshape(batch, heads, group * c, dim) * scaling
            if reader is not None:
                logits_q = torch.cat([reader.logits(q, a, b) for a, b in blocks], -1)
            else:
                logits_q = torch.cat([q @ self._quant_keys(a, b).transpose(-1, -2) for a, b in blocks], -1)
                logits_q.masked_fill_(~q_valid[:, :, None], float("-inf"))
            logits_t = (q @ tail_k.transpose(-1, -2)).view(batch, heads, group, c, -1)
            logits_t = logits_t.masked_fill_(~allowed_t[:, :, None, first:last], float("-inf")).view(batch, heads, group * c, -1)
            probs = torch.softmax(torch.cat([logits_q, logits_t], -1), dim=-1)
            p_q, p_t = probs[..., :q_slots], probs[..., q_slots:]
            out = p_t @ tail_v
            for a, b in blocks:
                if reader is not None:
                    out += reader.output(p_q[..., a:b], a, b)
                else:
                    out += p_q[..., a:b] @ self._quant_values(a, b)
            rec_q = rec_t = None
            if received:
                weight = valid[:, None, None, first:last].float() / group  # (batch, 1, 1, c)
                rec_q = (p_q.view(batch, heads, group, c, -1) * weight[..., None]).sum((2, 3))
                rec_t = (p_t.view(batch, heads, group, c, -1) * weight[..., None]).sum((2, 3))
            yield first, out.view(batch, q_heads, c, dim), rec_q, rec_t

    def _tail_only(self, query: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys, values and mask (None: plain causal) of attention over the tail alone."""
        keys, values = self.tail.padded("k"), self.tail.padded("v")
        n = self.tail.uniform()
        plain = bool(valid.all()) and n is not None and (query.shape[2] == 1 or n == query.shape[2])
        if plain:
            return keys, values, None
        return keys, values, causal_allowed(self.tail.padded("pos").long(), self.tail.slot_rows()[1], positions)

    def attend(
        self, query: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, scaling: float, accumulate: str | None = None
    ) -> torch.Tensor:
        if self.quant.entries == 0:
            keys, values, allowed = self._tail_only(query, positions, valid)
            if accumulate is not None:
                self.accumulate_attention(accumulate, query, positions, valid, scaling)
            out = dense_attend(query, keys, values, allowed, scaling)
            return out.masked_fill(~valid[:, None, :, None], 0.0)
        out = query.new_zeros(query.shape)
        for first, chunk, rec_q, rec_t in self._attention(query, positions, valid, scaling, accumulate is not None):
            out[:, :, first : first + chunk.shape[2]] = chunk.to(query.dtype)
            if accumulate is not None:
                assert rec_t is not None
                self._add_received(accumulate, rec_q, rec_t)
        return out.masked_fill(~valid[:, None, :, None], 0.0)

    def accumulate_attention(self, name: str, query: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, scaling: float) -> None:
        if self.quant.entries == 0:
            keys, _, allowed = self._tail_only(query, positions, valid)
            if allowed is None:
                allowed = causal_allowed(self.tail.padded("pos").long(), self.tail.slot_rows()[1], positions)
            self._add_received(name, None, attention_probs_sum(query, keys, allowed, valid, scaling))
            return
        for _, _, rec_q, rec_t in self._attention(query, positions, valid, scaling, True):
            assert rec_t is not None
            self._add_received(name, rec_q, rec_t)

    def _add_received(self, name: str, rec_q: torch.Tensor | None, rec_t: torch.Tensor) -> None:
        field = aux_field(name)
        for seg, rec in ((self.quant, rec_q), (self.tail, rec_t)):
            if rec is None:
                continue
            rows, ok = seg.slot_rows(rec.shape[-1])
            seg.fields[field].index_add_(0, rows[ok], rec[ok].float())

    def view(self) -> PaddedView:
        qlen, tlen = self.quant.lengths, self.tail.lengths
        slots = int((qlen + tlen).max()) if qlen.numel() else 0
        sq = int(qlen.max()) if qlen.numel() else 0
        ar = torch.arange(slots, device=self.device)
        valid = ar < (qlen + tlen)[..., None]
        # Slot j of a row is quantized slot j, or tail slot j - qlen: one gather over both parts.
        index = torch.where(ar < qlen[..., None], ar, sq + ar - qlen[..., None]).clamp(max=max(sq + int(tlen.max()) - 1, 0))

        def joined(q_part: torch.Tensor, t_part: torch.Tensor) -> torch.Tensor:
            both = torch.cat([q_part, t_part.to(q_part.dtype)], 2)  # (batch, heads, sq + st, ...)
            idx = index.view(*index.shape, *([1] * (both.dim() - 3))).expand(*index.shape, *both.shape[3:])
            return torch.gather(both, 2, idx)

        def field(name: str) -> torch.Tensor:
            return joined(self.quant.padded(name, sq), self.tail.padded(name))

        def keys() -> torch.Tensor:
            return joined(self._padded_quant(self._quant_keys, sq), self.tail.padded("k")).to(self.dtype)

        def values() -> torch.Tensor:
            return joined(self._padded_quant(self._quant_values, sq), self.tail.padded("v")).to(self.dtype)

        return PaddedView(
            keys=keys, values=values, positions=field("pos").long(), valid=valid,
            aux={name: field(aux_field(name)) for name in self.aux_names},
        )  # fmt: skip

    def _padded_quant(self, read, slots: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
        if slots == 0:
            return torch.zeros(self.batch, self.kv_heads, 0, self.head_dim, device=self.device)
        return torch.cat([read(a, b) for a, b in self._blocks()], 2)

    def _slot_map(self, slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For (batch, heads, slots) view slots: flat quant row and whether it is one, flat tail row
        and whether it is one."""
        qlen, tlen = self.quant.lengths, self.tail.lengths
        ar = torch.arange(slots, device=self.device)
        in_q = ar < qlen[..., None]
        in_t = ~in_q & (ar < (qlen + tlen)[..., None])
        q_rows = self.quant.offsets()[..., None] + ar
        t_rows = self.tail.offsets()[..., None] + ar - qlen[..., None]
        return q_rows, in_q, t_rows, in_t

    def keep(self, view: PaddedView, index: torch.Tensor, keep_mask: torch.Tensor, reserve: int = 0) -> None:
        index, keep_mask = time_ordered(index, keep_mask, view.valid.shape[-1])
        q_rows, in_q, t_rows, in_t = self._slot_map(view.valid.shape[-1])
        in_q, in_t = torch.gather(in_q, 2, index) & keep_mask, torch.gather(in_t, 2, index) & keep_mask
        kept_q = torch.gather(q_rows, 2, index)[in_q]
        kept_t = torch.gather(t_rows, 2, index)[in_t]
        # Groups lose the entries evicted from them and are dropped once empty.
        counts = torch.bincount(self._entry_group().index_select(0, kept_q), minlength=self.groups.entries)
        alive = counts > 0
        owner = torch.repeat_interleave(torch.arange(self.batch * self.kv_heads, device=self.device), self.groups.lengths.flatten())
        group_len = torch.bincount(owner[alive], minlength=self.batch * self.kv_heads).view(self.batch, self.kv_heads)
        groups = self.groups.with_fields(count=counts.to(torch.int32))
        self.groups = groups.select(alive.nonzero().flatten(), group_len)
        self.quant = self.quant.select(kept_q, in_q.sum(-1))
        self.tail = self.tail.select(kept_t, in_t.sum(-1))

    # --- policy state and sharing ------------------------------------------------------------

    def _split(self, view: PaddedView, per_slot: torch.Tensor) -> Iterator[tuple[Segments, torch.Tensor, torch.Tensor]]:
        """(part, flat rows, per-slot values) of (batch, heads, slots) `per_slot`, for each part."""
        q_rows, in_q, t_rows, in_t = self._slot_map(per_slot.shape[-1])
        yield self.quant, q_rows[in_q], per_slot[in_q]
        yield self.tail, t_rows[in_t], per_slot[in_t]

    def add_aux(self, name: str, view: PaddedView, delta: torch.Tensor) -> None:
        delta = delta.float().masked_fill(~view.valid, 0.0)
        view.aux[name] = view.aux[name] + delta
        for seg, rows, d in self._split(view, delta):
            seg.fields[aux_field(name)].index_add_(0, rows, d)

    def set_aux(self, name: str, view: PaddedView, values: torch.Tensor) -> None:
        values = values.float().masked_fill(~view.valid, 0.0)
        view.aux[name] = values
        for seg, rows, v in self._split(view, values):
            seg.fields[aux_field(name)][rows] = v

    def set_values(self, view: PaddedView, values: torch.Tensor, changed: torch.Tensor) -> None:
        changed = changed & view.valid
        view.replace_values(values, changed)
        q_rows, in_q, t_rows, in_t = self._slot_map(changed.shape[-1])
        rows_q, rows_t = q_rows[changed & in_q], t_rows[changed & in_t]
        # Fields may be shared with another storage (share()): write into copies.
        if rows_q.numel():
            vc, vm = quantize_values(values[changed & in_q].float(), self.spec)
            self.quant = self.quant.with_fields(vc=self.quant.fields["vc"].index_put((rows_q,), vc), vm=self.quant.fields["vm"].index_put((rows_q,), vm))
        if rows_t.numel():
            v = values[changed & in_t].to(self.dtype)
            self.tail = self.tail.with_fields(v=self.tail.fields["v"].index_put((rows_t,), v))

    def export_aux(self) -> dict[str, object]:
        return {name: (self.quant.fields[aux_field(name)].clone(), self.tail.fields[aux_field(name)].clone()) for name in self.aux_names}

    def import_aux(self, state: dict[str, object]) -> None:
        for name, parts in state.items():
            assert isinstance(parts, tuple)
            self.quant.fields[aux_field(name)] = parts[0].clone()
            self.tail.fields[aux_field(name)] = parts[1].clone()

    def _over(self, quant: Segments, groups: Segments, tail: Segments, batch: int, aux_names: tuple[str, ...]) -> QuantizedKV:
        other = QuantizedKV.__new__(QuantizedKV)
        other.batch, other.kv_heads, other.head_dim = batch, self.kv_heads, self.head_dim
        other.dtype, other.device, other.aux_names, other.spec = self.dtype, self.device, aux_names, self.spec

        def fresh(seg: Segments) -> Segments:
            kept = {n: t for n, t in seg.fields.items() if not n.startswith("aux:")}
            zeros = {aux_field(n): torch.zeros(seg.entries, device=self.device) for n in aux_names}
            return Segments({**kept, **zeros}, seg.lengths)

        other.quant, other.groups, other.tail = fresh(quant), groups, fresh(tail)
        return other

    def share(self, aux_names: tuple[str, ...]) -> QuantizedKV:
        # Segments are never written in place (only their policy state is, and that is fresh).
        return self._over(self.quant, self.groups, self.tail, self.batch, aux_names)

    @classmethod
    def stack(cls, parts: list[KVStorage], shifts: list[int]) -> QuantizedKV:
        if not all(isinstance(p, QuantizedKV) and p.batch == 1 for p in parts):
            raise ValueError("QuantizedKV.stack takes single-sequence QuantizedKV storages")
        qs: list[QuantizedKV] = parts  # type: ignore[assignment]

        def shifted(seg: Segments, shift: int) -> Segments:
            return seg.with_fields(pos=seg.fields["pos"] + shift) if shift else seg

        first = qs[0]
        quant = Segments.cat([shifted(p.quant, s) for p, s in zip(qs, shifts)])
        tail = Segments.cat([shifted(p.tail, s) for p, s in zip(qs, shifts)])
        out = first._over(quant, Segments.cat([p.groups for p in qs]), tail, len(qs), first.aux_names)
        out.import_aux({n: (quant.fields[aux_field(n)], tail.fields[aux_field(n)]) for n in first.aux_names})
        return out


class QuantReader:
    """Attention over the quantized part when every row holds the same whole key groups (the
    codes are dense tensors), without building full-precision K or V for more than a block.

    Keys: a group's per-channel scale s and minimum m fold into the query,
        q . k_t = (q * s) . code_t + q . m
    so a block costs one conversion of its codes to float and one matmul per group. Values: a
    token's per-channel-group scale and minimum fold into its attention probability,
        sum_t p_t v_t[j] = sum_t (p_t s_tj) code_t[j] + sum_t p_t m_tj
    With many queries (a prompt chunk) folding would copy the scales per query: the block is
    dequantized instead."""

    def __init__(self, storage: QuantizedKV) -> None:
        self.spec = storage.spec
        g = self.spec.group
        batch, heads = storage.quant.lengths.shape
        groups = storage.groups.uniform() or 0
        self.kc = storage.quant.padded("kc").view(batch, heads, groups, g, -1)  # (b, h, groups, G, code_bytes)
        self.km = storage.groups.padded("km").float()  # (b, h, groups, fields, dim)
        self.vc = storage.quant.padded("vc")  # (b, h, n, code_bytes)
        self.vm = storage.quant.padded("vm").float()  # (b, h, n, fields, dim / group)

    def logits(self, q: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """q (b, h, Q, dim) scaled queries -> (b, h, Q, stop - start) logits of slots [start, stop)."""
        g = self.spec.group
        codes = code_values(self.kc[:, :, start // g : stop // g], self.spec)  # (b, h, nb, G, dim)
        meta = self.km[:, :, start // g : stop // g]  # (b, h, nb, fields, dim)
        b, h, nb = codes.shape[:3]
        if q.shape[2] > FOLD_QUERIES:
            keys = codes * meta[:, :, :, 0:1] + (meta[:, :, :, 1:2] if self.spec.asymmetric else 0)
            return q @ keys.view(b, h, nb * g, -1).transpose(-1, -2)
        folded = q[:, :, None] * meta[:, :, :, None, 0]  # (b, h, nb, Q, dim)
        logits = folded @ codes.transpose(-1, -2)  # (b, h, nb, Q, G)
        if self.spec.asymmetric:
            logits += (meta[:, :, :, 1] @ q.transpose(-1, -2))[..., None]  # (b, h, nb, Q, 1): q . m
        return logits.transpose(2, 3).reshape(b, h, q.shape[2], nb * g)

    def output(self, probs: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """probs (b, h, Q, stop - start) -> (b, h, Q, dim): their weighted sum of the values."""
        codes = code_values(self.vc[:, :, start:stop], self.spec)  # (b, h, n, dim)
        meta = self.vm[:, :, start:stop]  # (b, h, n, fields, groups)
        if probs.shape[2] > FOLD_QUERIES:
            return probs @ dequantize_values(self.vc[:, :, start:stop], meta, self.spec)
        g = self.spec.group
        parts = []
        for j in range(meta.shape[-1]):
            part = (probs * meta[:, :, None, :, 0, j]) @ codes[..., j * g : (j + 1) * g]  # (b, h, Q, G)
            if self.spec.asymmetric:
                part += (probs @ meta[:, :, :, 1, j, None])  # (b, h, Q, 1): sum_t p_t m_tj
            parts.append(part)
        return torch.cat(parts, -1)
