"""The bytes behind a pool's block ids: one arena of equal blocks, read through block layouts,
and moving blocks between stores (a GPU pool and a CPU tier, say) as they are.

    arena: (num_blocks, block_nbytes) uint8   block b is row b, whatever layout it holds

A `BlockLayout` says what a block holds: fields per entry (`entries` of each) and fields per block.
The memory's own layout is full precision, one key and one value row per entry:

    k, v: (num_blocks, entries, head_dim)   views of the arena (k first, then v, in each block)

A codec's layout (`storage/pagedquant.py`) holds codes per entry and what a key group's entries
share per block, in the same bytes: a block handed to a full-precision row holds K/V, one handed
to quantized rows holds codes, and the pool counts both alike. `fields(layout)` are views of the
arena (rebuilt when the arena grows): field f of block b is arena[b, offset_f : offset_f + size_f].
Bytes are the arena's: `capacity_nbytes` is what the store holds whatever is in use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.memory.pool import BlockPool
from kvforge.memory.summaries import BlockSummaries

Field = tuple[str, tuple[int, ...], torch.dtype]  # name, shape of one entry's (or block's) part, dtype
ALIGN = 16  # bytes: every field starts at a multiple (any dtype's element size divides it)


def _size(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class BlockLayout:
    """What one block holds: `entries` entries of each `entry` field, one of each `block` field."""

    entries: int
    entry: tuple[Field, ...]
    block: tuple[Field, ...] = ()

    @classmethod
    def full(cls, head_dim: int, dtype: torch.dtype, entries: int) -> BlockLayout:
        return cls(entries, (("k", (head_dim,), dtype), ("v", (head_dim,), dtype)))

    def offsets(self) -> dict[str, tuple[int, tuple[int, ...], torch.dtype]]:
        """name -> (byte offset in the block, shape in the block, dtype)."""
        out, at = {}, 0
        for name, shape, dtype in self.entry:
            out[name] = (at, (self.entries, *shape), dtype)
            at = _aligned(at + _size((self.entries, *shape), dtype))
        for name, shape, dtype in self.block:
            out[name] = (at, shape, dtype)
            at = _aligned(at + _size(shape, dtype))
        return out

    def nbytes(self) -> int:
        """Bytes one block of this layout takes (fields and the block aligned)."""
        return _aligned(max((at + _size(shape, dtype) for at, shape, dtype in self.offsets().values()), default=0))


@dataclass
class Swapped:
    """Blocks taken out of a store, bytes as they were: (count, block_nbytes) uint8, and the layout
    of the store they came from."""

    blocks: torch.Tensor
    layout: BlockLayout

    @property
    def count(self) -> int:
        return self.blocks.shape[0]

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes


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
        self.layout = layout if layout is not None else BlockLayout.full(head_dim, dtype, block_size)
        self.block_size = self.layout.entries
        with torch.inference_mode(False):  # see grow()
            self.arena = torch.zeros(num_blocks, self.layout.nbytes(), dtype=torch.uint8, device=device)
        self._views: dict[BlockLayout, dict[str, torch.Tensor]] = {}
        self._flat: dict[tuple[BlockLayout, str], tuple[torch.Tensor, int, int] | None] = {}
        # Key summaries per block, by kind, made when a reader first asks (`summaries`); every
        # write below tells them, so they never describe keys a block no longer holds.
        self._summaries: dict[str, BlockSummaries] = {}

    # --- layouts -------------------------------------------------------------------------------

    def check(self, layout: BlockLayout) -> None:
        if layout.nbytes() > self.block_nbytes:
            raise ValueError(
                f"a block of {layout.entries} entries of this layout takes {layout.nbytes()} bytes, more than the memory's "
                f"blocks of {self.block_nbytes}; use a smaller --quant-group or a memory of larger blocks"
            )

    def fields(self, layout: BlockLayout | None = None) -> dict[str, torch.Tensor]:
        """Views of the arena as `layout`'s fields: (num_blocks, entries, *shape) per entry field,
        (num_blocks, *shape) per block field. Hold block ids, never these views, across a growth."""
        layout = layout or self.layout
        if layout not in self._views:
            self.check(layout)
            nb = self.num_blocks
            # Made outside inference mode, as the arena: a view made inside could not be written outside.
            with torch.inference_mode(False):
                self._views[layout] = {
                    name: self.arena[:, at : at + _size(shape, dtype)].view(dtype).view(nb, *shape)
                    for name, (at, shape, dtype) in layout.offsets().items()
                }
        return self._views[layout]

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return self.fields()

    @property
    def keys(self) -> torch.Tensor:
        """(num_blocks, block_size, head_dim): the keys of the memory's full-precision layout."""
        return self.fields()["k"]

    @property
    def values(self) -> torch.Tensor:
        return self.fields()["v"]

    @property
    def head_dim(self) -> int:
        return self.layout.entry[0][1][-1]

    @property
    def device(self) -> torch.device:
        return self.arena.device

    def summaries(self, kind: str, fields: list[tuple[torch.dtype, float]]) -> BlockSummaries:
        """The key summaries named `kind` of this store's full-precision blocks, of `fields`
        ((dtype, value of an empty block) per tensor), made on first use."""
        if kind not in self._summaries:
            self._summaries[kind] = BlockSummaries(fields, self.num_blocks, self.head_dim, self.device)
        return self._summaries[kind]

    def _summarized(self) -> list[BlockSummaries]:
        return list(self._summaries.values())

    @property
    def summaries_nbytes(self) -> int:
        """Bytes of the key summaries held, every block's."""
        return sum(s.nbytes for s in self._summarized())

    @property
    def summary_block_nbytes(self) -> int:
        """Bytes of the key summaries of one block (0 while no reader asked for any)."""
        return sum(s.block_nbytes for s in self._summarized())

    # --- sizes -------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.arena.shape[0]

    @property
    def capacity_nbytes(self) -> int:
        return self.arena.nbytes

    @property
    def block_nbytes(self) -> int:
        return self.arena.shape[1]

    def allocated_nbytes(self, pool: BlockPool) -> int:
        return pool.num_used * self.block_nbytes

    def block_names(self, ids: set[int]) -> dict[int, int]:
        """{address of block b: its bytes} for each id: what a storage standing on them names
        (`KVStorage.buffers`), so a block two storages share is counted once in a union."""
        first, size = self.arena.data_ptr(), self.block_nbytes
        return dict.fromkeys((first + b * size for b in ids), size)

    def grow(self, count: int) -> None:
        """`count` more blocks after the last (zeros: a padded read of them is never NaN). The
        arena is reallocated: hold block ids, never views, across a growth. Made outside
        inference mode whatever the caller's mode: a store outlives the call that grew it, and an
        inference tensor could not be written outside that mode later."""
        with torch.inference_mode(False):
            self.arena = torch.cat([self.arena, self.arena.new_zeros(count, self.block_nbytes)])
        self._views, self._flat = {}, {}
        for summaries in self._summarized():
            summaries.grow(count)

    def shrink_to_nothing(self) -> None:
        with torch.inference_mode(False):
            self.arena = self.arena[:0].clone()
        self._views, self._flat = {}, {}
        self._summaries = {}

    # --- entries -------------------------------------------------------------------------------

    def _index(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        return ids.to(self.device) if isinstance(ids, torch.Tensor) else torch.tensor(ids, dtype=torch.long, device=self.device)

    def _rows(self, layout: BlockLayout, name: str) -> tuple[torch.Tensor, int, int] | None:
        """Entry field `name` as one contiguous (rows, *shape) view of the arena, with the rows a
        block spans and the field's first row in a block: slot s is row (s // entries) * span +
        first + s % entries. None when the field's entry size does not divide its offset and the
        block (then `fields` is indexed by block and offset instead)."""
        key = (layout, name)
        if key not in self._flat:
            at, shape, dtype = layout.offsets()[name]
            entry = _size(shape[1:], dtype)
            if self.block_nbytes % entry or at % entry:
                self._flat[key] = None
            else:
                with torch.inference_mode(False):
                    view = self.arena.view(dtype).view(-1, *shape[1:])
                self._flat[key] = (view, self.block_nbytes // entry, at // entry)
        return self._flat[key]

    def _at(self, places: tuple[torch.Tensor, torch.Tensor], layout: BlockLayout, name: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Where the entries at (blocks, offsets) of field `name` are: a tensor and its index."""
        blocks, offsets = places
        rows = self._rows(layout, name)
        if rows is None:
            return self.fields(layout)[name], places
        view, span, first = rows
        return view, (blocks * span + (offsets + first),)

    def _places(self, slots: list[int] | torch.Tensor, layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat slots (block * entries + offset) -> (blocks, offsets)."""
        index = self._index(slots)
        return index // layout.entries, index % layout.entries

    def write_fields(self, slots: list[int] | torch.Tensor, fields: dict[str, torch.Tensor], layout: BlockLayout | None = None) -> None:
        """Entry i of each field (n, *shape) goes to flat slot slots[i] of `layout`."""
        layout = layout or self.layout
        places = self._places(slots, layout)
        for name, t in fields.items():
            target, at = self._at(places, layout, name)
            # Detached: the store outlives every forward; it must never join an autograd graph.
            target.index_put_(at, t.detach().to(target.dtype))
        for summaries in self._summarized():
            if layout != self.layout:
                summaries.forget(places[0])  # the blocks hold a codec's codes
            elif "k" in fields:
                summaries.written(*places)

    def write_blocks(self, ids: list[int] | torch.Tensor, fields: dict[str, torch.Tensor], layout: BlockLayout, index: tuple[torch.Tensor, ...] = ()) -> None:
        """Block field i of each (n, *shape) goes to block ids[i] (at `index` within the field)."""
        views = self.fields(layout)
        at = (self._index(ids), *(i.to(self.device) for i in index))
        for name, t in fields.items():
            views[name].index_put_(at, t.detach().to(views[name].dtype))
        for summaries in self._summarized():
            summaries.forget(at[0])

    def write(self, slots: list[int], keys: torch.Tensor | None, values: torch.Tensor) -> None:
        """Full precision: entry i of keys, values (n, head_dim) goes to flat slot slots[i] (keys
        None: values only)."""
        self.write_fields(slots, {"v": values} if keys is None else {"k": keys, "v": values})

    def read_fields(self, slots: list[int] | torch.Tensor, names: list[str] | None = None, layout: BlockLayout | None = None) -> dict[str, torch.Tensor]:
        """Entry fields (n, *shape) of the entries in `slots`, in order (copies)."""
        layout = layout or self.layout
        places = self._places(slots, layout)
        out = {}
        for name in names or [n for n, _, _ in layout.entry]:
            source, at = self._at(places, layout, name)
            out[name] = source.index_select(0, at[0]) if len(at) == 1 else source[at]
        return out

    def read(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Full precision: keys, values (n, head_dim) of the entries in `slots`, in order."""
        got = self.read_fields(slots, ["k", "v"])
        return got["k"], got["v"]

    def move(self, sources: list[int], targets: list[int], layout: BlockLayout | None = None) -> None:
        """Entries from flat `sources` to `targets`; every source is read before any target is
        written, so the two may overlap (an eviction compacting a row in place)."""
        if sources:
            self.write_fields(targets, self.read_fields(sources, layout=layout), layout)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Whole blocks (source, target), whatever they hold: a copy on write of one shared block."""
        if not pairs:
            return
        sources, targets = (self._index(list(ids)) for ids in zip(*pairs))
        self.arena[targets] = self.arena[sources]
        for summaries in self._summarized():
            summaries.copied(sources, targets)

    # --- moving between stores -----------------------------------------------------------------

    def swap_out(self, ids: list[int], device: torch.device | str = "cpu") -> Swapped:
        """A copy of blocks `ids` on `device`, bytes as they are (the caller releases the ids)."""
        return Swapped(self.arena[self._index(ids)].to(device), self.layout)

    def fits(self, swapped: Swapped) -> bool:
        return swapped.layout == self.layout and swapped.blocks.shape[1] == self.block_nbytes

    def swap_in(self, pool: BlockPool, swapped: Swapped) -> list[int]:
        """Blocks of `pool` (this store's) holding what `swapped` holds, in order (one reference
        each; raises OutOfBlocks when the pool cannot give them)."""
        ids = pool.allocate(swapped.count)
        self.arena[self._index(ids)] = swapped.blocks.to(self.device)
        for summaries in self._summarized():
            summaries.forget(self._index(ids))
        return ids
