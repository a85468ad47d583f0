"""The block pool: who owns K/V memory. Bookkeeping only: integers, reference counts, a free
queue, and the hashes of full blocks; the tensors behind the ids live in `store.py`.

Memory is cut into `num_blocks` blocks, each holding a fixed number of entries of one
(sequence, KV head) row. A block handed out has one reference; sharing it (a fork, a prefix hit)
adds one, releasing drops one, and a block left with none goes back to the free queue.

A full block may be marked with the hash of what it stands for (`hashing.py`: the tokens before
and in it, the KV settings, the model). While it is in use, and after it is freed until it is
reused, `lookup` finds it: a later request with the same prefix takes it instead of computing it
again (prefix sharing at block granularity, as vLLM's prefix cache does). Free blocks are reused
oldest-freed first, so a freed block stays findable as long as the pool can afford.

Invariants (checked by `check()` in the tests):
- ref_count == 0  <=>  the block id is in the free queue;
- hash_to_block[h] == b  =>  blocks[b].hash == h (a hash names at most one block);
- a block in the free queue that carries a hash is still in hash_to_block (findable);
- shared == the number of blocks with ref_count > 1 (kept as references change, so /metrics
  reads it without walking every block).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


class OutOfBlocks(Exception):
    """The pool has fewer free blocks than asked for (the caller waits, preempts or fails)."""


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: int | None = None  # set while the block is full and marked as standing for a prefix


class BlockPool:
    """`expand(short)`, when given, is called when an allocation finds `short` blocks too few: it
    may `grow` the pool (an unbounded pool, whose tensors grow with it) before the pool gives up."""

    def __init__(self, num_blocks: int, expand: Callable[[int], None] | None = None) -> None:
        if num_blocks < 0 or (num_blocks == 0 and expand is None):
            raise ValueError(f"num_blocks={num_blocks} is outside the allowed range [1, inf) (0 only for a pool that grows)")
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free block ids, oldest freed first; an OrderedDict so a cache hit can take a free block
        # out of the middle in O(1).
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.shared = 0
        self.expand = expand

    def grow(self, count: int) -> None:
        """`count` more blocks, free, ids after the last (the tensors behind them grow first)."""
        first = self.num_blocks
        self.blocks.extend(Block(i) for i in range(first, first + count))
        self.free_queue.update(dict.fromkeys(range(first, first + count)))

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_shared(self) -> int:
        """Blocks held by more than one row."""
        return self.shared

    def can_allocate(self, count: int) -> bool:
        return count <= self.num_free

    def allocate(self, count: int) -> list[int]:
        """`count` free blocks, one reference each, oldest freed first. A reused block forgets the
        hash it carried: its entries are about to be overwritten."""
        if count > self.num_free and self.expand is not None:
            self.expand(count - self.num_free)
        if count > self.num_free:
            raise OutOfBlocks(f"{count} blocks asked, {self.num_free} free of {self.num_blocks}")
        ids = []
        for _ in range(count):
            block_id, _ = self.free_queue.popitem(last=False)
            self.forget(block_id)
            self.blocks[block_id].ref_count = 1
            ids.append(block_id)
        return ids

    def share(self, ids: list[int]) -> None:
        """One more reference to each of `ids` (blocks in use)."""
        for block_id in ids:  # checked first: a bad id changes nothing
            if self.blocks[block_id].ref_count < 1:
                raise ValueError(f"block {block_id} is free; only a block in use can be shared")
        for block_id in ids:
            self._reference(self.blocks[block_id])

    def release(self, ids: list[int]) -> None:
        """One reference less to each of `ids`; a block left with none goes to the end of the free
        queue (keeping its hash: it stays findable until it is reused)."""
        for block_id, times in Counter(ids).items():  # checked first: a bad id changes nothing
            if self.blocks[block_id].ref_count < times:
                raise ValueError(f"block {block_id} is released more often than it was handed out")
        for block_id in ids:
            block = self.blocks[block_id]
            block.ref_count -= 1
            self.shared -= block.ref_count == 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None

    def mark(self, block_id: int, block_hash: int) -> int:
        """Say that full block `block_id` stands for `block_hash`. If another block already does,
        that one stays the one found (the caller may keep using its own); returns the block found
        by the hash from now on."""
        known = self.hash_to_block.get(block_hash)
        if known is not None:
            return known
        block = self.blocks[block_id]
        if block.ref_count < 1:
            raise ValueError(f"block {block_id} is free; only a block in use can be marked")
        if block.hash is not None:
            del self.hash_to_block[block.hash]
        block.hash = block_hash
        self.hash_to_block[block_hash] = block_id
        return block_id

    def forget(self, block_id: int) -> None:
        """Block `block_id` is about to hold other entries: it no longer stands for its hash."""
        block = self.blocks[block_id]
        if block.hash is not None:
            del self.hash_to_block[block.hash]
            block.hash = None

    def lookup(self, block_hash: int) -> int | None:
        """The block standing for `block_hash`, with one more reference (taken out of the free
        queue if it was free); None when no block does."""
        block_id = self.hash_to_block.get(block_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        self._reference(block)
        return block_id

    def _reference(self, block: Block) -> None:
        block.ref_count += 1
        self.shared += block.ref_count == 2

    def check(self) -> None:
        """Raise AssertionError if an invariant of the module docstring does not hold."""
        for block in self.blocks:
            assert (block.ref_count == 0) == (block.id in self.free_queue), f"block {block.id}: ref_count {block.ref_count}"
            assert block.ref_count >= 0
            if block.hash is not None:
                assert self.hash_to_block.get(block.hash) == block.id, f"block {block.id} carries a hash that names another"
        for block_hash, block_id in self.hash_to_block.items():
            assert self.blocks[block_id].hash == block_hash
        assert self.shared == sum(1 for b in self.blocks if b.ref_count > 1), "the count of shared blocks drifted"
