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
- codes keep them in their key group's region: a codec block holds `per_block` groups, each in a
  region of `group` entries with its scales in the block's fields, so an entry never leaves its
  region. A group holds `counts[j]` live entries at the front of its region; eviction compacts
  each group on its own, drops the groups left empty and gives back the blocks a row no longer
  stands on. New groups fill the regions after a row's last group while its last block is its
  alone, then fresh blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvforge.memory import BlockLayout, OutOfBlocks, Row, Swapped
from kvforge.memory.kvmemory import KVMemory
from kvforge.storage.base import exclusive_cumsum
from kvforge.storage.segments import Segments


@dataclass
class CodeRow:
    groups: list[int] = field(default_factory=list)  # group slots: block * per_block + region, oldest first
    counts: list[int] = field(default_factory=list)  # live entries of each group, at the front of its region

    @property
    def length(self) -> int:
        return sum(self.counts)


class PooledRows:
    """What the tail and the codes share: the memory, the rows' metadata, ownership, sizes, and
    copy on write. A row's entries sit in units (a tail block, a code group) of `_unit_size()`
    entries, `_units(row)` naming them and their live counts in order."""

    layout: BlockLayout

    def __init__(self, memory: KVMemory, rows: list, meta: Segments) -> None:
        self.memory, self.rows, self.meta = memory, rows, meta
        # Rows handed to another storage (`select`), and False once all are (a `take`n stack):
        # those are the other storage's now; never written or released from here.
        self.given: set[int] = set()
        self.owns = True
        self._slots: torch.Tensor | None = None  # flat slot of every entry, rebuilt after any edit
        self._block_ids: set[int] | None = None  # the blocks the rows stand on, likewise

    def _units(self, row: Row | CodeRow) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    def _unit_size(self) -> int:
        raise NotImplementedError

    def _blocks_of(self, row: Row | CodeRow) -> list[int]:
        raise NotImplementedError

    def _repoint(self, row: Row | CodeRow, old: int, new: int) -> None:
        """The row's entries in block `old` are in block `new` now (a copy)."""
        raise NotImplementedError

    def _fork(self, row: Row | CodeRow) -> Row | CodeRow:
        raise NotImplementedError

    # --- sizes and names -----------------------------------------------------------------------

    def block_ids(self) -> set[int]:
        if self._block_ids is None:
            self._block_ids = {b for row in self.rows for b in self._blocks_of(row)}
        return self._block_ids

    @property
    def allocated_nbytes(self) -> int:
        return len(self.block_ids()) * self.memory.block_nbytes

    def buffers(self) -> dict[int, int]:
        return self.memory.store.block_names(self.block_ids())

    def seq_blocks(self, batch: int) -> torch.Tensor:
        """(batch,) blocks each sequence's rows stand on."""
        heads = len(self.rows) // batch if batch else 0
        return torch.tensor([sum(len(self._blocks_of(self.rows[b * heads + h])) for h in range(heads)) for b in range(batch)], dtype=torch.int64)

    @property
    def tables_nbytes(self) -> int:
        """Block tables, and the flat slot of every entry while it is kept (`slots`, int64)."""
        slots = self._slots.nbytes if self._slots is not None else 0
        return 8 * sum(len(self._units(row)[0]) + 1 for row in self.rows) + slots

    def slots(self) -> torch.Tensor:
        """(N,) int64 flat slot (unit * unit size + offset, in `layout`) of every entry, in `meta`'s order."""
        if self._slots is None:
            units = [self._units(row) for row in self.rows]
            ids = torch.tensor([u for us, _ in units for u in us], dtype=torch.long)
            counts = torch.tensor([n for _, ns in units for n in ns], dtype=torch.long)
            total = int(counts.sum())
            firsts = torch.repeat_interleave(ids * self._unit_size() - exclusive_cumsum(counts), counts, output_size=total)
            self._slots = (firsts + torch.arange(total)).to(self.meta.lengths.device)
        return self._slots

    def picture(self, names: list[str]) -> Segments:
        """Entry fields `names` gathered into flat (N, ...) tensors, beside the metadata (shared)."""
        gathered = self.memory.store.read_fields(self.slots(), names, self.layout)
        return Segments({**gathered, **self.meta.fields}, self.meta.lengths, self.meta.host)

    def edited(self) -> None:
        self._slots = self._block_ids = None

    # --- ownership -----------------------------------------------------------------------------

    def release(self) -> None:
        if self.owns:
            for r, row in enumerate(self.rows):
                if r not in self.given:
                    self.memory.pool.release(self._blocks_of(row))
            self.owns = False
        self.memory.trim()

    def forked_rows(self) -> list:
        return [self._fork(row) for row in self.rows]

    def taken_rows(self, sequences: list[int], heads: int) -> list:
        """The rows of `sequences`, in order: handed over the first time, forked after that."""
        out = []
        for b in sequences:
            for h in range(heads):
                r = b * heads + h
                out.append(self.rows[r] if r not in self.given else self._fork(self.rows[r]))
                self.given.add(r)
        return out

    def _remap(self, row: Row | CodeRow, mapping: dict[int, int]) -> Row | CodeRow:
        """A copy of `row` standing on mapping[b] for each block b it stands on."""
        raise NotImplementedError

    def swap_out(self, device: torch.device | str) -> tuple[list, Swapped, Segments]:
        """Move the rows' blocks out of the memory, bytes as they are, each block once however many
        rows share it, and give them back (these rows are consumed): rows standing on indices into
        the blocks moved, the blocks, and the metadata on `device`."""
        ids = list(dict.fromkeys(b for row in self.rows for b in self._blocks_of(row)))
        index = {b: i for i, b in enumerate(ids)}
        rows = [self._remap(row, index) for row in self.rows]
        data = self.memory.store.swap_out(ids, device)
        meta = Segments({n: t.to(device) for n, t in self.meta.fields.items()}, self.meta.lengths.to(device), self.meta.counts)
        self.release()
        return rows, data, meta

    def swap_in(self, rows: list, data: Swapped, meta: Segments) -> None:
        """Hold what `swap_out` moved, in fresh blocks of this memory (raises OutOfBlocks, taking
        nothing, when a bounded memory cannot give them)."""
        ids = self.memory.store.swap_in(self.memory.pool, data)
        self.rows = [self._remap(row, dict(enumerate(ids))) for row in rows]
        device = self.memory.store.device
        self.meta = Segments({n: t.to(device) for n, t in meta.fields.items()}, meta.lengths.to(device), meta.counts)
        self.edited()

    def write_entries(self, entries: torch.Tensor, fields: dict[str, torch.Tensor]) -> None:
        """Overwrite entry fields of the flat entries `entries` (M,) (in `meta`'s order) with
        fields (M, ...): a block another row holds is copied first, for this row alone."""
        pool = self.memory.pool
        slots = self.slots().index_select(0, entries.to(self.slots().device)).tolist()
        owner = torch.repeat_interleave(torch.arange(len(self.rows)), self.meta.counts.flatten()).index_select(0, entries.cpu()).tolist()
        per_block = self.layout.entries
        touched = list(dict.fromkeys((r, slot // per_block) for r, slot in zip(owner, slots)))
        shared = [(r, b) for r, b in touched if pool.blocks[b].ref_count > 1]
        fresh = pool.allocate(len(shared))  # all or nothing
        self.memory.store.copy_blocks([(b, new) for (_, b), new in zip(shared, fresh)])
        for (r, b), new in zip(shared, fresh):
            self._repoint(self.rows[r], b, new)
            pool.release([b])
        for _, b in touched:
            pool.forget(b)  # its entries change: it stops standing for a prefix hash
        self.edited()
        self.memory.store.write_fields(self.slots().index_select(0, entries.to(self.slots().device)), fields, self.layout)


class TailBlocks(PooledRows):
    """Full-precision entries packed in a row's blocks (`memory.rows`' `Row`), appended one chunk
    at a time and dropped from the front when quantized."""

    rows: list[Row]

    def __init__(self, memory: KVMemory, rows: list, meta: Segments) -> None:
        super().__init__(memory, rows, meta)
        self.layout = memory.layout

    def _units(self, row: Row) -> tuple[list[int], list[int]]:  # type: ignore[override]
        bs = self.memory.block_size
        return row.blocks, [min(bs, row.length - j * bs) for j in range(len(row.blocks))]

    def _unit_size(self) -> int:
        return self.memory.block_size

    def _blocks_of(self, row: Row) -> list[int]:  # type: ignore[override]
        return row.blocks

    def _repoint(self, row: Row, old: int, new: int) -> None:  # type: ignore[override]
        row.blocks = [new if b == old else b for b in row.blocks]

    def _fork(self, row: Row) -> Row:  # type: ignore[override]
        return self.memory.rows.fork(row)

    def _remap(self, row: Row, mapping: dict[int, int]) -> Row:  # type: ignore[override]
        return Row([mapping[b] for b in row.blocks], row.length)

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
        if wanted.count(t) == len(wanted):  # every row takes every entry: no picking
            memory.store.write_fields(slots, {name: x.flatten(0, 2) for name, x in fields.items()})
        else:
            picked = _first(wanted, t, counts.device)
            memory.store.write_fields(slots, {name: x.flatten(0, 2).index_select(0, picked.to(x.device)) for name, x in fields.items()})
        self.meta = self.meta.extend(meta, counts)
        self.edited()

    def keep(self, rows: torch.Tensor, lengths: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """Keep the flat entries `rows` (ascending within each row), `lengths` per row."""
        local = (rows - exclusive_cumsum(self.meta.lengths.flatten()).repeat_interleave(lengths.flatten().to(rows.device))).tolist()
        kept, start = [], 0
        for n in lengths.flatten().tolist():
            kept.append(local[start : start + n])
            start += n
        self.memory.keep(self.rows, kept)
        self.meta = self.meta.select(rows, lengths, counts)
        self.edited()


class CodeBlocks(PooledRows):
    """Codes of one bit width in blocks of a codec layout (`layout`): a block holds `per_block`
    key groups, each in a region of `group` entries with its scales in the block's fields.
    Entries never leave their group's region, so a block's bytes stay decodable as they are."""

    rows: list[CodeRow]

    def __init__(self, memory: KVMemory, rows: list, meta: Segments, layout: BlockLayout, group: int) -> None:
        super().__init__(memory, rows, meta)
        self.layout, self.group = layout, group
        self.per_block = layout.entries // group

    def _units(self, row: CodeRow) -> tuple[list[int], list[int]]:  # type: ignore[override]
        return row.groups, row.counts

    def _unit_size(self) -> int:
        return self.group

    def _fork(self, row: CodeRow) -> CodeRow:  # type: ignore[override]
        self.memory.pool.share(self._blocks_of(row))
        return CodeRow(list(row.groups), list(row.counts))

    def _repoint(self, row: CodeRow, old: int, new: int) -> None:  # type: ignore[override]
        per = self.per_block
        row.groups = [new * per + g % per if g // per == old else g for g in row.groups]

    def _remap(self, row: CodeRow, mapping: dict[int, int]) -> CodeRow:  # type: ignore[override]
        per = self.per_block
        return CodeRow([mapping[g // per] * per + g % per for g in row.groups], list(row.counts))

    def _blocks_of(self, row: CodeRow) -> list[int]:  # type: ignore[override]
        """The blocks `row` stands on, each once, oldest first."""
        return list(dict.fromkeys(g // self.per_block for g in row.groups))

    def groups(self, names: list[str]) -> Segments:
        """Block fields `names` of every row's groups (NG, ...) in order, and `count` (NG,) int32:
        the key groups of the quantized layout's `Part`."""
        device = self.meta.lengths.device
        flat = torch.tensor([g for row in self.rows for g in row.groups], dtype=torch.long, device=device)
        views = self.memory.store.fields(self.layout)
        fields = {name: views[name][flat // self.per_block, flat % self.per_block] for name in names}
        fields["count"] = torch.tensor([n for row in self.rows for n in row.counts], dtype=torch.int32, device=device)
        per_row = torch.tensor([len(row.groups) for row in self.rows], dtype=torch.int64).view_as(self.meta.counts)
        return Segments(fields, per_row.to(device), per_row)

    def _open_regions(self, row: CodeRow) -> int:
        """Regions after the row's last group in its last block that the row may still fill: the
        block is its alone (a shared block is never written into; new groups start a block)."""
        if not row.groups:
            return 0
        last = row.groups[-1]
        if self.memory.pool.blocks[last // self.per_block].ref_count > 1:
            return 0
        return self.per_block - 1 - last % self.per_block

    def blocks_to_add(self, groups: list[int]) -> int:
        """Fresh blocks adding groups[r] key groups to each row r takes (admission asks)."""
        return sum(-(-max(n - self._open_regions(row), 0) // self.per_block) for row, n in zip(self.rows, groups))

    def add(self, fields: dict[str, torch.Tensor], block_fields: dict[str, torch.Tensor], meta: dict[str, torch.Tensor], counts: torch.Tensor) -> None:
        """Append whole groups: each row's first counts[b, h] (host, a multiple of the group)
        entries of fields (batch, heads, W, ...) and meta, with the first counts // group of
        block_fields (batch, heads, W / group, ...), after the row's last group (in the open
        regions of its last block, then in fresh blocks)."""
        per, g = self.per_block, self.group
        wanted = (counts // g).flatten().tolist()
        fresh = self.memory.pool.allocate(self.blocks_to_add(wanted))  # all or nothing
        added: list[int] = []
        for row, n in zip(self.rows, wanted):
            new = [row.groups[-1] + 1 + i for i in range(min(n, self._open_regions(row)))]
            while len(new) < n:
                block, fresh = fresh[0], fresh[1:]
                new += [block * per + i for i in range(min(per, n - len(new)))]
            row.groups += new
            row.counts += [g] * n
            added += new
        width = next(iter(block_fields.values())).shape[2]
        device = counts.device
        at = torch.tensor(added, dtype=torch.long)
        store = self.memory.store
        store.write_blocks(at // per, {n: x.flatten(0, 2).index_select(0, _first(wanted, width, device).to(x.device)) for n, x in block_fields.items()}, self.layout, (at % per,))
        slots = (at[:, None] * g + torch.arange(g)).flatten()
        picked = _first(counts.flatten().tolist(), width * g, device)
        store.write_fields(slots, {n: x.flatten(0, 2).index_select(0, picked.to(x.device)) for n, x in fields.items()}, self.layout)
        self.meta = self.meta.extend(meta, counts)
        self.edited()

    def keep(self, rows: torch.Tensor, lengths: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """Keep the flat entries `rows` (ascending within each row), `lengths` per row: each group
        keeps its kept entries at the front of its region (in place where no one else holds the
        block, else in the row's own fresh copy of the block), a group left with none is dropped,
        and a block the row no longer stands on goes back to the pool."""
        pool, per, g = self.memory.pool, self.per_block, self.group
        old = torch.tensor([n for row in self.rows for n in row.counts], dtype=torch.long)
        group_of = torch.repeat_interleave(torch.arange(old.numel()), old)  # flat entry -> flat group
        offset = torch.arange(group_of.numel()) - exclusive_cumsum(old).index_select(0, group_of)
        picked = rows.cpu()
        kept_group, kept_offset = group_of.index_select(0, picked), offset.index_select(0, picked)
        new = torch.bincount(kept_group, minlength=old.numel())
        rank = torch.arange(kept_group.numel()) - exclusive_cumsum(new).index_select(0, kept_group)
        old_n, new_n = old.tolist(), new.tolist()
        # Per row, the blocks whose groups change in place and that others hold: a fresh copy each.
        owner = [r for r, row in enumerate(self.rows) for _ in row.groups]
        flat_groups = [gr for row in self.rows for gr in row.groups]
        to_copy = list(dict.fromkeys(
            (owner[j], flat_groups[j] // per) for j in range(len(old_n)) if 0 < new_n[j] < old_n[j] and pool.blocks[flat_groups[j] // per].ref_count > 1
        ))  # fmt: skip
        fresh = pool.allocate(len(to_copy))  # all or nothing: raises before any change
        copy_of = dict(zip(to_copy, fresh))
        self.memory.store.copy_blocks([(block, new_block) for (_, block), new_block in copy_of.items()])

        def placed(j: int) -> int:
            """Flat group j's group slot once its row's copies are made."""
            gr = flat_groups[j]
            return copy_of.get((owner[j], gr // per), gr // per) * per + gr % per

        sources, targets = [], []
        for j, o, k in zip(kept_group.tolist(), kept_offset.tolist(), rank.tolist()):
            if o != k:
                sources.append(placed(j) * g + o)
                targets.append(placed(j) * g + k)
        self.memory.store.move(sources, targets, self.layout)
        j = 0
        for row in self.rows:
            before = self._blocks_of(row)
            groups, row_counts = [], []
            for _ in row.groups:
                if new_n[j]:
                    groups.append(placed(j))
                    row_counts.append(new_n[j])
                j += 1
            row.groups, row.counts = groups, row_counts
            now = set(self._blocks_of(row))
            pool.release([b for b in before if b not in now])  # empty blocks, and the originals of copies
        self.meta = self.meta.select(rows, lengths, counts)
        self.edited()


def _first(counts: list[int], width: int, device: torch.device) -> torch.Tensor:
    """Flat indices into rows of `width` items (row after row) of each row's first counts[r]."""
    return torch.tensor([r * width + i for r, n in enumerate(counts) for i in range(n)], dtype=torch.long, device=device)
