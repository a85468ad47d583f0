"""What the kernels read: a layout's rows described by addresses, offsets and lengths.

Rows are (sequence, KV head) pairs, row b * kv_heads + h. Building these reads no K/V: it only
collects where each row starts and how long it is, so the kernels read the layout in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch



@dataclass
class DenseRows:
    """Full-precision rows, each `lengths[r]` entries of head_dim elements, one after the other."""

    keys: torch.Tensor  # (rows,) int64 address of each row's first key
    values: torch.Tensor  # (rows,) int64 address of each row's first value
    lengths: torch.Tensor  # (rows,) int32
    like: torch.Tensor  # any tensor of the K/V dtype: tells the kernel the element type
    longest: int  # an upper bound of lengths, known on the host: sizes the grid


@dataclass
class QuantRows:
    """One bit width of a quantized layout (`storage.qpart.Part`), flat ragged rows. The codec is
    described by what the kernel needs of it, so reading never imports storage."""

    bits: int  # code width (never `mixed`: one part per width)
    code_bytes: int  # bytes of one entry's packed codes, keys or values
    fields: int  # 2: scale and minimum (asymmetric integers); 1: scale only (fp8)
    group: int  # entries per key group, channels per value group
    fp8: bool  # codes are float8 e4m3 bytes, not integers
    kc: torch.Tensor  # (N, code_bytes) uint8 key codes
    vc: torch.Tensor  # (N, code_bytes) uint8 value codes
    vm: torch.Tensor  # (N, fields, head_dim / group) float16 value scale (and minimum) per channel group
    km: torch.Tensor  # (NG, fields, head_dim) float16 key scale (and minimum) per key group
    entry_group: torch.Tensor  # (N,) int32 the key group of each entry
    starts: torch.Tensor  # (rows,) int64 flat index of each row's first entry
    lengths: torch.Tensor  # (rows,) int32
    longest: int  # an upper bound of lengths, known on the host


@dataclass
class PagedRows:
    """Full-precision rows as block tables over one block store (the paged layout): entry i of
    row r sits in block tables[r, i // block_size], at offset i % block_size."""

    keys: torch.Tensor  # (num_blocks, block_size, head_dim) the store's keys; blocks stride(0) apart, entries contiguous
    values: torch.Tensor  # (num_blocks, block_size, head_dim), strided as the keys
    tables: torch.Tensor  # (rows, width) int64 block ids; past a row's blocks any id (never read)
    lengths: torch.Tensor  # (rows,) int32
    longest: int  # an upper bound of lengths, known on the host


Source = DenseRows | QuantRows | PagedRows


@dataclass
class KeyRows:
    """Full-precision keys and their logical positions, row by row: what the kernel of the
    attention each entry received reads (`kvforge.reading.kernels.received`)."""

    keys: torch.Tensor  # (rows,) int64 address of each row's first key; entries head_dim elements apart
    positions: torch.Tensor  # (rows,) int64 address of each row's first position (int32, one per entry)
    lengths: torch.Tensor  # (rows,) int32
    like: torch.Tensor  # any tensor of the keys' dtype
    longest: int  # an upper bound of lengths, known on the host: the width of the result


def dense_rows(keys: list[torch.Tensor], values: list[torch.Tensor], lengths: list[int], device: torch.device) -> DenseRows:
    """Rows held as one (capacity, head_dim) tensor each (the in-place layout; rows must be
    contiguous, which its buffers and slab views are)."""

    def addresses(rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.tensor([t.data_ptr() for t in rows], dtype=torch.int64).to(device, non_blocking=True)

    counts = torch.tensor(lengths, dtype=torch.int32).to(device, non_blocking=True)
    return DenseRows(addresses(keys), addresses(values), counts, keys[0], max(lengths, default=0))


def key_rows(keys: list[torch.Tensor], positions: list[torch.Tensor], lengths: list[int], device: torch.device) -> KeyRows:
    """Rows held as one (capacity, head_dim) key tensor and one (capacity,) int32 position tensor
    each (the in-place layout; rows must be contiguous)."""
    assert all(p.dtype == torch.int32 for p in positions)
    addresses = torch.tensor([[t.data_ptr() for t in keys], [p.data_ptr() for p in positions]], dtype=torch.int64)
    key_at, pos_at = addresses.to(device, non_blocking=True)  # one copy; each (rows,) contiguous
    counts = torch.tensor(lengths, dtype=torch.int32).to(device, non_blocking=True)
    return KeyRows(key_at, pos_at, counts, keys[0], max(lengths, default=0))


def decode(query: torch.Tensor, sources: list[Source], kv_heads: int, scaling: float) -> torch.Tensor:
    """(batch, q_heads, head_dim) one query per sequence -> its attention over `sources` (Triton)."""
    from kvforge.reading.kernels import calls
    from kvforge.reading.kernels.decode import decode_attention  # imports Triton: only when a kernel runs

    calls["decode"] += 1
    return decode_attention(query, sources, kv_heads, scaling)


def received(
    query: torch.Tensor,  # (batch, q_heads, T, head_dim)
    rows: KeyRows,
    query_positions: torch.Tensor,  # (T,)
    query_weight: torch.Tensor,  # (batch, T) float, 0 for queries that must not count
    kv_heads: int,
    scaling: float,
) -> torch.Tensor:  # (batch * kv_heads, rows.longest) float32
    """The softmax attention each entry of `rows` received from the weighted queries, causal by
    position, averaged over each GQA group (Triton; see `kvforge.reading.kernels.received`)."""
    from kvforge.reading.kernels.received import received_rows  # imports Triton: only when a kernel runs

    return received_rows(query, rows, query_positions, query_weight, kv_heads, scaling)
