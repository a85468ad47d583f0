"""The attention each held entry received, in Triton: softmax probabilities summed over a chunk's
weighted queries and averaged over each GQA group (H2O's accumulated attention, SnapKV's
observation window), without materialising the (queries x entries) probability matrix.

`kvforge.attention.attention_probs_sum` is the reference (and the CPU path). It writes the
logits of `chunk` queries against every key to memory and passes over them several times:
traffic of T x L x q_heads floats, several times over, which at long contexts dominates a
prefill. Here the probabilities live in registers only, in two passes over rows
r = b * kv_heads + h (a sequence's KV head):

- pass 1, program (query block, r * G + g): one query head g of the row's GQA group (G heads),
  BLOCK_T of its queries against every key of the row, BLOCK_L at a time, as an online softmax
  (running maximum m and normaliser l). It writes each query's log-sum-exp, lse = m + log(l).
- pass 2, program (key block, r): BLOCK_L keys of the row, held in registers, against every query
  head of the group and every query block: p = exp(q . k * scale - lse) * weight, summed over the
  queries, divided by G. Each program owns its keys' sums, so nothing is accumulated atomically.

Masking is positional, as in every caller: query t may read key l iff l is one of the row's
`lengths[r]` entries and position[l] <= query_position[t]. A block pair is skipped when the
smallest position among the key block exceeds the largest among the query block: no query there
may read any key there. That costs one comparison, is exact for any order, and with time-ordered
keys and ascending queries (a prefill) skips about half of the work; correctness does not depend
on the order.

A query that may read no key contributes nothing (lse is +inf). The reference lets such a query
read everything instead (to keep its softmax finite); the two agree because in every caller such
a query is a padding query, of weight 0: a real query reads at least its own key, which the
storage holds before the chunk's attention is observed.

Keys and positions are read where the storage holds them (`rows.KeyRows`: an address per row),
so an in-place layout needs no padded copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvforge.reading.kernels import calls
from kvforge.reading.rows import KeyRows

BLOCK_L = 64  # keys per block (both passes)
BLOCK_T = 64  # queries per block; a short chunk (a decoding step, a small window) takes SHORT_T
SHORT_T = 16  # tl.dot multiplies at least 16 rows
NEVER = 2**31 - 1  # the position of a key no query may read (int32 max: above every query's)
_NEVER = tl.constexpr(NEVER)
_NO_QUERY = tl.constexpr(-(2**31))  # the position of a query past T (below every key's)


@triton.jit
def _key_positions(p_base, n, off, BLOCK_L: tl.constexpr):
    """Slots off .. off + BLOCK_L of a row and their (BLOCK_L,) int32 positions (NEVER past its end)."""
    slot = off + tl.arange(0, BLOCK_L)
    return slot, tl.load(p_base + slot, mask=slot < n, other=_NEVER)


@triton.jit
def _keys(k_base, slot, n, d, D: tl.constexpr):
    """(BLOCK_L, D) keys at `slot` of a row, in the row's type (zeros past its end)."""
    return tl.load(k_base + slot.to(tl.int64)[:, None] * D + d[None, :], mask=(slot < n)[:, None], other=0.0)


@triton.jit
def _logits(q, q_pos, k, k_pos, scale, IEEE: tl.constexpr):
    """(BLOCK_T, BLOCK_L) float32 scaled logits of queries q (BLOCK_T, D) against keys k
    (BLOCK_L, D), -inf where the query may not read the key."""
    k = k.to(q.dtype)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return tl.where(k_pos[None, :] <= q_pos[:, None], s * scale, float("-inf"))


@triton.jit
def _query_positions(q_positions, start, T, BLOCK_T: tl.constexpr):
    """Indices t of queries start .. start + BLOCK_T and their (BLOCK_T,) positions (NO_QUERY past T)."""
    t = start + tl.arange(0, BLOCK_T)
    return t, tl.load(q_positions + t, mask=t < T, other=_NO_QUERY)


@triton.jit
def _queries(q_ptr, head, t, T, d, D: tl.constexpr):
    """(BLOCK_T, D) queries t of one query head (zeros past T)."""
    return tl.load(q_ptr + (head * T + t[:, None]) * D + d[None, :], mask=(t < T)[:, None], other=0.0)


