"""Paged K/V storage: each (sequence, KV head) row is a block table over one shared `KVMemory`.

    memory.store.keys: (num_blocks, block_size, head_dim)   entry i of row r sits in block
                        rows[r].blocks[i // block_size] at offset i % block_size

K and V live only in the memory's blocks, so what this layer holds is its blocks' bytes, shared
blocks counted once (`buffers`). A fork (`share`), a sequence joining a batch (`stack`) or leaving
it (`select`) edits block tables and reference counts: nothing is copied. A write to a row whose
last, partly filled block is shared copies that block alone; eviction (`keep`) compacts a row's
kept entries in place when no one else holds its blocks, else into fresh blocks, and returns the
rest to the pool. Positions and policy state are this storage's own, padded per row:

    pos: (rows, capacity) int32, aux[name]: (rows, capacity) float32   entries 0 .. length_r - 1

Reading gathers whole blocks (one `index_select` of (blocks, block_size, head_dim) pieces, about
15x faster on the CPU than gathering entry by entry) into a padded picture (`view`); attention
reads that (`viewread.ReadsView`). On CUDA a decoding step is one Triton kernel reading every row's
blocks where they lie (`reading.PagedRows`). Dropping the storage returns its blocks.

A decoding step that reads less (`storage/pageread.py`) scores the memory's key summaries of the
rows' blocks (`memory/summaries.py`: one per block, shared as the block is) and reads only the
chosen blocks: gathered (`read_pages`), or by the same kernel over a block table of them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kvforge.reading import PagedRows, block_summary, decode, entries_read, every_real, kernels, summary_fields
from kvforge.memory import OutOfBlocks, Row, Swapped
from kvforge.memory.kvmemory import KVMemory, shared_memory
from kvforge.memory.summaries import BlockSummaries
from kvforge.storage.base import KVStorage, PaddedView, gather_slots, time_ordered
from kvforge.storage.viewread import ReadsView

META_GROWTH_MIN = 16  # spare columns of positions and policy state grown at once


@dataclass
class SwappedPaged:
    """A paged storage moved out of its memory (to the CPU, say): its blocks' bytes as they were,
    row by row, and what it kept beside them. `PagedKV.swap_in` brings it back into a memory."""

    batch: int
    kv_heads: int
    aux_names: tuple[str, ...]
    lengths: list[int]  # entries per row
    blocks: list[int]  # blocks per row; `data` holds them row after row
    data: Swapped
    pos: torch.Tensor  # (rows, columns) as the storage held them
    aux: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


class PagedKV(ReadsView):
    """The K/V entries one attention layer holds, as block tables over a shared `KVMemory`."""

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        aux_names: tuple[str, ...] = (),
        memory: KVMemory | None = None,  # None: the process's shared memory for this dtype
    ) -> None:
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.dtype, self.device, self.aux_names = dtype, torch.device(device), aux_names
        self.memory = memory if memory is not None else shared_memory(self.device, dtype, head_dim)
        store = self.memory.store
        if (store.head_dim, store.keys.dtype, store.device) != (head_dim, dtype, self.device):
            raise ValueError(
                f"a K/V memory of head_dim {store.head_dim}, {store.keys.dtype} on {store.device} cannot hold "
                f"entries of head_dim {head_dim}, {dtype} on {self.device}; give a memory made for them"
            )
        self.rows = [Row() for _ in range(batch * kv_heads)]
        self.pos = torch.zeros(batch * kv_heads, 0, dtype=torch.int32, device=self.device)
        self.aux = {name: torch.zeros(batch * kv_heads, 0, device=self.device) for name in aux_names}
        self._table: torch.Tensor | None = None  # padded block table, rebuilt after any table edit
        # Rows handed to another storage (`select`), and False once all are (`stack(take=True)`):
        # those rows are the other storage's now; they may still be read here (sizes), never
        # written or released from here. Dropping this storage releases the rest.
        self.given: set[int] = set()
        self.owns = True
        # Kinds of key summaries a page reader reads this storage by (`page_summaries`): their
        # rows for this storage's blocks count in what it holds.
        self.summarized: set[str] = set()

    def __del__(self) -> None:
        try:
            self._release_all()
        except Exception:  # at interpreter exit the memory may be gone already; nothing to return then
            pass

    def _release_all(self) -> None:
        if self.owns:
            for r, row in enumerate(self.rows):
                if r not in self.given:
                    self.memory.rows.release(row)
            self.owns = False
        self.memory.trim()

    @classmethod
    def over_blocks(cls, tables: list[list[int]], length: int, memory: KVMemory, device: torch.device) -> PagedKV:
        """One sequence whose rows (one per KV head) hold the first `length` tokens in blocks found
        by their hashes (`tables[h]`, one reference each already taken): a prefix hit at block
        granularity. Positions are 0 .. length - 1."""
        store = memory.store
        out = cls(1, len(tables), store.head_dim, store.keys.dtype, device, (), memory)
        out.rows = [Row(list(blocks), length) for blocks in tables]
        out._ensure_columns(length)
        out.pos[:, :length] = torch.arange(length, dtype=torch.int32, device=out.device)
        return out

    def swap_out(self, device: torch.device | str = "cpu") -> SwappedPaged:
        """Move what this storage holds out of its memory, bytes as they are, and give its blocks
        back (this storage is consumed). A block two rows share travels once per row."""
        ids = [b for row in self.rows for b in row.blocks]
        data = self.memory.store.swap_out(ids, device)
        out = SwappedPaged(
            self.batch, self.kv_heads, self.aux_names, [row.length for row in self.rows], [len(row.blocks) for row in self.rows],
            data, self.pos.to(device), {name: t.to(device) for name, t in self.aux.items()},
        )  # fmt: skip
        self._release_all()
        return out

    @classmethod
    def swap_in(cls, swapped: SwappedPaged, memory: KVMemory | None, device: torch.device) -> PagedKV:
        """A storage holding what `swapped` held, in blocks of `memory` (None: the process's
        shared one for its dtype); raises OutOfBlocks, taking nothing, when a bounded memory
        cannot give them."""
        if memory is None:
            (_, (head_dim,), dtype) = swapped.data.layout.entry[0]
            memory = shared_memory(torch.device(device), dtype, head_dim)
        store = memory.store
        if not store.fits(swapped.data):
            raise ValueError(
                f"blocks of {swapped.data.layout.entries} entries ({swapped.data.blocks.shape[1]} bytes) cannot go into a memory "
                f"of blocks of {store.block_size} entries ({store.block_nbytes} bytes); swap into a memory with the same block size and head_dim"
            )
        out = cls(swapped.batch, swapped.kv_heads, store.head_dim, store.keys.dtype, device, swapped.aux_names, memory)
        ids = store.swap_in(memory.pool, swapped.data)
        out.rows = []
        for length, count in zip(swapped.lengths, swapped.blocks):
            out.rows.append(Row(ids[:count], length))
            ids = ids[count:]
        out.pos = swapped.pos.to(out.device)
        out.aux = {name: t.to(out.device) for name, t in swapped.aux.items()}
        return out

    # --- sizes -------------------------------------------------------------------------------

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([row.length for row in self.rows], dtype=torch.int64).view(self.batch, self.kv_heads)

    @property
    def entries(self) -> int:
        return sum(row.length for row in self.rows)

    def uniform_length(self) -> int | None:
        lengths = [row.length for row in self.rows]
        return lengths[0] if lengths and lengths.count(lengths[0]) == len(lengths) else None

    def _block_ids(self) -> set[int]:
        """Every block this storage stands on (rows of one batch may share some: forks)."""
        return {b for row in self.rows for b in row.blocks}

    def buffers(self) -> dict[int, int]:
        """One buffer per block, named by its address, and one per block's key summary where a
        reader reads by them: blocks shared with another storage have the same names there, so a
        union counts them once."""
        ids, store = self._block_ids(), self.memory.store
        names = store.block_names(ids)
        for kind in self.summarized:
            names |= self._summaries(kind).names(ids)
        return names

    @property
    def allocated_nbytes(self) -> int:
        return len(self._block_ids()) * (self.memory.block_nbytes + self._summary_block_nbytes())

    def _summary_block_nbytes(self) -> int:
        """Bytes of the key summaries a block of this storage has (0 when no reader reads by them)."""
        return sum(self._summaries(kind).block_nbytes for kind in self.summarized)

    def _summaries(self, kind: str) -> BlockSummaries:
        return self.memory.store.summaries(kind, summary_fields(kind))

    def seq_nbytes(self) -> torch.Tensor:
        """(batch,) K/V bytes kept for each sequence, and its blocks' key summaries where read by them."""
        kept = super().seq_nbytes()
        if not self.summarized:
            return kept
        blocks = torch.tensor([len(row.blocks) for row in self.rows]).view(self.batch, self.kv_heads).sum(1)
        return kept + blocks * self._summary_block_nbytes()

    @property
    def meta_nbytes(self) -> int:
        tables = 8 * sum(len(row.blocks) + 1 for row in self.rows)
        return self.pos.nbytes + sum(t.nbytes for t in self.aux.values()) + tables

    def blocks_to_append(self, count: int) -> int:
        """Blocks appending `count` entries to every row takes from the pool (admission asks)."""
        return sum(self.memory.rows.blocks_to_append(row, count) for row in self.rows)

    def expect(self, count: int, layers: int) -> None:
        self.memory.reserve(layers * self.blocks_to_append(count))

    def _ensure_columns(self, needed: int) -> None:
        """Positions and policy state get room for `needed` entries per row (grown 1.25x)."""
        have = self.pos.shape[1]
        if needed <= have:
            return
        width = max(needed + needed // 4, have + META_GROWTH_MIN)

        def grown(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(t.shape[0], width - have)], 1)

        self.pos = grown(self.pos)
        self.aux = {name: grown(t) for name, t in self.aux.items()}

    # --- writing -----------------------------------------------------------------------------

    def append(
        self,
        keys: torch.Tensor,  # (batch, kv_heads, T, head_dim)
        values: torch.Tensor,  # (batch, kv_heads, T, head_dim)
        positions: torch.Tensor,  # (T,)
        valid: torch.Tensor,  # (batch, T) bool
        exact: bool = False,  # blocks are exact already: nothing to ask for
    ) -> None:
        batch, heads, t, dim = keys.shape
        all_real = every_real(valid)
        counts = [t] * batch if all_real else valid.sum(1).tolist()  # new entries per sequence
        memory = self.memory
        if memory.bounded:  # all rows or none: check the pool before the first row takes blocks
            need = sum(memory.rows.blocks_to_append(self.rows[b * heads + h], n) for b, n in enumerate(counts) for h in range(heads))
            if need > memory.pool.num_free:
                raise OutOfBlocks(f"appending {sum(counts)} tokens takes {need} blocks, {memory.pool.num_free} free of {memory.pool.num_blocks}")
        old = [row.length for row in self.rows]
        blocks_before = sum(len(row.blocks) for row in self.rows)
        copies: list[tuple[int, int]] = []
        slots: list[int] = []
        for b, n in enumerate(counts):
            for h in range(heads):
                added = memory.rows.append(self.rows[b * heads + h], n)
                copies += added.copies
                slots += added.slots
        if copies or sum(len(row.blocks) for row in self.rows) != blocks_before:
            self._table = None
        self._ensure_columns(max(row.length for row in self.rows))
        positions = positions.to(device=self.device, dtype=torch.int32)
        if all_real and old.count(old[0]) == len(old):
            # Every token real and every row equally long: one slice for all rows.
            new_k, new_v = keys.reshape(-1, dim), values.reshape(-1, dim)  # rows (b, h, time) in order
            self.pos[:, old[0] : old[0] + t] = positions
            for state in self.aux.values():
                state[:, old[0] : old[0] + t] = 0.0
        else:
            picked = [valid[b].nonzero().flatten() for b in range(batch)]
            new_k = torch.cat([keys[b][:, idx].reshape(-1, dim) for b, idx in enumerate(picked)])
            new_v = torch.cat([values[b][:, idx].reshape(-1, dim) for b, idx in enumerate(picked)])
            for b, idx in enumerate(picked):
                for h in range(heads):
                    r, n = b * heads + h, counts[b]
                    self.pos[r, old[r] : old[r] + n] = positions[idx]
                    for state in self.aux.values():
                        state[r, old[r] : old[r] + n] = 0.0
        memory.store.copy_blocks(copies)  # a shared last block is copied before entries join it
        if slots:
            memory.store.write(slots, new_k, new_v)

    # --- reading -----------------------------------------------------------------------------

    def _block_table(self) -> torch.Tensor:
        """(rows, most blocks of a row) int64: each row's blocks, padded with any real block
        (the padding's entries are masked; they must only be finite)."""
        if self._table is None:
            width = max(len(row.blocks) for row in self.rows)
            filler = next(row.blocks[0] for row in self.rows if row.blocks)
            table = [row.blocks + [filler] * (width - len(row.blocks)) for row in self.rows]
            self._table = torch.tensor(table, dtype=torch.long, device=self.device)
        return self._table

    def _gathered(self, source: torch.Tensor, slots: int, valid: torch.Tensor, uniform: bool) -> torch.Tensor:
        """(batch, kv_heads, slots, head_dim) of `source` (the memory's keys or values); slots
        past a row's length are zeros, as in the in-place layout's picture (what a block holds
        there is whatever it held before)."""
        table = self._block_table()
        blocks = source.index_select(0, table.flatten())  # (rows * width, block_size, head_dim)
        picture = blocks.view(self.batch, self.kv_heads, -1, self.head_dim)[:, :, :slots]
        return picture if uniform else picture.masked_fill(~valid[..., None], 0.0)

    def view(self) -> PaddedView:
        slots = max((row.length for row in self.rows), default=0)
        shape = (self.batch, self.kv_heads, slots)
        uniform = self.uniform_length() is not None
        if uniform:
            valid = torch.ones(shape, dtype=torch.bool, device=self.device)
        else:
            valid = torch.arange(slots, device=self.device) < self.lengths.to(self.device)[..., None]
        if slots == 0:
            empty = torch.zeros(*shape, self.head_dim, dtype=self.dtype, device=self.device)
            keys = values = lambda: empty  # noqa: E731
        else:
            store = self.memory.store
            keys = lambda: self._gathered(store.keys, slots, valid, uniform)  # noqa: E731  built only if read
            values = lambda: self._gathered(store.values, slots, valid, uniform)  # noqa: E731
        return PaddedView(
            keys=keys,
            values=values,
            positions=self.pos[:, :slots].reshape(shape).long(),
            valid=valid,
            aux={name: t[:, :slots].reshape(shape) for name, t in self.aux.items()},
        )

    def _held_per_block(self, width: int) -> torch.Tensor:
        """(rows, width) entries each row holds in each column of its block table (0: padding)."""
        lengths = torch.tensor([row.length for row in self.rows], dtype=torch.int64, device=self.device)
        size = self.memory.block_size
        return (lengths[:, None] - torch.arange(width, device=self.device) * size).clamp(0, size)

    def page_summaries(self, kind: str) -> tuple[int, list[torch.Tensor]] | None:
        """Pages are the memory's blocks; their key summaries are the memory's (shared with every
        row holding the block), refreshed for the blocks whose entries changed since."""
        if not self.rows or max(row.length for row in self.rows) == 0:
            return None
        store, summaries = self.memory.store, self._summaries(kind)
        self.summarized.add(kind)
        table = self._block_table()  # (rows, width)
        held = self._held_per_block(table.shape[1])
        live = held > 0
        summaries.refresh(store.keys, table[live], held[live], functools.partial(block_summary, kind))
        shape = (self.batch, self.kv_heads, table.shape[1], self.head_dim)
        return store.block_size, [t.view(shape) for t in summaries.of_table(table)]

    def read_pages(
        self, pages: torch.Tensor, used: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, heads, width = pages.shape
        size, store = self.memory.block_size, self.memory.store
        ids = self._block_table().view(batch, heads, -1).gather(2, pages)  # (batch, kv_heads, W) block ids
        keys = store.keys.index_select(0, ids.flatten()).view(batch, heads, width * size, self.head_dim)
        values = store.values.index_select(0, ids.flatten()).view(batch, heads, width * size, self.head_dim)
        slots = (pages[..., None] * size + torch.arange(size, device=self.device)).flatten(2)  # (batch, kv_heads, W * size)
        read = used.repeat_interleave(size, dim=2) & (slots < self.lengths.to(self.device)[..., None])
        slots = slots.clamp(max=self.pos.shape[1] - 1)
        positions = torch.gather(self.pos.view(batch, heads, -1), 2, slots).long()
        return keys, values, slots, positions, read

    def decode_pages(
        self,
        query: torch.Tensor,  # (batch, q_heads, 1, head_dim): a decoding step, every sequence's real
        pages: torch.Tensor,  # (batch, kv_heads, W) from `reading.chosen_pages`: time order, each row's last page last
        used: torch.Tensor,  # (batch, kv_heads, W) bool
        scaling: float,
    ) -> torch.Tensor | None:  # (batch, q_heads, 1, head_dim)
        """The step's attention over only the chosen blocks, by the paged decoding kernel (CUDA,
        or Triton's interpreter when asked): each row's chosen blocks are its block table, so
        the kernel reads them where they lie. Attention does not depend on the order of the
        entries; the row's last block (partly filled) is its last chosen, so the row's count
        is `entries_read`. None where no kernel runs."""
        if not kernels.enabled(self.device) or min((row.length for row in self.rows), default=0) == 0:
            return None
        batch, heads, width = pages.shape
        size, store = self.memory.block_size, self.memory.store
        table = self._block_table().view(batch, heads, -1).gather(2, pages).view(batch * heads, width)
        counts = entries_read(self.lengths, used.cpu(), size).flatten()
        rows = PagedRows(store.keys, store.values, table.contiguous(), counts.to(self.device, torch.int32), int(counts.max()))
        return decode(query[:, :, 0], [rows], self.kv_heads, scaling)[:, :, None]

    def add_aux_at(self, name: str, slots: torch.Tensor, delta: torch.Tensor) -> None:
        state = self.aux[name].view(self.batch, self.kv_heads, -1)
        state.scatter_add_(2, slots, delta.float())

    def attend(
        self, query: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, scaling: float, accumulate: str | None = None
    ) -> torch.Tensor:
        if query.shape[2] == 1 and accumulate is None and kernels.enabled(self.device) and self._decoding(valid):
            # A decoding step on CUDA: one Triton kernel reads every row's blocks where they lie.
            lengths = [row.length for row in self.rows]
            counts = torch.tensor(lengths, dtype=torch.int32).to(self.device, non_blocking=True)
            store = self.memory.store
            rows = PagedRows(store.keys, store.values, self._block_table(), counts, max(lengths))
            return decode(query[:, :, 0], [rows], self.kv_heads, scaling)[:, :, None]
        return super().attend(query, positions, valid, scaling, accumulate)

    def _decoding(self, valid: torch.Tensor) -> bool:
        """Every sequence's one query is real and every row holds something (the new token)."""
        return every_real(valid) and min((row.length for row in self.rows), default=0) > 0

    # --- policy state --------------------------------------------------------------------------

    def add_aux(self, name: str, view: PaddedView, delta: torch.Tensor) -> None:
        delta = delta.float().masked_fill(~view.valid, 0.0)
        view.aux[name] = view.aux[name] + delta
        self.aux[name][:, : delta.shape[-1]] += delta.flatten(0, 1)

    def set_aux(self, name: str, view: PaddedView, values: torch.Tensor) -> None:
        values = values.float().masked_fill(~view.valid, 0.0)
        view.aux[name] = values
        self.aux[name][:, : values.shape[-1]] = values.flatten(0, 1)

    def export_aux(self) -> dict[str, object]:
        return {name: t.clone() for name, t in self.aux.items()}

    def import_aux(self, state: dict[str, object]) -> None:
        self.aux = {name: t.clone() for name, t in state.items()}  # type: ignore[union-attr]

    def set_values(self, view: PaddedView, values: torch.Tensor, changed: torch.Tensor) -> None:
        changed = changed & view.valid
        view.replace_values(values, changed)
        self._overwrite(changed, None, values)

    def set_entries(self, view: PaddedView, keys: torch.Tensor, values: torch.Tensor, changed: torch.Tensor) -> bool:
        self._overwrite(changed & view.valid, keys, values)
        return True

    def _overwrite(self, changed: torch.Tensor, keys: torch.Tensor | None, values: torch.Tensor) -> None:
        """Write (batch, kv_heads, slots, head_dim) keys (None: values only) and values where
        (batch, kv_heads, slots) `changed`, copying first the shared blocks written to."""
        rows = self.memory.rows
        copies: list[tuple[int, int]] = []
        slots: list[int] = []
        for r, entries in enumerate(changed.flatten(0, 1).tolist()):
            picked = [i for i, c in enumerate(entries) if c]
            if not picked:
                continue
            row = self.rows[r]
            copies += rows.own(row, [i // rows.block_size for i in picked])  # shared blocks are copied first
            slots += [rows.slot(row, i) for i in picked]
        if copies:
            self._table = None
            self.memory.store.copy_blocks(copies)
        if slots:  # entries in rows' then slots' order, as `slots` lists them
            self.memory.store.write(slots, None if keys is None else keys[changed].to(self.dtype), values[changed].to(self.dtype))

    # --- eviction ------------------------------------------------------------------------------

    def keep(self, view: PaddedView, index: torch.Tensor, keep_mask: torch.Tensor, reserve: int = 0) -> None:
        index, keep_mask = time_ordered(index, keep_mask, view.valid.shape[-1])
        counts = keep_mask.sum(-1).flatten().tolist()  # (rows,)
        index = index.flatten(0, 1)  # (rows, K)
        # A row keeping every entry is left as it is (its entries need not be listed).
        kept = [index[r, :n].tolist() if n != self.rows[r].length else range(n) for r, n in enumerate(counts)]
        if self.memory.keep(self.rows, kept):
            self._table = None
        width = index.shape[-1]
        self.pos[:, :width] = gather_slots(view.positions, index.view_as(keep_mask)).flatten(0, 1).to(torch.int32)
        for name in self.aux:
            self.aux[name][:, :width] = gather_slots(view.aux[name], index.view_as(keep_mask)).flatten(0, 1)
        longest = max(counts, default=0) + reserve
        if self.pos.shape[1] > 2 * longest + META_GROWTH_MIN:  # give back idle columns of metadata
            self.pos = self.pos[:, :longest].clone()
            self.aux = {name: t[:, :longest].clone() for name, t in self.aux.items()}

    # --- sharing -------------------------------------------------------------------------------

    def _empty_like(self, batch: int, aux_names: tuple[str, ...]) -> PagedKV:
        out = PagedKV(batch, self.kv_heads, self.head_dim, self.dtype, self.device, aux_names, self.memory)
        out.summarized = set(self.summarized)
        return out

    def share(self, aux_names: tuple[str, ...]) -> PagedKV:
        """Forked rows over the same blocks (one more reference each) and fresh policy state."""
        other = self._empty_like(self.batch, aux_names)
        other.rows = [self.memory.rows.fork(row) for row in self.rows]
        other.pos = self.pos.clone()
        other.aux = {name: torch.zeros_like(self.pos, dtype=torch.float32) for name in aux_names}
        return other

    @classmethod
    def stack(cls, parts: list[KVStorage], shifts: list[int], take: bool = False) -> PagedKV:
        if not all(isinstance(p, PagedKV) for p in parts):
            raise ValueError("PagedKV.stack takes PagedKV storages")
        first = parts[0]
        assert isinstance(first, PagedKV)
        if any(p.memory is not first.memory for p in parts):  # type: ignore[attr-defined]
            raise ValueError("PagedKV.stack takes storages of one KVMemory (make their caches with the same memory)")
        out = first._empty_like(sum(p.batch for p in parts), first.aux_names)
        width = max(p.pos.shape[1] for p in parts)  # type: ignore[attr-defined]

        def widened(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1])], 1)

        out.rows = []
        for part in parts:
            assert isinstance(part, PagedKV)
            out.rows += part.rows if take else [part.memory.rows.fork(row) for row in part.rows]
            if take:
                part.owns = False  # consumed: its blocks are the result's now
        out.pos = torch.cat([widened(p.pos) + shift for p, shift in zip(parts, shifts)])  # type: ignore[attr-defined]
        out.aux = {name: torch.cat([widened(p.aux[name]) for p in parts]) for name in first.aux_names}  # type: ignore[attr-defined]
        return out

    def select(self, sequences: list[int]) -> PagedKV:
        out = self._empty_like(len(sequences), self.aux_names)
        picked = [b * self.kv_heads + h for b in sequences for h in range(self.kv_heads)]
        index = torch.tensor(picked, dtype=torch.long, device=self.device)
        out.rows = []
        for r in picked:  # a row handed out already (picked twice, or by an earlier select) is forked
            out.rows.append(self.rows[r] if r not in self.given else self.memory.rows.fork(self.rows[r]))
            self.given.add(r)
        out.pos = self.pos.index_select(0, index)
        out.aux = {name: t.index_select(0, index) for name, t in self.aux.items()}
        return out
