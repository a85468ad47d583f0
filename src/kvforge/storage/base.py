"""The storage contract: how one attention layer's kept K/V entries are held.

A policy decides *what* to keep; a storage decides *how* it is held. The cache and the policies
only use what this contract declares, so a layout can change without either knowing:

- `append(keys, values, positions, valid)`: store a chunk (padding excluded);
- `attend(query, positions, valid, scaling)`: attention of the chunk's queries over everything
  held, causal by each entry's logical position (the layout decides how it reads itself);
- `accumulate_attention(name, ...)`: add the attention each held entry receives to policy state;
- `view()`: a dense (batch, kv_heads, slots, ...) picture of what is held, for scoring;
- `keep(view, index, mask, reserve)`: keep only the chosen slots of that view, in time order;
- `allocated_nbytes` (spare capacity included) and `kept_nbytes` (entries x entry size).

Rows are (sequence, KV head) pairs; each holds its own number of entries, oldest first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch


class PaddedView:
    """A dense, left-aligned picture of what a storage holds, for attention and scoring.

    Slot j of row (b, h) is the j-th oldest kept entry; slots past lengths[b, h] are padding.
    `keys` and `values` may be given as zero-argument functions: they are built on first use, so
    a policy that scores by position or by its own state never pays for a copy of K/V.
    """

    def __init__(
        self,
        keys: torch.Tensor | Callable[[], torch.Tensor],  # (batch, kv_heads, slots, head_dim)
        values: torch.Tensor | Callable[[], torch.Tensor],  # (batch, kv_heads, slots, head_dim)
        positions: torch.Tensor,  # (batch, kv_heads, slots) int64, logical index of the token
        valid: torch.Tensor,  # (batch, kv_heads, slots) bool, False on padding slots
        aux: dict[str, torch.Tensor] | None = None,  # name -> (batch, kv_heads, slots)
    ) -> None:
        self._keys, self._values = keys, values
        self.positions, self.valid = positions, valid
        self.aux = aux if aux is not None else {}

    @property
    def keys(self) -> torch.Tensor:
        if not isinstance(self._keys, torch.Tensor):
            self._keys = self._keys()
        return self._keys

    @property
    def values(self) -> torch.Tensor:
        if not isinstance(self._values, torch.Tensor):
            self._values = self._values()
        return self._values

    def replace_values(self, values: torch.Tensor, changed: torch.Tensor) -> None:
        """Where (batch, kv_heads, slots) `changed`, take (..., head_dim) `values` instead."""
        self._values = torch.where(changed[..., None], values.to(self.values.dtype), self.values)

    @property
    def lengths(self) -> torch.Tensor:
        """(batch, kv_heads) number of real entries per row."""
        return self.valid.sum(-1)


def exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    """Start offset of each segment: (S,) counts -> (S,) offsets, offsets[0] == 0."""
    return torch.cumsum(counts, 0) - counts


def spans(starts: torch.Tensor, counts: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Flat indices of segments of counts[i] consecutive entries beginning at starts[i], one
    after the other: (sum(counts),) int64. starts, counts: (S,). `total`: sum(counts) when the
    caller knows it on the host (then nothing waits for the device to tell the output's size)."""
    first = torch.repeat_interleave(starts - exclusive_cumsum(counts), counts, output_size=total)
    return first + torch.arange(first.numel(), device=counts.device)


def sequence_rows(lengths: torch.Tensor, sequences: list[int]) -> torch.Tensor:
    """Flat entry indices of the given sequences, in order, for entries laid out row after row
    (row b * kv_heads + h holds lengths[b, h] of them): (M,) int64."""
    offsets = exclusive_cumsum(lengths.flatten()).view_as(lengths)[sequences].flatten()
    return spans(offsets, lengths[sequences].flatten())


def buffers_of(tensors: list[torch.Tensor]) -> dict[int, int]:
    """{address: bytes} of the memory under `tensors` (views of one buffer count once)."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.numel()}


def time_ordered(index: torch.Tensor, keep_mask: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort chosen slots into time order; unused columns go to the end.

    index, keep_mask: (batch, kv_heads, K). Returns (index clamped to a real slot, mask), same shapes."""
    index, _ = torch.where(keep_mask, index, slots).sort(dim=-1)
    keep_mask = index < slots
    return index.clamp(max=max(slots - 1, 0)), keep_mask


