"""One owner of K/V memory for a (device, dtype, head dim): the block ids (`BlockPool`), the bytes
behind them (`BlockStore`, whose blocks hold full-precision entries or a codec's codes alike) and
what full-precision rows do to their block tables (`RowBlocks`).

Every layer's rows of every cache built over one `KVMemory` take their blocks from it, so a fork,
a prefix hit or a sequence joining a batch is a block-table edit, and what the memory holds is
counted once, from its own tensors:

    capacity_nbytes  = blocks in the store x block bytes   (what the tensors hold)
    allocated_nbytes = blocks handed out x block bytes     (what rows stand on)
    free_nbytes      = capacity_nbytes - allocated_nbytes

where a block's bytes include its key summaries once a reader reads by them (`summaries.py`: a
few hundred bytes beside a block of 32 entries).

A memory made with `num_blocks` is bounded: an allocation past it raises `OutOfBlocks` (the engine
then waits or preempts). One made without grows when it runs out, by what it
lacks and at least a quarter of its size (MIN_GROWTH blocks at the least): a cache about to append
a prompt chunk in every layer `reserve`s all of it at once. It gives its tensors back once no block
is in use (`trim`), so rows reach the pool and the row tables through this object, never by
holding `pool` or `rows` themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvforge.memory.pool import BlockPool, OutOfBlocks
from kvforge.memory.rows import Row, RowBlocks
from kvforge.memory.store import BlockLayout, BlockStore

BLOCK_SIZE = 32  # entries per block: with 2k kept entries a row wastes under 1.6% in its last block
MIN_GROWTH = 256  # blocks an unbounded memory grows by at the least


class KVMemory:
    def __init__(
        self,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        num_blocks: int | None = None,  # None: unbounded, grows on demand
        block_size: int = BLOCK_SIZE,
        keeps: bool = False,  # unbounded but never trimmed: freed blocks stay findable by their hashes
    ) -> None:
        self.bounded, self.keeps = num_blocks is not None, keeps
        self.layout = BlockLayout.full(head_dim, dtype, block_size)
        self.store = BlockStore(num_blocks or 0, block_size, device=device, layout=self.layout)
        self.pool = BlockPool(num_blocks or 0, expand=None if self.bounded else self._grow)
        self.rows = RowBlocks(self.pool, block_size)

    @classmethod
    def of_bytes(
        cls, nbytes: int, head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu", block_size: int = BLOCK_SIZE,
        summary_nbytes: int = 0,  # bytes of the key summaries each block will have (a page reader's)
    ) -> KVMemory:  # fmt: skip
        """A bounded memory of as many blocks as `nbytes` holds (at least one), their summaries included."""
        block = BlockLayout.full(head_dim, dtype, block_size).nbytes() + summary_nbytes
        if nbytes < block:
            raise ValueError(f"a K/V memory of {nbytes} bytes holds no block of {block} bytes; give at least {block}")
        return cls(head_dim, dtype, device, nbytes // block, block_size)

    @property
    def block_size(self) -> int:
        return self.rows.block_size

    @property
    def block_nbytes(self) -> int:
        return self.store.block_nbytes

    @property
    def capacity_nbytes(self) -> int:
        return self.store.capacity_nbytes + self.store.summaries_nbytes

    @property
    def allocated_nbytes(self) -> int:
        return self.pool.num_used * (self.block_nbytes + self.store.summary_block_nbytes)

    @property
    def free_nbytes(self) -> int:
        return self.capacity_nbytes - self.allocated_nbytes

    def reserve(self, count: int) -> None:
        """An unbounded memory makes sure `count` blocks are free, growing once by what it lacks
        (a prompt chunk about to be appended by every layer: one copy of the store, not one per
        layer). A bounded memory changes nothing: allocations past it raise."""
        if not self.bounded and self.pool.num_free < count:
            self._grow(count - self.pool.num_free)

    def _grow(self, short: int) -> None:
        # By what is short, and at least a quarter (amortized growth for decoding's block at a
        # time): each growth copies the store once, and old and new stores coexist meanwhile.
        count = max(short, self.pool.num_blocks // 4, MIN_GROWTH)
        self.store.grow(count)
        self.pool.grow(count)

    def trim(self) -> None:
        """An unbounded memory with no block in use gives its tensors back (unless it `keeps`
        them: a server's, whose freed blocks may be found again by a later prompt)."""
        if not self.bounded and not self.keeps and self.pool.num_blocks and self.pool.num_used == 0:
            self.store.shrink_to_nothing()
            self.pool = BlockPool(0, expand=self._grow)
            self.rows = RowBlocks(self.pool, self.rows.block_size)

    def keep(self, rows: list[Row], kept: Sequence[Sequence[int]]) -> bool:
        """Each row r keeps only its entries kept[r] (ascending), at its front (`RowBlocks.keep`),
        the entries moved in the store; all rows or none: a bounded memory that cannot give the
        fresh blocks rows sharing theirs need raises OutOfBlocks before any row changes. Whether
        any row changed."""
        changing = [r for r, k in enumerate(kept) if len(k) != rows[r].length]
        alone = {r for r in changing if all(self.pool.blocks[b].ref_count == 1 for b in rows[r].blocks)}
        shared = [r for r in changing if r not in alone]
        if self.bounded:
            freed = sum(len(rows[r].blocks) - self.rows.blocks_for(len(kept[r])) for r in alone)
            need = sum(self.rows.blocks_for(len(kept[r])) for r in shared)
            if need > self.pool.num_free + freed:
                raise OutOfBlocks(f"evicting takes {need} fresh blocks for shared rows, {self.pool.num_free + freed} free")
        sources: list[int] = []
        targets: list[int] = []
        for r in sorted(alone) + shared:  # rows alone first: what they free, shared rows may take
            moved = self.rows.keep(rows[r], list(kept[r]))
            sources += moved.sources
            targets += moved.targets
        self.store.move(sources, targets)  # every source is read before any target is written
        return bool(changing)

    def stats(self) -> dict[str, int]:
        """Blocks used, shared and free, and the bytes above (for /metrics and benchmarks)."""
        return {
            "blocks_used": self.pool.num_used,
            "blocks_shared": self.pool.num_shared,
            "blocks_free": self.pool.num_free,
            "block_size": self.block_size,
            "capacity_bytes": self.capacity_nbytes,
            "allocated_bytes": self.allocated_nbytes,
            "summary_bytes": self.store.summaries_nbytes,
        }


_shared: dict[tuple[str, torch.dtype, int], KVMemory] = {}


def shared_memory(device: torch.device, dtype: torch.dtype, head_dim: int) -> KVMemory:
    """The process's unbounded memory for (device, dtype, head dim), made on first use: caches
    built without a memory of their own share it, so forks and stacks of them copy nothing."""
    key = (str(torch.device(device)), dtype, head_dim)
    if key not in _shared:
        _shared[key] = KVMemory(head_dim, dtype, device)
    return _shared[key]
