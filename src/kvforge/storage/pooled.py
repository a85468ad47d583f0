"""Ragged rows whose entries live in the blocks of a `KVMemory`, for the paged quantized layout
(`pagedquant.py`): the full-precision tail (`TailBlocks`) and the codes of one bit width
(`CodeBlocks`).

    rows[r]   the blocks of row r = b * kv_heads + h, oldest first (integers, over the memory's pool)
    meta      a flat `Segments` of what is not K/V: pos (N,) int32, aux:<name> (N,) f32, its
              entries in the rows' order (row after row, block after block, front of a block first)

Blocks are shared by reference (forks, stacks); a write into a shared block copies that block
alone. `picture` gathers the entry fields into flat tensors beside `meta`'s (the same tensor
objects: policy state written into a picture is written here), the form the quantized layout's
reading (`qattention.py`, the kernels) takes.

Two ways of holding entries in blocks:
- the tail packs them: entry i of a row sits in block i // block_size (`memory.rows`' `Row`),
  and eviction compacts the row across its blocks;
- codes keep them in their block: one key group per block, whose scales are block fields, so an
  entry never leaves its block. A block holds `counts[j]` live entries at its front; eviction
  compacts each block on its own and gives back the blocks left empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvforge.memory import OutOfBlocks, Row
from kvforge.memory.kvmemory import KVMemory
from kvforge.storage.base import exclusive_cumsum
from kvforge.storage.segments import Segments


@dataclass
class CodeRow:
    blocks: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # live entries of each block, at its front

    @property
    def length(self) -> int:
        return sum(self.counts)


class PooledRows:
    """What the tail and the codes share: the memory, the rows' metadata, ownership, sizes."""

    def __init__(self, memory: KVMemory, rows: list, meta: Segments) -> None:
        self.memory, self.rows, self.meta = memory, rows, meta
        # Rows handed to another storage (`select`), and False once all are (a `take`n stack):
        # those are the other storage's now; never written or released from here.
        self.given: set[int] = set()
        self.owns = True
        self._slots: torch.Tensor | None = None  # flat slot of every entry, rebuilt after any edit

    # --- sizes and names -----------------------------------------------------------------------

    def block_ids(self) -> set[int]:
        return {b for row in self.rows for b in row.blocks}

    @property
    def allocated_nbytes(self) -> int:
        return len(self.block_ids()) * self.memory.block_nbytes

    def buffers(self) -> dict[int, int]:
        """One buffer per block, named by the address of its part of the memory's first tensor:
        a block shared with another storage has the same name there (a union counts it once)."""
        first = next(iter(self.memory.store.tensors.values()))
        step = first[0:1].nbytes
        return dict.fromkeys((first.data_ptr() + b * step for b in self.block_ids()), self.memory.block_nbytes)

    def seq_blocks(self, batch: int) -> torch.Tensor:
        """(batch,) blocks each sequence's rows stand on."""
        heads = len(self.rows) // batch if batch else 0
        return torch.tensor([sum(len(self.rows[b * heads + h].blocks) for h in range(heads)) for b in range(batch)], dtype=torch.int64)

    @property
    def tables_nbytes(self) -> int:
        return 8 * sum(len(row.blocks) + 1 for row in self.rows)

    def slots(self) -> torch.Tensor:
        """(N,) int64 flat slot (block * block_size + offset) of every entry, in `meta`'s order."""
        if self._slots is None:
            ids = torch.tensor([b for row in self.rows for b in row.blocks], dtype=torch.long)
            counts = torch.tensor([n for row in self.rows for n in self._counts(row)], dtype=torch.long)
            total = int(counts.sum())
            firsts = torch.repeat_interleave(ids * self.memory.block_size - exclusive_cumsum(counts), counts, output_size=total)
            self._slots = (firsts + torch.arange(total)).to(self.meta.lengths.device)
        return self._slots

    def _counts(self, row: Row | CodeRow) -> list[int]:
        raise NotImplementedError

    def picture(self, names: list[str]) -> Segments:
        """Entry fields `names` gathered into flat (N, ...) tensors, beside the metadata (shared)."""
        slots = self.slots()
        store = self.memory.store
        gathered = {name: store.flat(name).index_select(0, slots) for name in names}
        return Segments({**gathered, **self.meta.fields}, self.meta.lengths, self.meta.host)

    def edited(self) -> None:
        self._slots = None

    # --- ownership -----------------------------------------------------------------------------

    def release(self) -> None:
        if self.owns:
            for r, row in enumerate(self.rows):
                if r not in self.given:
                    self.memory.pool.release(row.blocks)
            self.owns = False
        self.memory.trim()

    def forked_rows(self) -> list:
        raise NotImplementedError

    def taken_rows(self, sequences: list[int], heads: int) -> list:
        """The rows of `sequences`, in order: handed over the first time, forked after that."""
        out = []
        for b in sequences:
            for h in range(heads):
                r = b * heads + h
                out.append(self.rows[r] if r not in self.given else self._fork(self.rows[r]))
                self.given.add(r)
        return out

    def _fork(self, row: Row | CodeRow) -> Row | CodeRow:
        raise NotImplementedError

    def _own_blocks(self, row: Row | CodeRow, indices: list[int]) -> list[tuple[int, int]]:
        """Replace each block of `row` at `indices` that another row holds by a fresh copy (the
        copies to make, (source, new)); each stops standing for a prefix hash."""
        pool = self.memory.pool
        wanted = list(dict.fromkeys(indices))
        shared = [i for i in wanted if pool.blocks[row.blocks[i]].ref_count > 1]
        fresh = pool.allocate(len(shared))
        copies = [(row.blocks[i], new) for i, new in zip(shared, fresh)]
        pool.release([source for source, _ in copies])
        for i, new in zip(shared, fresh):
            row.blocks[i] = new
        for i in wanted:
            pool.forget(row.blocks[i])
        return copies

    def write_entries(self, entries: torch.Tensor, fields: dict[str, torch.Tensor]) -> None:
        """Overwrite entry fields of the flat entries `entries` (M,) (in `meta`'s order) with
        fields (M, ...): shared blocks are copied first."""
        where = self._entry_places()
        copies: list[tuple[int, int]] = []
        for r, indices in _by_row(where, entries.tolist()).items():
            copies += self._own_blocks(self.rows[r], indices)
        if copies:
            self.memory.store.copy_blocks(copies)
            self.edited()
        self.memory.store.write_fields(self.slots().index_select(0, entries.to(self.slots().device)), fields)

    def _entry_places(self) -> list[tuple[int, int]]:
        """(row, block index in the row) of every flat entry."""
        return [(r, j) for r, row in enumerate(self.rows) for j, n in enumerate(self._counts(row)) for _ in range(n)]


