"""Quantized K/V storage: old entries held as packed low-bit codes, recent ones in full precision.

Each row (sequence, KV head) holds its entries in

    parts   one per bit width (`qpart.Part`: codes, scales, key groups); `mixed` has two
    tail    the most recent entries in the model's dtype (KIVI's residual), flat ragged:
            k (M, head_dim)   v (M, head_dim)   pos (M,) int32   aux:<name> (M,) f32

When entries are quantized (`seal`, called once a chunk has been attended and its policy has
compressed): a row's tail is cut down to fewer than `residual + batch` entries (a prompt's chunk:
fewer than `batch`, its open key group, unless `prompt_residual`) by quantizing its
oldest `batch` entries at a time (batch: one key group; for `mixed`, k groups, the entries the
policy scores highest going in whole groups to the int4 part and the others to the int2 part).
So the chunk just appended is always attended in full precision (as KIVI's prefill is), a policy
scores and evicts it before it is quantized, and the parts only ever hold entries older than
every query (their attention needs no mask).

Eviction of quantized entries (decoding-time budgets, policies that compress after extra passes)
is exact, with no requantization: an entry's codes and value scales go with it; a key group's
scale and minimum stay, counted in the bytes, until the group's last entry is evicted.

Attention (`qattention.py`) reads a bounded block of quantized tokens at a time (never the whole
cache in full precision) and combines every part and the tail in one softmax.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from kvforge.reading import Source, attention_probs_sum, decode, every_real, kernels, received
from kvforge.reading import attend as dense_attend
from kvforge.storage.kernelrows import part_rows, segment_key_rows, segment_rows
from kvforge.storage.base import KVStorage, PaddedView, buffers_of, gather_slots, spans, time_ordered
from kvforge.storage.codec import QuantSpec
from kvforge.storage.qattention import attention_chunks, blocks, tail_allowed
from kvforge.storage.qpart import Part, aux_field, export_state, import_state
from kvforge.storage.segments import Segments

# (batch, kv_heads, slots) importance of each entry `view()` shows, for `mixed`: higher, more bits.
Importance = Callable[[], torch.Tensor]


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
        spec = QuantSpec.for_storage(spec, head_dim, "QuantizedKV")
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.dtype, self.device, self.aux_names, self.spec = dtype, torch.device(device), aux_names, spec
        self.parts = [Part.empty(s, batch, kv_heads, head_dim, aux_names, self.device) for s in spec.parts]
        self.tail = Segments.empty(batch, kv_heads, {
            "k": ((head_dim,), dtype), "v": ((head_dim,), dtype), "pos": ((), torch.int32),
            **{aux_field(n): ((), torch.float32) for n in aux_names},
        }, self.device)  # fmt: skip

    # --- sizes -------------------------------------------------------------------------------

    def _sources(self) -> list[Segments]:
        """Where entries live, in the order views concatenate them: each part, then the tail."""
        return [p.quant for p in self.parts] + [self.tail]

    @property
    def lengths(self) -> torch.Tensor:
        return sum(s.counts for s in self._sources())  # type: ignore[return-value]

    def buffers(self) -> dict[int, int]:
        """Codes, scales, minimums and the full-precision tail: every byte that stands for K/V."""
        return buffers_of([t for p in self.parts for t in p.kv_tensors()] + [self.tail.fields["k"], self.tail.fields["v"]])

    @property
    def kept_nbytes(self) -> int:
        return self.allocated_nbytes  # no spare capacity in this layout

    @property
    def meta_nbytes(self) -> int:
        tail = sum(t.nbytes for n, t in self.tail.fields.items() if n == "pos" or n.startswith("aux:"))
        return sum(p.meta_nbytes for p in self.parts) + tail + self.tail.lengths.nbytes

    def seq_nbytes(self) -> torch.Tensor:
        per_tail = 2 * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()
        return sum(p.seq_nbytes() for p in self.parts) + (self.tail.counts * per_tail).sum(1)

    # --- writing -----------------------------------------------------------------------------

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, exact: bool = False) -> None:
        batch, heads, t, _ = keys.shape
        positions = positions.to(device=self.device, dtype=torch.int32)
        real = every_real(valid)
        if real:
            pos = positions.expand(batch, heads, t)
        else:
            # Real tokens of each sequence first, in time order (padding is not stored).
            order = torch.sort((~valid).int(), dim=1, stable=True).indices  # (batch, T)
            keys = keys.gather(2, order[:, None, :, None].expand_as(keys))
            values = values.gather(2, order[:, None, :, None].expand_as(values))
            pos = positions[order][:, None].expand(batch, heads, t)
        # Host counts: known without the device when the chunk has no padding.
        counts = torch.full((batch, heads), t) if real else valid.sum(1).cpu()[:, None].expand(batch, heads).contiguous()
        new = {"k": keys, "v": values, "pos": pos}
        new.update({aux_field(n): keys.new_zeros(batch, heads, t, dtype=torch.float32) for n in self.aux_names})
        self.tail = self.tail.extend(new, counts)

    @property
    def wants_importance(self) -> bool:
        """`seal` splits entries by importance (mixed precision)."""
        return len(self.parts) > 1

    def seal(self, importance: Importance | None = None, prompt: bool = False) -> None:
        """Quantize each row's oldest tail entries, a whole batch of key groups at a time, until
        fewer than residual + batch remain in full precision (after a prompt: fewer than a batch,
        see `QuantSpec.sealed`). With several parts, `importance` ranks the entries (None: the
        smaller the key norm, the more it matters, as KNorm finds)."""
        groups, high = self.spec.batch
        moved = self.spec.sealed(self.tail.counts, prompt)  # (batch, heads), host
        width = int(moved.max()) if moved.numel() else 0
        if width == 0:
            return
        block = {name: self.tail.padded(name)[:, :, :width] for name in self.tail.fields}  # (batch, heads, width, ...)
        if len(self.parts) == 1:
            self.parts[0] = self.parts[0].add(block, moved)
        else:
            scores = self._tail_importance(importance)[:, :, :width]
            first = moved // groups * high  # entries for the first part, whole groups
            for i, (piece, counts) in enumerate(self._split_block(block, scores, moved, first)):
                self.parts[i] = self.parts[i].add(piece, counts)
        self.tail = self._drop_front(self.tail, moved)

    def _tail_importance(self, importance: Importance | None) -> torch.Tensor:
        """(batch, heads, St) importance of each tail slot."""
        if importance is None:
            return -self.tail.padded("k").float().norm(dim=-1)
        scores = importance()  # (batch, heads, slots) over what view() shows
        start = sum(p.quant.lengths for p in self.parts)  # a row's tail follows its quantized entries
        ar = torch.arange(self.tail.longest, device=self.device)
        return torch.gather(scores, 2, (start[..., None] + ar).clamp(max=scores.shape[-1] - 1))

    @staticmethod
    def _split_block(
        block: dict[str, torch.Tensor], scores: torch.Tensor, moved: torch.Tensor, first: torch.Tensor
    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """The block's first moved[b, h] entries of each row, split into the first[b, h] that
        score highest and the others, each in time order: (block, counts) twice. moved and
        first (and the counts returned) are on the host."""
        width = scores.shape[-1]
        ar = torch.arange(width, device=scores.device)
        moved_d, first_d = moved.to(scores.device), first.to(scores.device)
        scores = scores.masked_fill(ar >= moved_d[..., None], float("-inf"))
        rank = torch.argsort(torch.argsort(scores, dim=-1, descending=True, stable=True), dim=-1)
        top = rank < first_d[..., None]
        # The top entries first, then the others, each in time order; then the rest of the block.
        order = torch.argsort(torch.where(top, ar, torch.where(ar < moved_d[..., None], width + ar, 2 * width + ar)), dim=-1)
        second = moved - first
        for offset, counts in ((torch.zeros_like(first_d), first), (first_d, second)):
            span = int(counts.max())
            index = (offset[..., None] + torch.arange(span, device=scores.device)).clamp(max=width - 1)
            picked = torch.gather(order, 2, index)  # (batch, heads, span)
            yield {n: gather_slots(t, picked) for n, t in block.items()}, counts

    @staticmethod
    def _drop_front(seg: Segments, counts: torch.Tensor) -> Segments:
        """`seg` without the first counts[b, h] (host) entries of each row."""
        dropped = counts.to(seg.lengths.device, non_blocking=True)
        left = seg.lengths - dropped
        rows = spans((seg.offsets() + dropped).flatten(), left.flatten(), int((seg.counts - counts).sum()))
        return seg.select(rows, left, seg.counts - counts)

    # --- reading -----------------------------------------------------------------------------

    def _tail_only(self, query: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys, values and mask (None: plain causal) of attention over the tail alone."""
        keys, values = self.tail.padded("k"), self.tail.padded("v")
        n = self.tail.uniform()
        if every_real(valid) and n is not None and (query.shape[2] == 1 or n == query.shape[2]):
            return keys, values, None
        return keys, values, tail_allowed(self.tail, positions)

    def _quantized(self) -> bool:
        return any(p.quant.entries for p in self.parts)

    def attend(
        self, query: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, scaling: float, accumulate: str | None = None
    ) -> torch.Tensor:
        if query.shape[2] == 1 and accumulate is None and kernels.enabled(self.device) and every_real(valid):
            return decode(query[:, :, 0], self._kernel_rows(), self.kv_heads, scaling)[:, :, None]
        if not self._quantized():
            keys, values, allowed = self._tail_only(query, positions, valid)
            if accumulate is not None:
                self.accumulate_attention(accumulate, query, positions, valid, scaling)
            return dense_attend(query, keys, values, allowed, scaling).masked_fill(~valid[:, None, :, None], 0.0)
        out = query.new_zeros(query.shape)
        for first, chunk, got in attention_chunks(self.parts, self.tail, query, positions, valid, scaling, accumulate is not None):
            out[:, :, first : first + chunk.shape[2]] = chunk.to(query.dtype)
            if accumulate is not None and got is not None:
                self._add_received(accumulate, got)
        return out.masked_fill(~valid[:, None, :, None], 0.0)

    def _kernel_rows(self) -> list[Source]:
        """Every part holding entries, then the tail, as the decoding kernel reads them in place
        (row lengths and the longest row, which sizes the grid, come from the host copies)."""
        rows: list[Source] = []
        for part in self.parts:
            if part.quant.entries:
                rows.append(part_rows(part.spec, part.quant, part.groups, part.entry_group(), part.quant.longest))
        return rows + [segment_rows(self.tail, self.tail.longest)]

    def accumulate_attention(self, name: str, query: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, scaling: float) -> None:
        if not self._quantized():
            if kernels.received_enabled(self.device, self.head_dim):
                # The tail read where it lies (no padded copy), causal by each entry's position.
                rows = segment_key_rows(self.tail, self.tail.longest)
                got = received(query, rows, positions, valid, self.kv_heads, scaling).view(self.batch, self.kv_heads, rows.longest)
            else:
                keys = self.tail.padded("k")
                got = attention_probs_sum(query, keys, tail_allowed(self.tail, positions), valid, scaling)
            self._add_received(name, [None] * len(self.parts) + [got])
            return
        for _, _, got in attention_chunks(self.parts, self.tail, query, positions, valid, scaling, True):
            assert got is not None
            self._add_received(name, got)

    def _add_received(self, name: str, got: list[torch.Tensor | None]) -> None:
        """Add per source (parts, then tail) (batch, heads, slots) attention to policy state."""
        for seg, rec in zip(self._sources(), got):
            if rec is not None:
                rows, ok = seg.slot_rows(rec.shape[-1])
                seg.fields[aux_field(name)].index_add_(0, rows[ok], rec[ok].float())

    def _layout(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """How a view is built from the sources padded side by side: their widths, and for each
        (batch, heads, slots) view slot its index into that concatenation, and its validity."""
        sources = self._sources()
        widths = [s.longest for s in sources]
        lengths = sum(s.lengths for s in sources)
        counts = self.lengths
        slots = int(counts.max()) if counts.numel() else 0
        ar = torch.arange(slots, device=self.device)
        valid = ar < lengths[..., None]
        if len(self.parts) == 1:
            # The part's entries are all older than the tail's: slot j is part slot j, or tail slot j - n.
            n = sources[0].lengths[..., None]
            index = torch.where(ar < n, ar, widths[0] + ar - n)
        else:
            # Parts interleave in time: order every source's entries by position.
            pos = torch.cat([s.padded("pos").long().masked_fill(~s.slot_rows()[1], torch.iinfo(torch.int64).max) for s in sources], 2)
            index = torch.argsort(pos, dim=-1, stable=True)[:, :, :slots]
        return widths, index.clamp(max=max(sum(widths) - 1, 0)), valid

    def view(self) -> PaddedView:
        widths, index, valid = self._layout()

        def joined(parts: list[torch.Tensor]) -> torch.Tensor:
            both = torch.cat([p.to(parts[0].dtype) for p in parts], 2)  # (batch, heads, sum(widths), ...)
            return gather_slots(both, index)

        def field(name: str) -> torch.Tensor:
            return joined([s.padded(name, w) for s, w in zip(self._sources(), widths)])

        def read(which: str) -> torch.Tensor:
            parts = [self._read_part(p, which, w) for p, w in zip(self.parts, widths)]
            return joined([*parts, self.tail.padded("k" if which == "keys" else "v")]).to(self.dtype)

        return PaddedView(
            keys=lambda: read("keys"), values=lambda: read("values"), positions=field("pos").long(), valid=valid,
            aux={name: field(aux_field(name)) for name in self.aux_names},
        )  # fmt: skip

    def _read_part(self, part: Part, which: str, width: int) -> torch.Tensor:
        """(batch, heads, width, dim) float32 keys or values of a part, padded."""
        if width == 0:
            return torch.zeros(self.batch, self.kv_heads, 0, self.head_dim, device=self.device)
        read = part.keys if which == "keys" else part.values
        return torch.cat([read(a, b) for a, b in blocks(part)], 2)

    def _slot_rows(self, slots: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per source: (batch, heads, slots) flat row behind each view slot, and whether the slot
        is that source's."""
        widths, index, valid = self._layout()
        index, valid = index[..., :slots], valid[..., :slots]
        out, start = [], 0
        for seg, width in zip(self._sources(), widths):
            local = index - start
            mine = valid & (local >= 0) & (local < width)
            out.append((seg.offsets()[..., None] + local.clamp(min=0), mine))
            start += width
        return out

    def keep(self, view: PaddedView, index: torch.Tensor, keep_mask: torch.Tensor, reserve: int = 0) -> None:
        index, keep_mask = time_ordered(index, keep_mask, view.valid.shape[-1])
        kept = []
        for rows, mine in self._slot_rows(view.valid.shape[-1]):
            chosen = torch.gather(mine, 2, index) & keep_mask
            kept.append((torch.gather(rows, 2, index)[chosen], chosen.sum(-1)))
        self.parts = [p.select(rows, lengths) for p, (rows, lengths) in zip(self.parts, kept)]
        self.tail = self.tail.select(*kept[-1])

    # --- policy state and sharing ------------------------------------------------------------

    def add_aux(self, name: str, view: PaddedView, delta: torch.Tensor) -> None:
        delta = delta.float().masked_fill(~view.valid, 0.0)
        view.aux[name] = view.aux[name] + delta
        for seg, (rows, mine) in zip(self._sources(), self._slot_rows(delta.shape[-1])):
            seg.fields[aux_field(name)].index_add_(0, rows[mine], delta[mine])

    def set_aux(self, name: str, view: PaddedView, values: torch.Tensor) -> None:
        values = values.float().masked_fill(~view.valid, 0.0)
        view.aux[name] = values
        for seg, (rows, mine) in zip(self._sources(), self._slot_rows(values.shape[-1])):
            seg.fields[aux_field(name)][rows[mine]] = values[mine]

    def set_values(self, view: PaddedView, values: torch.Tensor, changed: torch.Tensor) -> None:
        changed = changed & view.valid
        view.replace_values(values, changed)
        # Fields may be shared with another storage (share()): write into copies.
        *in_parts, (rows_t, mine_t) = self._slot_rows(changed.shape[-1])
        for i, (rows, mine) in enumerate(in_parts):
            if bool((changed & mine).any()):
                self.parts[i] = self.parts[i].with_values(rows[changed & mine], values[changed & mine])
        if bool((changed & mine_t).any()):
            v = self.tail.fields["v"].index_put((rows_t[changed & mine_t],), values[changed & mine_t].to(self.dtype))
            self.tail = self.tail.with_fields(v=v)

    def export_aux(self) -> dict[str, object]:
        return export_state([p.quant for p in self.parts], self.tail, self.aux_names)

    def import_aux(self, state: dict[str, object]) -> None:
        import_state([p.quant for p in self.parts], self.tail, state)

    def _over(self, parts: list[Part], tail: Segments, batch: int, aux_names: tuple[str, ...]) -> QuantizedKV:
        """A storage over these parts and tail with fresh (zero) policy state `aux_names`."""
        other = QuantizedKV.__new__(QuantizedKV)
        other.batch, other.kv_heads, other.head_dim = batch, self.kv_heads, self.head_dim
        other.dtype, other.device, other.aux_names, other.spec = self.dtype, self.device, aux_names, self.spec

        def fresh(seg: Segments) -> Segments:
            kept = {n: t for n, t in seg.fields.items() if not n.startswith("aux:")}
            zeros = {aux_field(n): torch.zeros(seg.entries, device=self.device) for n in aux_names}
            return Segments({**kept, **zeros}, seg.lengths, seg.host)

        other.parts = [Part(p.spec, fresh(p.quant), p.groups) for p in parts]
        other.tail = fresh(tail)
        return other

    def share(self, aux_names: tuple[str, ...]) -> QuantizedKV:
        # Segments are never written in place (only their policy state is, and that is fresh).
        return self._over(self.parts, self.tail, self.batch, aux_names)

    def select(self, sequences: list[int]) -> QuantizedKV:
        parts = [Part(p.spec, p.quant.sequences(sequences), p.groups.sequences(sequences)) for p in self.parts]
        return self._with_state(parts, self.tail.sequences(sequences), len(sequences))

    def _with_state(self, parts: list[Part], tail: Segments, batch: int) -> QuantizedKV:
        """A storage over these parts and tail, keeping the policy state they carry."""
        out = self._over(parts, tail, batch, self.aux_names)
        out.import_aux({n: {"tail": tail.fields[aux_field(n)], "parts": [p.quant.fields[aux_field(n)] for p in parts]} for n in self.aux_names})
        return out

    @classmethod
    def stack(cls, parts: list[KVStorage], shifts: list[int], take: bool = False) -> QuantizedKV:
        if not all(isinstance(p, QuantizedKV) for p in parts):
            raise ValueError("QuantizedKV.stack takes QuantizedKV storages")
        qs: list[QuantizedKV] = parts  # type: ignore[assignment]

        def shifted(seg: Segments, shift: int) -> Segments:
            return seg.with_fields(pos=seg.fields["pos"] + shift) if shift else seg

        first = qs[0]
        stacked = [
            Part(p.spec, Segments.cat([shifted(q.parts[i].quant, s) for q, s in zip(qs, shifts)]), Segments.cat([q.parts[i].groups for q in qs]))
            for i, p in enumerate(first.parts)
        ]
        tail = Segments.cat([shifted(q.tail, s) for q, s in zip(qs, shifts)])
        return first._with_state(stacked, tail, sum(q.batch for q in qs))

