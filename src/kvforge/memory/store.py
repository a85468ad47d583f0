"""The tensors behind a pool's block ids, for full-precision entries, and moving blocks between
stores (a GPU pool and a CPU tier, say) as they are.

    keys, values: (num_blocks, block_size, head_dim)   block b holds entries of one row

The bytes are the tensors': `capacity_nbytes` is what the store holds whatever is in use;
`allocated_nbytes(pool)` what the blocks handed out stand for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.memory.pool import BlockPool


@dataclass
class Swapped:
    """Blocks taken out of a store, as they were: keys, values (count, block_size, head_dim)."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class BlockStore:
    def __init__(self, num_blocks: int, block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.block_size, self.head_dim = block_size, head_dim
        with torch.inference_mode(False):  # see grow()
            self.keys = torch.zeros(num_blocks, block_size, head_dim, dtype=dtype, device=device)
            self.values = torch.zeros_like(self.keys)

    @property
    def num_blocks(self) -> int:
        return self.keys.shape[0]

    def grow(self, count: int) -> None:
        """`count` more blocks after the last (zeros: a padded read of them is never NaN). The
        tensors are reallocated: hold block ids, never views, across a growth. Made outside
        inference mode whatever the caller's mode: a store outlives the call that grew it, and an
        inference tensor could not be written outside that mode later."""
        with torch.inference_mode(False):
            extra = self.keys.new_zeros(count, self.block_size, self.head_dim)
            self.keys, self.values = torch.cat([self.keys, extra]), torch.cat([self.values, extra])

    def shrink_to_nothing(self) -> None:
        with torch.inference_mode(False):
            self.keys, self.values = self.keys[:0].clone(), self.values[:0].clone()

    @property
    def capacity_nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block: its keys and its values."""
        return 2 * self.block_size * self.head_dim * self.keys.element_size()

    def allocated_nbytes(self, pool: BlockPool) -> int:
        return pool.num_used * self.block_nbytes

    def _flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values as (num_blocks * block_size, head_dim): a flat slot indexes both."""
        return self.keys.view(-1, self.head_dim), self.values.view(-1, self.head_dim)

    def write(self, slots: list[int], keys: torch.Tensor | None, values: torch.Tensor) -> None:
        """Entry i of keys, values (n, head_dim) goes to flat slot slots[i] (keys None: values only)."""
        flat_k, flat_v = self._flat()
        index = torch.tensor(slots, dtype=torch.long, device=self.keys.device)
        # Detached: the store outlives every forward; it must never join an autograd graph.
        if keys is not None:
            flat_k.index_copy_(0, index, keys.detach().to(self.keys.dtype))
        flat_v.index_copy_(0, index, values.detach().to(self.values.dtype))

    def read(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values (n, head_dim) of the entries in `slots`, in order (a copy)."""
        flat_k, flat_v = self._flat()
        index = torch.tensor(slots, dtype=torch.long, device=self.keys.device)
        return flat_k[index], flat_v[index]

    def move(self, sources: list[int], targets: list[int]) -> None:
        """Entries from flat `sources` to `targets`; every source is read before any target is
        written, so the two may overlap (an eviction compacting a row in place)."""
        keys, values = self.read(sources)
        self.write(targets, keys, values)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Whole blocks (source, target): a row's copy on write of its shared last block."""
        if not pairs:
            return
        sources, targets = (torch.tensor(ids, dtype=torch.long, device=self.keys.device) for ids in zip(*pairs))
        self.keys[targets] = self.keys[sources]
        self.values[targets] = self.values[sources]

    def swap_out(self, ids: list[int], device: torch.device | str = "cpu") -> Swapped:
        """A copy of blocks `ids` on `device`, bytes as they are (the caller releases the ids)."""
        index = torch.tensor(ids, dtype=torch.long, device=self.keys.device)
        return Swapped(self.keys[index].to(device), self.values[index].to(device))

    def swap_in(self, pool: BlockPool, swapped: Swapped) -> list[int]:
        """Blocks of `pool` (this store's) holding what `swapped` holds, in order (one reference
        each; raises OutOfBlocks when the pool cannot give them)."""
        ids = pool.allocate(swapped.keys.shape[0])
        index = torch.tensor(ids, dtype=torch.long, device=self.keys.device)
        self.keys[index] = swapped.keys.to(self.keys.device, self.keys.dtype)
        self.values[index] = swapped.values.to(self.values.device, self.values.dtype)
        return ids
