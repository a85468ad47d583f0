"""The tensors behind a pool's block ids, and moving blocks between stores (a GPU pool and a CPU
tier, say) as they are.

What a block holds is its `BlockLayout`: fields per entry and fields per block. Full precision
(`BlockLayout.full`) is one key and one value row per entry:

    k, v: (num_blocks, block_size, head_dim)   block b holds entries of one row

A codec's layout holds codes per entry and what the entries of a block share (a key group's
scales, say) per block: `tensors[name]` is (num_blocks, block_size, *shape) for an entry field and
(num_blocks, *shape) for a block field. Bytes are the tensors': `capacity_nbytes` is what the
store holds whatever is in use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.memory.pool import BlockPool

Field = tuple[str, tuple[int, ...], torch.dtype]  # name, shape of one entry's (or block's) part, dtype


@dataclass(frozen=True)
class BlockLayout:
    """What one block holds: `entry` fields (block_size of each) and `block` fields (one each)."""

    entry: tuple[Field, ...]
    block: tuple[Field, ...] = ()

    @classmethod
    def full(cls, head_dim: int, dtype: torch.dtype) -> BlockLayout:
        return cls((("k", (head_dim,), dtype), ("v", (head_dim,), dtype)))

    def nbytes(self, block_size: int) -> int:
        """Bytes of one block."""

        def size(shape: tuple[int, ...], dtype: torch.dtype) -> int:
            return int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()

        return block_size * sum(size(s, d) for _, s, d in self.entry) + sum(size(s, d) for _, s, d in self.block)


@dataclass
class Swapped:
    """Blocks taken out of a store, as they were: each field (count, ...) in block order."""

    tensors: dict[str, torch.Tensor]

    @property
    def keys(self) -> torch.Tensor:
        return self.tensors["k"]

    @property
    def values(self) -> torch.Tensor:
        return self.tensors["v"]

    @property
    def count(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


class BlockStore:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        head_dim: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        layout: BlockLayout | None = None,  # None: full precision of head_dim and dtype
    ) -> None:
        layout = layout if layout is not None else BlockLayout.full(head_dim, dtype)
        self.block_size, self.layout = block_size, layout
        self.entry_names = [name for name, _, _ in layout.entry]
        with torch.inference_mode(False):  # see grow()
            self.tensors = {name: torch.zeros(num_blocks, block_size, *shape, dtype=dtype, device=device) for name, shape, dtype in layout.entry}
            self.tensors.update({name: torch.zeros(num_blocks, *shape, dtype=dtype, device=device) for name, shape, dtype in layout.block})

    @property
    def keys(self) -> torch.Tensor:
        """(num_blocks, block_size, head_dim): the keys of a full-precision layout."""
        return self.tensors["k"]

    @property
    def values(self) -> torch.Tensor:
        return self.tensors["v"]

    @property
    def head_dim(self) -> int:
        return self.layout.entry[0][1][-1]

    @property
    def num_blocks(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def grow(self, count: int) -> None:
        """`count` more blocks after the last (zeros: a padded read of them is never NaN). The
        tensors are reallocated: hold block ids, never views, across a growth. Made outside
        inference mode whatever the caller's mode: a store outlives the call that grew it, and an
        inference tensor could not be written outside that mode later."""
        with torch.inference_mode(False):
            self.tensors = {name: torch.cat([t, t.new_zeros(count, *t.shape[1:])]) for name, t in self.tensors.items()}

    def shrink_to_nothing(self) -> None:
        with torch.inference_mode(False):
            self.tensors = {name: t[:0].clone() for name, t in self.tensors.items()}

    @property
    def capacity_nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def block_nbytes(self) -> int:
        return self.layout.nbytes(self.block_size)

    def allocated_nbytes(self, pool: BlockPool) -> int:
        return pool.num_used * self.block_nbytes

    def flat(self, name: str) -> torch.Tensor:
        """Entry field `name` as (num_blocks * block_size, *shape): a flat slot indexes it."""
        t = self.tensors[name]
        return t.view(-1, *t.shape[2:])

    def _index(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        device = self.tensors[self.entry_names[0]].device
        return ids.to(device) if isinstance(ids, torch.Tensor) else torch.tensor(ids, dtype=torch.long, device=device)

    def write_fields(self, slots: list[int] | torch.Tensor, fields: dict[str, torch.Tensor]) -> None:
        """Entry i of each field (n, *shape) goes to flat slot slots[i]."""
        index = self._index(slots)
        for name, t in fields.items():
            # Detached: the store outlives every forward; it must never join an autograd graph.
            self.flat(name).index_copy_(0, index, t.detach().to(self.tensors[name].dtype))

    def write_blocks(self, ids: list[int] | torch.Tensor, fields: dict[str, torch.Tensor]) -> None:
        """Block field i of each (n, *shape) goes to block ids[i]."""
        index = self._index(ids)
        for name, t in fields.items():
            self.tensors[name].index_copy_(0, index, t.detach().to(self.tensors[name].dtype))

    def write(self, slots: list[int], keys: torch.Tensor | None, values: torch.Tensor) -> None:
        """Full precision: entry i of keys, values (n, head_dim) goes to flat slot slots[i] (keys
        None: values only)."""
        self.write_fields(slots, {"v": values} if keys is None else {"k": keys, "v": values})

    def read_fields(self, slots: list[int] | torch.Tensor, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Entry fields (n, *shape) of the entries in `slots`, in order (copies)."""
        index = self._index(slots)
        return {name: self.flat(name).index_select(0, index) for name in (names or self.entry_names)}

    def read(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Full precision: keys, values (n, head_dim) of the entries in `slots`, in order."""
        got = self.read_fields(slots, ["k", "v"])
        return got["k"], got["v"]

    def move(self, sources: list[int], targets: list[int]) -> None:
        """Entries from flat `sources` to `targets`; every source is read before any target is
        written, so the two may overlap (an eviction compacting a row in place)."""
        if sources:
            self.write_fields(targets, self.read_fields(sources))

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Whole blocks (source, target): a row's copy on write of one shared block."""
        if not pairs:
            return
        sources, targets = (self._index(list(ids)) for ids in zip(*pairs))
        for t in self.tensors.values():
            t[targets] = t[sources]

    def swap_out(self, ids: list[int], device: torch.device | str = "cpu") -> Swapped:
        """A copy of blocks `ids` on `device`, bytes as they are (the caller releases the ids)."""
        index = self._index(ids)
        return Swapped({name: t[index].to(device) for name, t in self.tensors.items()})

    def fits(self, swapped: Swapped) -> bool:
        return set(swapped.tensors) == set(self.tensors) and all(
            swapped.tensors[n].shape[1:] == t.shape[1:] and swapped.tensors[n].dtype == t.dtype for n, t in self.tensors.items()
        )

    def swap_in(self, pool: BlockPool, swapped: Swapped) -> list[int]:
        """Blocks of `pool` (this store's) holding what `swapped` holds, in order (one reference
        each; raises OutOfBlocks when the pool cannot give them)."""
        ids = pool.allocate(swapped.count)
        index = self._index(ids)
        for name, t in self.tensors.items():
            t[index] = swapped.tensors[name].to(t.device, t.dtype)
        return ids