def gather_slots(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(batch, heads, slots, *rest) gathered along slots by (batch, heads, K) -> (batch, heads, K, *rest)."""
    gather_idx = index.view(*index.shape, *([1] * (t.dim() - 3))).expand(*index.shape, *t.shape[3:])
    return torch.gather(t, 2, gather_idx)


class KVStorage(ABC):
    """What every K/V layout implements. Entries of a row are kept oldest first."""

    batch: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    aux_names: tuple[str, ...]

    @property
    @abstractmethod
    def lengths(self) -> torch.Tensor:
        """(batch, kv_heads) int64 entries held per row."""

    @property
    def entries(self) -> int:
        """Entries held over all rows."""
        return int(self.lengths.sum())

    @property
    def entry_nbytes(self) -> int:
        """Bytes of one kept entry: one K row and one V row."""
        return 2 * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()

    @property
    def kept_nbytes(self) -> int:
        """K/V bytes of the entries kept: entries x entry size."""
        return self.entries * self.entry_nbytes

    def seq_nbytes(self) -> torch.Tensor:
        """(batch,) K/V bytes kept for each sequence."""
        return self.lengths.cpu().sum(1) * self.entry_nbytes

    # Whether `seal` wants to know how much each entry matters (mixed precision).
    wants_importance: bool = False

    def seal(self, importance: Callable[[], torch.Tensor] | None = None, prompt: bool = False) -> None:
        """The chunk just appended has been attended and compressed: a layout that holds entries
        in another form (quantized) converts them now; `prompt`: it was a prompt's, judged by its
        policy, so a quantized layout keeps no recent tail of it (see `QuantSpec`). `importance`,
        where `wants_importance`: (batch, kv_heads, slots) how much each entry `view()` shows
        matters. Nothing to do for full-precision layouts."""

    @abstractmethod
    def buffers(self) -> dict[int, int]:
        """The memory standing for K/V: {address of each buffer held: its bytes}. Storages that
        share buffers (forks, derived caches) name them alike, so a union counts them once."""

    @property
    def allocated_nbytes(self) -> int:
        """K/V bytes allocated, spare capacity included, read from the tensors held."""
        return sum(self.buffers().values())

    @property
    @abstractmethod
    def meta_nbytes(self) -> int:
        """Bytes held beside K/V: positions, lengths, policy state."""

    def expect(self, count: int, layers: int) -> None:
        """`layers` layers like this one are about to append up to `count` entries to every row
        (a prompt chunk): a layout whose memory is shared and grows may get it all at once
        instead of growing layer by layer. Nothing to do for the others."""

    @abstractmethod
    def append(
        self,
        keys: torch.Tensor,  # (batch, kv_heads, T, head_dim)
        values: torch.Tensor,  # (batch, kv_heads, T, head_dim)
        positions: torch.Tensor,  # (T,) logical index of each new token
        valid: torch.Tensor,  # (batch, T) bool; padding tokens are not stored
        exact: bool = False,  # grow to exactly what is needed (a compaction follows at once)
    ) -> None: ...

    @abstractmethod
    def attend(
        self,
        query: torch.Tensor,  # (batch, q_heads, T, head_dim): the chunk just appended
        positions: torch.Tensor,  # (T,)
        valid: torch.Tensor,  # (batch, T) bool
        scaling: float,
        accumulate: str | None = None,
    ) -> torch.Tensor:  # (batch, q_heads, T, head_dim); rows of padding queries are zero
        """With `accumulate`, also do what `accumulate_attention(accumulate, ...)` does, reusing
        the attention computed here where the layout can."""

    @abstractmethod
    def accumulate_attention(
        self,
        name: str,
        query: torch.Tensor,  # (batch, q_heads, T, head_dim)
        positions: torch.Tensor,  # (T,)
        valid: torch.Tensor,  # (batch, T) bool
        scaling: float,
    ) -> None:
        """Add to aux[name] the softmax attention each held entry received from the valid
        queries, summed over queries and averaged over the query heads of its GQA group."""

    @abstractmethod
    def view(self) -> PaddedView:
        """Everything held as a PaddedView (a copy, or a view where the layout allows)."""

    def page_summaries(self, kind: str) -> tuple[int, list[torch.Tensor]] | None:
        """Where the layout keeps key summaries per block of its memory (`memory/summaries.py`):
        the entries per page (its blocks') and each summary tensor (`reading/pages.py`, `kind`)
        read through the rows' block tables, (batch, kv_heads, pages, head_dim), brought up to
        date with what the rows hold. None (the default): a reader summarizes `view()` itself."""
        return None

    def read_pages(
        self,
        pages: torch.Tensor,  # (batch, kv_heads, W) page indices, from `reading.chosen_pages`
        used: torch.Tensor,  # (batch, kv_heads, W) bool: columns read
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Only these pages, read where they lie (a layout with `page_summaries`): keys, values
        (batch, kv_heads, W * page, head_dim), their slots and positions (batch, kv_heads,
        W * page) and which are read (False: unused columns, or past a row's last entry)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no page summaries; read it through view()")

    def decode_pages(
        self, query: torch.Tensor, pages: torch.Tensor, used: torch.Tensor, scaling: float
    ) -> torch.Tensor | None:
        """A decoding step's attention (batch, q_heads, 1, head_dim) over only the chosen pages by
        a kernel reading them where they lie; None (the default) where the layout has none on
        this device (then `read_pages` and the torch math)."""
        return None

    def add_aux_at(self, name: str, slots: torch.Tensor, delta: torch.Tensor) -> None:
        """Add (batch, kv_heads, K) `delta` to policy state `name` at (batch, kv_heads, K) slots
        (zero where nothing is to be added; a slot listed twice gets both)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no page summaries; add through add_aux()")

    @abstractmethod
    def keep(
        self,
        view: PaddedView,
        index: torch.Tensor,  # (batch, kv_heads, K) slots of `view` to keep
        keep_mask: torch.Tensor,  # (batch, kv_heads, K) bool, False for unused index columns
        reserve: int = 0,  # spare entries worth keeping allocated per row (more appends follow)
    ) -> None:
        """Replace what is held by the chosen slots of `view`, in time order within each row."""

    @abstractmethod
    def add_aux(self, name: str, view: PaddedView, delta: torch.Tensor) -> None:
        """Add (batch, kv_heads, slots) `delta` to policy state `name`, held and in `view` alike."""

    @abstractmethod
    def set_values(self, view: PaddedView, values: torch.Tensor, changed: torch.Tensor) -> None:
        """Overwrite the value of the entries where (batch, kv_heads, slots) `changed` is True by
        (batch, kv_heads, slots, head_dim) `values`, held and in `view` alike (merging policies).
        Copies first what is shared with another storage."""

    def set_entries(self, view: PaddedView, keys: torch.Tensor, values: torch.Tensor, changed: torch.Tensor) -> bool:
        """Like `set_values`, keys too (CacheBlend's refresh: an entry computed again in place);
        `view` is not updated. False where the layout cannot (the caller appends the new
        entries and drops the old ones instead)."""
        return False

    @abstractmethod
    def set_aux(self, name: str, view: PaddedView, values: torch.Tensor) -> None:
        """Replace policy state `name` by (batch, kv_heads, slots) `values`, held and in `view` alike."""

    @abstractmethod
    def export_aux(self) -> dict[str, object]:
        """A copy of the policy state, to import into another storage over the same entries."""

    @abstractmethod
    def import_aux(self, state: dict[str, object]) -> None: ...

    @abstractmethod
    def share(self, aux_names: tuple[str, ...]) -> KVStorage:
        """A storage over the same entries with fresh policy state; writing to either never
        changes the other (copy on write), so one recorded prefill can seed many policies."""

    @classmethod
    @abstractmethod
    def stack(cls, parts: list[KVStorage], shifts: list[int], take: bool = False) -> KVStorage:
        """One batched storage from the sequences of `parts` (each of any batch size), in order;
        part i's positions move right by shifts[i] (the left padding it would have had in a
        batch). With `take` the parts are consumed (never used again): what they own becomes the
        result's, so nothing is copied on the next write."""

    @abstractmethod
    def select(self, sequences: list[int]) -> KVStorage:
        """A storage holding only these sequences, in this order (this one is consumed): a
        sequence leaves a running batch without touching the others."""