@triton.jit
def _row(k_rows, p_rows, like, r):
    """Where row r's keys and positions start."""
    return tl.load(k_rows + r).to(like.dtype), tl.load(p_rows + r).to(tl.pointer_type(tl.int32))


@triton.jit
def _lse_kernel(
    q_ptr, k_rows, p_rows, like, lengths, q_positions, lse_out, T, scale,
    G: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(1).to(tl.int64)  # r * G + g: the query head's index in q, (rows * G, T, D)
    r = head // G
    n = tl.load(lengths + r)
    d = tl.arange(0, D)
    t, q_pos = _query_positions(q_positions, tl.program_id(0) * BLOCK_T, T, BLOCK_T)
    q = _queries(q_ptr, head, t, T, d, D)
    last = tl.max(q_pos, 0)
    k_base, p_base = _row(k_rows, p_rows, like, r)
    # Running maximum (finite before any key, so exp(m - m_new) is 1, never NaN) and normaliser.
    m = tl.full((BLOCK_T,), -1.0e30, tl.float32)
    l = tl.zeros((BLOCK_T,), tl.float32)
    for off in range(0, n, BLOCK_L):
        slot, k_pos = _key_positions(p_base, n, off, BLOCK_L)
        if tl.min(k_pos, 0) <= last:  # else no query of the block may read a key of this one
            s = _logits(q, q_pos, _keys(k_base, slot, n, d, D), k_pos, scale, IEEE)
            m_new = tl.maximum(m, tl.max(s, 1))
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m = m_new
    # +inf for a query that reads nothing: pass 2 then gives it probability 0 everywhere.
    lse = tl.where(l > 0, m + tl.log(tl.maximum(l, 1.0e-30)), float("inf"))
    tl.store(lse_out + head * T + t, lse, mask=t < T)


@triton.jit
def _sum_kernel(
    q_ptr, k_rows, p_rows, like, lengths, q_positions, weight, lse, out, T, width, kv_heads, scale,
    G: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(1).to(tl.int64)
    off = tl.program_id(0) * BLOCK_L
    n = tl.load(lengths + r)
    b = r // kv_heads
    d = tl.arange(0, D)
    k_base, p_base = _row(k_rows, p_rows, like, r)
    # This program's keys stay in registers while every query of the group passes them.
    slot, k_pos = _key_positions(p_base, n, off, BLOCK_L)
    k = _keys(k_base, slot, n, d, D)
    first = tl.min(k_pos, 0)  # NEVER for a block past the row's end: every query block is skipped
    acc = tl.zeros((BLOCK_L,), tl.float32)
    for g in range(G):
        head = r * G + g
        for start in range(0, T, BLOCK_T):
            t, q_pos = _query_positions(q_positions, start, T, BLOCK_T)
            if first <= tl.max(q_pos, 0):  # else no query of the block may read a key of this one
                q = _queries(q_ptr, head, t, T, d, D)
                s = _logits(q, q_pos, k, k_pos, scale, IEEE)
                z = tl.load(lse + head * T + t, mask=t < T, other=float("inf"))
                w = tl.load(weight + b * T + t, mask=t < T, other=0.0)
                # s - z is -inf where masked (s) or where the query reads nothing (z): exp gives 0.
                acc += tl.sum(tl.exp(s - z[:, None]) * w[:, None], 0)
    tl.store(out + r * width + slot, acc / G, mask=slot < width)


def received_rows(
    query: torch.Tensor,  # (batch, q_heads, T, head_dim)
    rows: KeyRows,  # rows = batch * kv_heads, row b * kv_heads + h
    query_positions: torch.Tensor,  # (T,) logical position of each query
    query_weight: torch.Tensor,  # (batch, T) float, 0 for queries that must not count
    kv_heads: int,
    scaling: float,
) -> torch.Tensor:  # (rows, rows.longest) float32; 0 past each row's length
    """Softmax attention each key of `rows` received from the weighted queries, causal by
    position, averaged over each GQA group."""
    calls["received"] += 1  # every launch goes through here, from the in-place, quantized and padded paths
    batch, q_heads, t, dim = query.shape
    n_rows, group = batch * kv_heads, q_heads // kv_heads
    assert rows.keys.is_contiguous() and rows.positions.is_contiguous() and rows.lengths.is_contiguous()
    out = torch.zeros(n_rows, rows.longest, dtype=torch.float32, device=query.device)
    if t == 0 or rows.longest == 0 or n_rows == 0:
        return out
    # Queries in the keys' type where that is wider (the kernel reads keys in the queries' type).
    dtype = torch.promote_types(query.dtype, rows.like.dtype)
    q = query.to(dtype).contiguous()  # (batch, q_heads, T, dim) == (rows * group, T, dim)
    q_pos = query_positions.to(device=query.device, dtype=torch.int32).contiguous()
    w = query_weight.to(device=query.device, dtype=torch.float32).contiguous()  # (batch, T)
    lse = torch.empty(n_rows * group, t, dtype=torch.float32, device=query.device)
    block_t = BLOCK_T if t > SHORT_T else SHORT_T
    common = dict(G=group, D=dim, BLOCK_T=block_t, BLOCK_L=BLOCK_L, IEEE=dtype == torch.float32)
    _lse_kernel[(triton.cdiv(t, block_t), n_rows * group)](
        q, rows.keys, rows.positions, rows.like, rows.lengths, q_pos, lse, t, scaling, **common
    )
    _sum_kernel[(triton.cdiv(rows.longest, BLOCK_L), n_rows)](
        q, rows.keys, rows.positions, rows.like, rows.lengths, q_pos, w, lse, out, t, rows.longest, kv_heads, scaling, **common
    )  # fmt: skip
    return out


def padded_rows(
    keys: torch.Tensor,  # (batch, kv_heads, L, head_dim)
    key_positions: torch.Tensor,  # (batch, kv_heads | 1, L)
    key_valid: torch.Tensor,  # (batch, kv_heads | 1, L) bool
) -> tuple[KeyRows, torch.Tensor]:  # and the (rows, L) int32 positions the rows point into (keep it alive)
    """A padded (batch, kv_heads, L) picture as rows of L entries each; an invalid slot's
    position is NEVER, so no query reads it."""
    batch, kv_heads, length, dim = keys.shape
    if keys.stride(-1) != 1 or keys.stride(2) != dim:
        keys = keys.contiguous()
    positions = torch.where(key_valid, key_positions, NEVER).to(torch.int32)
    positions = positions.expand(batch, kv_heads, length).reshape(batch * kv_heads, length).contiguous()
    b = torch.arange(batch, device=keys.device)[:, None]
    h = torch.arange(kv_heads, device=keys.device)[None, :]
    key_at = keys.data_ptr() + (b * keys.stride(0) + h * keys.stride(1)).flatten() * keys.element_size()
    pos_at = positions.data_ptr() + torch.arange(batch * kv_heads, device=keys.device) * length * positions.element_size()
    lengths = torch.full((batch * kv_heads,), length, dtype=torch.int32, device=keys.device)
    return KeyRows(key_at, pos_at, lengths, keys, length), positions


def received_padded(
    query: torch.Tensor,  # (batch, q_heads, T, head_dim)
    keys: torch.Tensor,  # (batch, kv_heads, L, head_dim)
    key_positions: torch.Tensor,  # (batch, kv_heads | 1, L) logical position of each key
    key_valid: torch.Tensor,  # (batch, kv_heads | 1, L) bool, False on padding slots
    query_positions: torch.Tensor,  # (T,)
    query_weight: torch.Tensor,  # (batch, T) float, 0 for queries that must not count
    scaling: float,
) -> torch.Tensor:  # (batch, kv_heads, L) float32
    """`attention_probs_sum(query, keys, causal_allowed(key_positions, key_valid,
    query_positions), query_weight, scaling)` over padded tensors, in Triton."""
    batch, kv_heads, length = keys.shape[:3]
    rows, _positions = padded_rows(keys, key_positions, key_valid)  # _positions: read by the kernel
    out = received_rows(query, rows, query_positions, query_weight, kv_heads, scaling)
    return out.view(batch, kv_heads, length)