def _by_row(places: list[tuple[int, int]], entries: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for e in entries:
        r, j = places[e]
        out.setdefault(r, []).append(j)
    return out


class TailBlocks(PooledRows):
    """Full-precision entries packed in a row's blocks (`memory.rows`' `Row`), appended one chunk
    at a time and dropped from the front when quantized."""

    rows: list[Row]

    def _counts(self, row: Row) -> list[int]:  # type: ignore[override]
        bs = self.memory.block_size
        return [min(bs, row.length - j * bs) for j in range(len(row.blocks))]

    def _fork(self, row: Row) -> Row:  # type: ignore[override]
        return self.memory.rows.fork(row)

    def forked_rows(self) -> list[Row]:
        return [self.memory.rows.fork(row) for row in self.rows]

    def append(self, fields: dict[str, torch.Tensor], meta: dict[str, torch.Tensor], counts: torch.Tensor) -> None:
        """Append each row's first counts[b, h] (host) entries of fields and meta, name ->
        (batch, heads, T, ...). All rows or none: a bounded memory short of blocks raises
        OutOfBlocks before any row changes."""
        memory = self.memory
        wanted = counts.flatten().tolist()
        if memory.bounded:
            need = sum(memory.rows.blocks_to_append(row, n) for row, n in zip(self.rows, wanted))
            if need > memory.pool.num_free:
                raise OutOfBlocks(f"appending takes {need} blocks, {memory.pool.num_free} free of {memory.pool.num_blocks}")
        copies: list[tuple[int, int]] = []
        slots: list[int] = []
        for row, n in zip(self.rows, wanted):
            added = memory.rows.append(row, n)
            copies += added.copies
            slots += added.slots
        memory.store.copy_blocks(copies)  # a shared last block is copied before entries join it
        t = next(iter(fields.values())).shape[2]
        picked = _first(wanted, t, counts.device)
        memory.store.write_fields(slots, {name: x.flatten(0, 2).index_select(0, picked.to(x.device)) for name, x in fields.items()})
        self.meta = self.meta.extend(meta, counts)
        self.edited()

    def keep(self, rows: torch.Tensor, lengths: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """Keep the flat entries `rows` (ascending within each row), `lengths` per row."""
        memory = self.memory
        local = (rows - exclusive_cumsum(self.meta.lengths.flatten()).repeat_interleave(lengths.flatten().to(rows.device))).tolist()
        per_row = lengths.flatten().tolist()
        changing = [r for r, n in enumerate(per_row) if n != self.rows[r].length]
        exclusive = [r for r in changing if all(memory.pool.blocks[b].ref_count == 1 for b in self.rows[r].blocks)]
        shared = [r for r in changing if r not in set(exclusive)]
        if memory.bounded:
            freed = sum(len(self.rows[r].blocks) - memory.rows.blocks_for(per_row[r]) for r in exclusive)
            need = sum(memory.rows.blocks_for(per_row[r]) for r in shared)
            if need > memory.pool.num_free + freed:
                raise OutOfBlocks(f"evicting takes {need} fresh blocks for shared rows, {memory.pool.num_free + freed} free")
        starts = [0]
        for n in per_row:
            starts.append(starts[-1] + n)
        sources: list[int] = []
        targets: list[int] = []
        for r in exclusive + shared:  # exclusive rows first: what they free, shared rows may take
            kept = memory.rows.keep(self.rows[r], local[starts[r] : starts[r + 1]])
            sources += kept.sources
            targets += kept.targets
        memory.store.move(sources, targets)  # every source is read before any target is written
        self.meta = self.meta.select(rows, lengths, counts)
        self.edited()


class CodeBlocks(PooledRows):
    """Codes of one bit width: one key group per block (block_size entries of the codec's
    layout), the group's key scales a block field; entries never leave their block."""

    rows: list[CodeRow]

    def _counts(self, row: CodeRow) -> list[int]:  # type: ignore[override]
        return row.counts

    def _fork(self, row: CodeRow) -> CodeRow:  # type: ignore[override]
        self.memory.pool.share(row.blocks)
        return CodeRow(list(row.blocks), list(row.counts))

    def forked_rows(self) -> list[CodeRow]:
        return [self._fork(row) for row in self.rows]

    def groups(self, names: list[str]) -> Segments:
        """Block fields `names` of every row's blocks (NB, ...) in order, and `count` (NB,) int32:
        the key groups of the quantized layout's `Part`."""
        ids = [b for row in self.rows for b in row.blocks]
        counts = [n for row in self.rows for n in row.counts]
        device = self.meta.lengths.device
        index = torch.tensor(ids, dtype=torch.long, device=device)
        fields = {name: self.memory.store.tensors[name].index_select(0, index) for name in names}
        fields["count"] = torch.tensor(counts, dtype=torch.int32, device=device)
        per_row = torch.tensor([len(row.blocks) for row in self.rows], dtype=torch.int64).view_as(self.meta.counts)
        return Segments(fields, per_row.to(device), per_row)

    def add(self, fields: dict[str, torch.Tensor], block_fields: dict[str, torch.Tensor], meta: dict[str, torch.Tensor], counts: torch.Tensor) -> None:
        """Append whole groups: each row's first counts[b, h] (host, a multiple of the block size)
        entries of fields (batch, heads, W, ...) and meta, into fresh blocks holding the first
        counts // block_size groups of block_fields (batch, heads, W / block_size, ...)."""
        memory, bs = self.memory, self.memory.block_size
        groups = (counts // bs).flatten().tolist()
        fresh = memory.pool.allocate(sum(groups))  # all or nothing
        for row, n in zip(self.rows, groups):
            taken, fresh = fresh[:n], fresh[n:]
            row.blocks += taken
            row.counts += [bs] * n
        ids = [b for row, n in zip(self.rows, groups) for b in row.blocks[len(row.blocks) - n :]]
        width = next(iter(block_fields.values())).shape[2]
        device = counts.device
        picked_groups = _first(groups, width, device)
        picked = _first(counts.flatten().tolist(), width * bs, device)
        slots = [b * bs + o for b in ids for o in range(bs)]
        memory.store.write_blocks(ids, {n: x.flatten(0, 2).index_select(0, picked_groups.to(x.device)) for n, x in block_fields.items()})
        memory.store.write_fields(slots, {n: x.flatten(0, 2).index_select(0, picked.to(x.device)) for n, x in fields.items()})
        self.meta = self.meta.extend(meta, counts)
        self.edited()

    def keep(self, rows: torch.Tensor, lengths: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """Keep the flat entries `rows` (ascending within each row), `lengths` per row: each block
        keeps its kept entries at its front (compacted in place where no one else holds the
        block, else in a fresh copy of it) and a block left with none goes back to the pool."""
        memory, pool, bs = self.memory, self.memory.pool, self.memory.block_size
        flat_counts = [n for row in self.rows for n in row.counts]
        block_of = torch.repeat_interleave(torch.arange(len(flat_counts)), torch.tensor(flat_counts, dtype=torch.long))
        kept_block = block_of.index_select(0, rows.cpu())
        new_counts = torch.bincount(kept_block, minlength=len(flat_counts)).tolist()
        offset_in_block = (torch.arange(len(block_of)) - torch.repeat_interleave(exclusive_cumsum(torch.tensor(flat_counts, dtype=torch.long)), torch.tensor(flat_counts, dtype=torch.long))).index_select(0, rows.cpu())
        rank = torch.arange(kept_block.numel()) - exclusive_cumsum(torch.tensor(new_counts, dtype=torch.long)).index_select(0, kept_block)
        kept_block, offset_in_block, rank = kept_block.tolist(), offset_in_block.tolist(), rank.tolist()
        changed = [j for j, (old, new) in enumerate(zip(flat_counts, new_counts)) if 0 < new < old]
        flat_ids = [b for row in self.rows for b in row.blocks]
        shared = [j for j in changed if pool.blocks[flat_ids[j]].ref_count > 1]
        fresh = pool.allocate(len(shared))  # all or nothing: raises before any change
        copies = list(zip((flat_ids[j] for j in shared), fresh))
        pool.release([flat_ids[j] for j in shared])
        target = dict(zip(shared, fresh))
        for j in changed:
            pool.forget(target.get(j, flat_ids[j]))
        sources, targets = [], []
        changed_set = set(changed)
        for j, o, k in zip(kept_block, offset_in_block, rank):
            if j in changed_set and o != k:
                block = target.get(j, flat_ids[j])
                sources.append(block * bs + o)
                targets.append(block * bs + k)
        memory.store.copy_blocks(copies)
        memory.store.move(sources, targets)
        pool.release([flat_ids[j] for j, n in enumerate(new_counts) if n == 0])
        j = 0
        for row in self.rows:
            blocks, kept_counts = [], []
            for _ in row.blocks:
                if new_counts[j]:
                    blocks.append(target.get(j, flat_ids[j]))
                    kept_counts.append(new_counts[j])
                j += 1
            row.blocks, row.counts = blocks, kept_counts
        self.meta = self.meta.select(rows, lengths, counts)
        self.edited()


def _first(counts: list[int], width: int, device: torch.device) -> torch.Tensor:
    """Flat indices into rows of `width` items (row after row) of each row's first counts[r]."""
    return torch.tensor([r * width + i for r, n in enumerate(counts) for i in range(n)], dtype=torch.long, device=device)
