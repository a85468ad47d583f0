"""Block tables of (sequence, KV head) rows over one pool: what appending, forking, evicting and
releasing a row do to its blocks. Integers only; each operation returns the flat slots
(block * block_size + offset) the tensor side (`store.py`) reads and writes.

A row holds `length` entries, oldest first, in `blocks`: entry i sits in blocks[i // block_size]
at offset i % block_size. Only the last block may be partly filled. Rows sharing a block (a fork,
a prefix hit) never write into it: a row appending to a shared, partly filled last block copies
that one block first (copy on write), never the row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvforge.memory.pool import BlockPool


@dataclass
class Row:
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # entries held


@dataclass
class Append:
    copies: list[tuple[int, int]]  # (source block, new block): copy the source's entries first
    slots: list[int]  # flat slot of each appended entry, in order


@dataclass
class Keep:
    sources: list[int]  # flat slot of each kept entry before, in order
    targets: list[int]  # where it goes (read every source before writing: they may overlap)
    in_place: bool  # the row kept its own first blocks (no one else held them)


class RowBlocks:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size={block_size} is outside the allowed range [1, inf)")
        self.pool, self.block_size = pool, block_size

    def blocks_for(self, entries: int) -> int:
        return -(-entries // self.block_size)

    def slot(self, row: Row, entry: int) -> int:
        return row.blocks[entry // self.block_size] * self.block_size + entry % self.block_size

    def slots(self, row: Row) -> list[int]:
        """The flat slot of every entry of `row`, oldest first."""
        return [self.slot(row, i) for i in range(row.length)]

    def blocks_to_append(self, row: Row, count: int) -> int:
        """Blocks appending `count` entries to `row` takes from the pool (admission asks this)."""
        if count == 0:
            return 0
        new = self.blocks_for(row.length + count) - len(row.blocks)
        partly_filled = row.length % self.block_size != 0
        shared_tail = partly_filled and self.pool.blocks[row.blocks[-1]].ref_count > 1
        return new + int(shared_tail)

    def append(self, row: Row, count: int) -> Append:
        """Room for `count` more entries at the end of `row` (raises OutOfBlocks, changing
        nothing, when the pool cannot give it)."""
        if count < 0:
            raise ValueError(f"count={count} is outside the allowed range [0, inf)")
        need = self.blocks_to_append(row, count)
        fresh = self.pool.allocate(need)  # all or nothing: raises before any change
        copies = []
        if count and row.length % self.block_size and self.pool.blocks[row.blocks[-1]].ref_count > 1:
            tail, new_tail = row.blocks[-1], fresh.pop(0)
            copies.append((tail, new_tail))
            self.pool.release([tail])
            row.blocks[-1] = new_tail
        row.blocks.extend(fresh)
        start = row.length
        row.length += count
        return Append(copies, [self.slot(row, i) for i in range(start, row.length)])

    def own(self, row: Row, block_indices: list[int]) -> list[tuple[int, int]]:
        """The row is about to overwrite entries in its blocks at `block_indices`: each one held by
        another row is first replaced by a fresh copy (copy on write of that block alone), and
        each stops standing for its prefix hash. Returns the (source, new block) copies to make."""
        wanted = list(dict.fromkeys(block_indices))
        shared = [i for i in wanted if self.pool.blocks[row.blocks[i]].ref_count > 1]
        fresh = self.pool.allocate(len(shared))  # all or nothing: raises before any change
        copies = [(row.blocks[i], new) for i, new in zip(shared, fresh)]
        self.pool.release([source for source, _ in copies])
        for i, new in zip(shared, fresh):
            row.blocks[i] = new
        for i in wanted:
            self.pool.forget(row.blocks[i])
        return copies

    def fork(self, row: Row) -> Row:
        """A row holding the same entries in the same blocks (one more reference each)."""
        self.pool.share(row.blocks)
        return Row(list(row.blocks), row.length)

    def keep(self, row: Row, kept: list[int]) -> Keep:
        """Keep only the entries `kept` (ascending entry indices) of `row`, in order, at its front.
        Blocks no one else holds are compacted in place (they stop standing for their prefix
        hashes: their entries change) and the rest released; a row sharing any block writes its
        kept entries to fresh blocks and lets go of every old one."""
        if any(b <= a for a, b in zip(kept, kept[1:])) or (kept and not 0 <= kept[0] <= kept[-1] < row.length):
            raise ValueError(f"kept entries must ascend within [0, {row.length}), got {kept[:8]}...")
        sources = [self.slot(row, i) for i in kept]
        count = self.blocks_for(len(kept))
        exclusive = all(self.pool.blocks[b].ref_count == 1 for b in row.blocks)
        if exclusive:
            self.pool.release(row.blocks[count:])
            row.blocks = row.blocks[:count]
            for block_id in row.blocks:
                self.pool.forget(block_id)
        else:
            fresh = self.pool.allocate(count)
            self.pool.release(row.blocks)
            row.blocks = fresh
        row.length = len(kept)
        return Keep(sources, self.slots(row), exclusive)

    def release(self, row: Row) -> None:
        """The row lets go of its blocks and holds nothing."""
        self.pool.release(row.blocks)
        row.blocks, row.length = [], 0
