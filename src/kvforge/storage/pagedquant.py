"""Quantized K/V storage over block memories: the quantized layout (`quantized.py`) with its codes
and its full-precision tail held in pool blocks instead of tensors of its own.

    tail    full-precision entries packed in blocks of the model's K/V memory (the one the paged
            layout uses), KIVI's residual
    parts   one per bit width: codes in blocks of a codec memory (`codec_layout`), one key group per
            block: entry fields kc, vc (code_bytes,) uint8, vm (fields, head_dim / group) f16,
            block field km (fields, head_dim) f16, the group's per-channel key scale (and minimum)

What is held is counted from blocks (shared blocks once), so a fork, a stack, a prefix kept for
later or a sequence leaving a batch hold no second copy of the codes, and a write into a shared
block copies that block alone. Eviction of quantized entries is exact, without requantizing: an
entry stays in its key group's block, the block keeps its kept entries at its front, and a block
left with none goes back to its pool (as the quantized layout keeps a group's scale until its last
entry goes).

Reading is the quantized layout's (one softmax over every part and the tail, the Triton decoding
kernel on CUDA): this storage hands it a picture, the blocks' fields gathered into the flat form it
reads, beside this storage's own positions and policy state (written through). The codes' picture
is kept until the codes change, so a decoding step gathers only the tail again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.memory import BlockLayout, OutOfBlocks, Row, Swapped
from kvforge.memory.kvmemory import KVMemory, shared_memory
from kvforge.storage.base import KVStorage, PaddedView, exclusive_cumsum, spans, time_ordered
from kvforge.storage.codec import META_DTYPE, QuantSpec, quantize_values
from kvforge.storage.pooled import CodeBlocks, CodeRow, TailBlocks
from kvforge.storage.qpart import Part, aux_field, encode_block, export_state, import_state
from kvforge.storage.quantized import Importance, QuantizedKV
from kvforge.storage.segments import Segments

CODE_FIELDS = ["kc", "vc", "vm"]


def codec_layout(spec: QuantSpec, head_dim: int, block_nbytes: int) -> BlockLayout:
    """Blocks of `block_nbytes` holding as many key groups of `spec` (one bit width) as fit: codes
    and value scales per entry, each group's key scales (and minimums) per block. Raises when not
    even one group fits."""
    cb, fields = spec.code_bytes(head_dim), spec.meta_fields

    def layout(groups: int) -> BlockLayout:
        return BlockLayout(
            groups * spec.group,
            (("kc", (cb,), torch.uint8), ("vc", (cb,), torch.uint8), ("vm", (fields, head_dim // spec.group), META_DTYPE)),
            (("km", (groups, fields, head_dim), META_DTYPE),),
        )

    groups = max(block_nbytes // layout(1).nbytes(), 1)
    while groups > 1 and layout(groups).nbytes() > block_nbytes:
        groups -= 1
    return layout(groups)


@dataclass
class SwappedQuant:
    """A paged quantized storage moved out of its memory: per part, then the tail, its rows (over
    indices into its blocks), its blocks' bytes as they were (codes stay codes) and its metadata.
    `PagedQuantKV.swap_in` brings it back into a memory of the same block bytes."""

    batch: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    aux_names: tuple[str, ...]
    spec: QuantSpec
    held: list[tuple[list, Swapped, Segments]]

    @property
    def nbytes(self) -> int:
        return sum(data.nbytes for _, data, _ in self.held)


class PagedQuantKV(KVStorage):
    """The K/V entries one attention layer holds, quantized, in pool blocks."""

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        aux_names: tuple[str, ...] = (),
        spec: QuantSpec | None = None,
        memory: KVMemory | None = None,  # the tail's (full precision); None: the process's shared one
    ) -> None:
        spec = QuantSpec.for_storage(spec, head_dim, "PagedQuantKV")
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.dtype, self.device, self.aux_names, self.spec = dtype, torch.device(device), aux_names, spec
        memory = memory if memory is not None else shared_memory(self.device, dtype, head_dim)
        rows = batch * kv_heads
        self.tail = TailBlocks(memory, [Row() for _ in range(rows)], self._empty_meta(batch, aux_names))
        self.parts = [
            CodeBlocks(memory, [CodeRow() for _ in range(rows)], self._empty_meta(batch, aux_names), self._layout(s), s.group)
            for s in spec.parts
        ]

    def _layout(self, spec: QuantSpec) -> BlockLayout:
        layout = codec_layout(spec, self.head_dim, self.memory.block_nbytes)
        self.memory.store.check(layout)  # a group that does not fit a block is refused here
        return layout

    def _empty_meta(self, batch: int, aux_names: tuple[str, ...]) -> Segments:
        shapes = {"pos": ((), torch.int32), **{aux_field(n): ((), torch.float32) for n in aux_names}}
        return Segments.empty(batch, self.kv_heads, shapes, self.device)

    def __del__(self) -> None:
        try:
            for held in [self.tail, *self.parts]:
                held.release()
        except Exception:  # at interpreter exit the memories may be gone already
            pass

    def swap_out(self, device: torch.device | str = "cpu") -> SwappedQuant:
        """Move what this storage holds out of its memory, bytes as they are, and give its blocks
        back (this storage is consumed)."""
        held = [h.swap_out(device) for h in self._held()]
        return SwappedQuant(self.batch, self.kv_heads, self.head_dim, self.dtype, self.aux_names, self.spec, held)

    @classmethod
    def swap_in(cls, swapped: SwappedQuant, memory: KVMemory | None, device: torch.device) -> PagedQuantKV:
        """A storage holding what `swapped` held, in blocks of `memory` (None: the process's shared
        one); raises OutOfBlocks, taking nothing, when a bounded memory cannot give them."""
        out = cls(swapped.batch, swapped.kv_heads, swapped.head_dim, swapped.dtype, device, swapped.aux_names, swapped.spec, memory)
        for h, (_, data, _) in zip(out._held(), swapped.held):
            if data.blocks.shape[1] != h.memory.block_nbytes or data.layout != h.memory.layout:
                raise ValueError(
                    f"blocks of {data.blocks.shape[1]} bytes cannot go into a memory of blocks of {h.memory.block_nbytes}; "
                    f"swap into a memory with the same block size, head_dim and dtype"
                )
        if memory is not None and memory.bounded and memory.pool.num_free < sum(data.count for _, data, _ in swapped.held):
            raise OutOfBlocks(f"swapping in takes {sum(d.count for _, d, _ in swapped.held)} blocks, {memory.pool.num_free} free")
        for h, (rows, data, meta) in zip(out._held(), swapped.held):
            h.swap_in(rows, data, meta)
        return out

    @property
    def memory(self) -> KVMemory:
        return self.tail.memory

    def _held(self) -> list[TailBlocks | CodeBlocks]:
        return [*self.parts, self.tail]

    # --- sizes -------------------------------------------------------------------------------

    @property
    def lengths(self) -> torch.Tensor:
        return sum(h.meta.counts for h in self._held())  # type: ignore[return-value]

    def buffers(self) -> dict[int, int]:
        return {k: v for h in self._held() for k, v in h.buffers().items()}

    @property
    def allocated_nbytes(self) -> int:
        return sum(h.allocated_nbytes for h in self._held())

    @property
    def kept_nbytes(self) -> int:
        return self.allocated_nbytes  # what the blocks hold, their unfilled slots included

    @property
    def meta_nbytes(self) -> int:
        return sum(sum(t.nbytes for t in h.meta.fields.values()) + h.meta.lengths.nbytes + h.tables_nbytes for h in self._held())

    def seq_nbytes(self) -> torch.Tensor:
        return sum(h.seq_blocks(self.batch) * h.memory.block_nbytes for h in self._held())  # type: ignore[return-value]

    def blocks_to_append(self, count: int) -> int:
        """Blocks appending `count` entries to every row may take (admission asks): the tail's,
        and the blocks of the groups sealing them may move into codes (every part may take all
        of them: `mixed` splits them by score)."""
        memory = self.memory
        tail = sum(memory.rows.blocks_to_append(row, count) for row in self.tail.rows)
        lengths = torch.tensor([row.length + count for row in self.tail.rows])
        sealed = (self.spec.sealed(lengths, prompt=True) // self.spec.group).tolist()  # the most a seal moves
        return tail + sum(part.blocks_to_add(sealed) for part in self.parts)

    def expect(self, count: int, layers: int) -> None:
        self.memory.reserve(layers * self.blocks_to_append(count))

    # --- the picture the quantized layout reads -------------------------------------------------

    def _picture(self) -> QuantizedKV:
        """The flat quantized layout's picture of these blocks, gathered for one call and dropped
        after it: kept between calls it would be a second copy of every row's codes (shared
        blocks once per row), counted nowhere."""
        q = QuantizedKV.__new__(QuantizedKV)
        q.batch, q.kv_heads, q.head_dim = self.batch, self.kv_heads, self.head_dim
        q.dtype, q.device, q.aux_names, q.spec = self.dtype, self.device, self.aux_names, self.spec
        q.parts = [Part(spec, part.picture(CODE_FIELDS), part.groups(["km"])) for spec, part in zip(self.spec.parts, self.parts)]
        q.tail = self.tail.picture(["k", "v"])
        return q

    def attend(
        self, query: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, scaling: float, accumulate: str | None = None
    ) -> torch.Tensor:
        return self._picture().attend(query, positions, valid, scaling, accumulate)

    def accumulate_attention(self, name: str, query: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, scaling: float) -> None:
        self._picture().accumulate_attention(name, query, positions, valid, scaling)

    def view(self) -> PaddedView:
        return self._picture().view()

    def add_aux(self, name: str, view: PaddedView, delta: torch.Tensor) -> None:
        self._picture().add_aux(name, view, delta)  # into this storage's policy state (shared tensors)

    def set_aux(self, name: str, view: PaddedView, values: torch.Tensor) -> None:
        self._picture().set_aux(name, view, values)

    # --- writing -----------------------------------------------------------------------------

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, exact: bool = False) -> None:
        batch, heads, t, _ = keys.shape
        positions = positions.to(device=self.device, dtype=torch.int32)
        if valid.all():
            pos = positions.expand(batch, heads, t)
            counts = torch.full((batch, heads), t)
        else:
            # Real tokens of each sequence first, in time order (padding is not stored).
            order = torch.sort((~valid).int(), dim=1, stable=True).indices  # (batch, T)
            keys = keys.gather(2, order[:, None, :, None].expand_as(keys))
            values = values.gather(2, order[:, None, :, None].expand_as(values))
            pos = positions[order][:, None].expand(batch, heads, t)
            counts = valid.sum(1).cpu()[:, None].expand(batch, heads).contiguous()
        meta = {"pos": pos, **{aux_field(n): keys.new_zeros(batch, heads, t, dtype=torch.float32) for n in self.aux_names}}
        self.tail.append({"k": keys, "v": values}, meta, counts)

    @property
    def wants_importance(self) -> bool:
        return len(self.parts) > 1

    def seal(self, importance: Importance | None = None, prompt: bool = False) -> None:
        """Quantize each row's oldest tail entries, as `QuantizedKV.seal` does, into fresh blocks."""
        groups, high = self.spec.batch
        tail_counts = self.tail.meta.counts
        moved = self.spec.sealed(tail_counts, prompt)  # (batch, heads), host
        width = int(moved.max()) if moved.numel() else 0
        if width == 0:
            return
        picture = self._picture()
        block = {name: picture.tail.padded(name)[:, :, :width] for name in picture.tail.fields}  # (batch, heads, width, ...)
        if len(self.parts) == 1:
            self._encode(self.parts[0], self.spec.parts[0], block, moved)
        else:
            scores = picture._tail_importance(importance)[:, :, :width]
            first = moved // groups * high  # entries for the first part, whole groups
            for part, spec, (piece, counts) in zip(self.parts, self.spec.parts, QuantizedKV._split_block(block, scores, moved, first)):
                self._encode(part, spec, piece, counts)
        left = tail_counts - moved
        starts = exclusive_cumsum(self.tail.meta.counts.flatten()) + moved.flatten()
        self.tail.keep(spans(starts, left.flatten(), int(left.sum())).to(self.device), left.to(self.device), left)

    def _encode(self, part: CodeBlocks, spec: QuantSpec, block: dict[str, torch.Tensor], counts: torch.Tensor) -> None:
        """Quantize each row's first counts[b, h] (host, whole groups) entries of `block`
        (name -> (batch, heads, W, ...)) into fresh blocks of `part`."""
        entries, km, meta = encode_block(block, spec)
        part.add(entries, {"km": km}, meta, counts)

    def keep(self, view: PaddedView, index: torch.Tensor, keep_mask: torch.Tensor, reserve: int = 0) -> None:
        index, keep_mask = time_ordered(index, keep_mask, view.valid.shape[-1])
        for held, (rows, mine) in zip(self._held(), self._picture()._slot_rows(view.valid.shape[-1])):
            chosen = torch.gather(mine, 2, index) & keep_mask
            held.keep(torch.gather(rows, 2, index)[chosen], chosen.sum(-1))

    def set_values(self, view: PaddedView, values: torch.Tensor, changed: torch.Tensor) -> None:
        changed = changed & view.valid
        view.replace_values(values, changed)
        sources = self._picture()._slot_rows(changed.shape[-1])
        for i, (held, (rows, mine)) in enumerate(zip(self._held(), sources)):
            picked = changed & mine
            if not bool(picked.any()):
                continue
            new = values[picked]
            if i < len(self.parts):
                vc, vm = quantize_values(new.float(), self.spec.parts[i])  # per token: the others' codes stay
                held.write_entries(rows[picked], {"vc": vc, "vm": vm})
            else:
                held.write_entries(rows[picked], {"v": new.to(self.dtype)})

    # --- policy state and sharing ------------------------------------------------------------

    def export_aux(self) -> dict[str, object]:
        return export_state([p.meta for p in self.parts], self.tail.meta, self.aux_names)

    def import_aux(self, state: dict[str, object]) -> None:
        import_state([p.meta for p in self.parts], self.tail.meta, state)

    def _over(self, held: list[tuple[list, Segments]], batch: int, aux_names: tuple[str, ...], fresh: bool) -> PagedQuantKV:
        """A storage of these rows and metadata (parts, then the tail), its policy state
        `aux_names` fresh (zeros) or, with fresh False, the metadata's own."""
        out = PagedQuantKV.__new__(PagedQuantKV)
        out.batch, out.kv_heads, out.head_dim = batch, self.kv_heads, self.head_dim
        out.dtype, out.device, out.aux_names, out.spec = self.dtype, self.device, aux_names, self.spec

        def state(meta: Segments) -> Segments:
            if not fresh:
                return meta
            zeros = {aux_field(n): torch.zeros(meta.entries, device=self.device) for n in aux_names}
            return Segments({"pos": meta.fields["pos"], **zeros}, meta.lengths, meta.host)

        *parts, (tail_rows, tail_meta) = held
        out.parts = [CodeBlocks(p.memory, rows, state(meta), p.layout, p.group) for p, (rows, meta) in zip(self.parts, parts)]
        out.tail = TailBlocks(self.tail.memory, tail_rows, state(tail_meta))
        return out

    def share(self, aux_names: tuple[str, ...]) -> PagedQuantKV:
        # Blocks are shared by reference; positions are never written in place, policy state is fresh.
        return self._over([(h.forked_rows(), h.meta) for h in self._held()], self.batch, aux_names, fresh=True)

    def select(self, sequences: list[int]) -> PagedQuantKV:
        held = [(h.taken_rows(sequences, self.kv_heads), h.meta.sequences(sequences)) for h in self._held()]
        return self._over(held, len(sequences), self.aux_names, fresh=False)

    @classmethod
    def stack(cls, parts: list[KVStorage], shifts: list[int], take: bool = False) -> PagedQuantKV:
        if not all(isinstance(p, PagedQuantKV) for p in parts):
            raise ValueError("PagedQuantKV.stack takes PagedQuantKV storages")
        qs: list[PagedQuantKV] = parts  # type: ignore[assignment]
        first = qs[0]
        if any(q.memory is not first.memory for q in qs):
            raise ValueError("PagedQuantKV.stack takes storages of one KVMemory (make their caches with the same memory)")

        def shifted(meta: Segments, shift: int) -> Segments:
            return meta.with_fields(pos=meta.fields["pos"] + shift) if shift else meta

        held = []
        for i in range(len(first._held())):
            rows: list = []
            for q in qs:
                h = q._held()[i]
                rows += h.rows if take else h.forked_rows()
                if take:
                    h.owns = False  # consumed: its blocks are the result's now
            held.append((rows, Segments.cat([shifted(q._held()[i].meta, s) for q, s in zip(qs, shifts)])))
        return first._over(held, sum(q.batch for q in qs), first.aux_names, fresh=False)
