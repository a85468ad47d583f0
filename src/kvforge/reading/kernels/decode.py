"""Flash-decoding in Triton: one query per sequence over ragged full-precision rows and over
packed quantized rows, split along the sequence so a batch of one still fills the GPU.

Program (row, split) reads up to `split` consecutive entries of one (sequence, KV head) row, BLOCK
at a time, for the G query heads of that KV head together (GQA: one read of K/V serves the
group). It leaves a partial softmax state: running maximum m, normaliser l and unnormalised
output acc. `combine` merges the states of every split of every source of a row (the quantized
parts and the full-precision tail share one softmax), so a layout held in several pieces needs
no concatenation.

Quantized rows are read in the packed layout of `kvforge.storage.codec` and dequantized in
registers: byte j of an entry's codes holds channels j, j + P, ... (P = code bytes), keys take the
per-channel scale (and minimum) of their key group (`entry_group` names it per entry), values
the per-token scale (and minimum) of their channel group. Nothing full-precision is written to
memory.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kvforge.reading.rows import DenseRows, PagedRows, Source

FP8 = torch.float8_e4m3fn  # the codes of `fp8` rows (the quantized layout's codec writes these)

BLOCK = 64  # entries per inner step
MIN_GROUP_ROWS = 16  # tl.dot multiplies at least 16 rows: a GQA group is padded to this
NEG = tl.constexpr(-1.0e30)  # the running maximum before any entry (finite: exp(NEG - NEG) is 1, not NaN)




@triton.jit
def _step(q, k, v, valid, m, l, acc, IEEE: tl.constexpr):
    """One block of the online softmax. q (GP, D), k and v (BLOCK, D) in q's dtype, valid (BLOCK,)."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l, acc * alpha[:, None] + pv


@triton.jit
def _span(lengths, split):
    """Program (r, s): row r, and the entries [start, stop) of its split s."""
    r = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * split
    return r, start, tl.minimum(start + split, tl.load(lengths + r))


@triton.jit
def _begin(q_ptr, r, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr):
    """Row r's G queries, padded to GP rows with zeros, and an empty softmax state (m, l, acc)."""
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (r * G + g[:, None]) * D + d[None, :], mask=(g < G)[:, None], other=0.0)
    return q, tl.full((GP,), NEG, tl.float32), tl.zeros((GP,), tl.float32), tl.zeros((GP, D), tl.float32)


@triton.jit
def _store(m_out, l_out, acc_out, out, m, l, acc, GP: tl.constexpr, D: tl.constexpr):
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    tl.store(m_out + out * GP + g, m)
    tl.store(l_out + out * GP + g, l)
    tl.store(acc_out + (out * GP + g[:, None]) * D + d[None, :], acc)


@triton.jit
def _dense_kernel(
    q_ptr, k_rows, v_rows, like, lengths, m_out, l_out, acc_out,
    split, splits_total, first_split,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    r, start, stop = _span(lengths, split)
    d = tl.arange(0, D)
    q, m, l, acc = _begin(q_ptr, r, G, GP, D)
    k_base = tl.load(k_rows + r).to(like.dtype)
    v_base = tl.load(v_rows + r).to(like.dtype)
    for off in range(start, stop, BLOCK):
        t = off + tl.arange(0, BLOCK)
        valid = t < stop
        at = t.to(tl.int64)[:, None] * D + d[None, :]
        k = tl.load(k_base + at, mask=valid[:, None], other=0.0).to(q.dtype)
        v = tl.load(v_base + at, mask=valid[:, None], other=0.0).to(q.dtype)
        m, l, acc = _step(q, k, v, valid, m, l, acc, IEEE)
    _store(m_out, l_out, acc_out, r * splits_total + first_split + tl.program_id(1), m, l, acc, GP, D)


@triton.jit
def _paged_kernel(
    q_ptr, keys, values, tables, lengths, m_out, l_out, acc_out,
    split, splits_total, first_split, width, block_stride,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, BS: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """`_dense_kernel` over block tables: each entry's address comes from its row's table (entry t
    in block tables[r, t // BS], at offset t % BS; blocks `block_stride` elements apart, entries D),
    so rows are read where their blocks lie."""
    r, start, stop = _span(lengths, split)
    d = tl.arange(0, D)
    q, m, l, acc = _begin(q_ptr, r, G, GP, D)
    for off in range(start, stop, BLOCK):
        t = off + tl.arange(0, BLOCK)
        valid = t < stop
        block = tl.load(tables + r * width + t // BS, mask=valid, other=0).to(tl.int64)
        at = (block * block_stride + (t % BS) * D)[:, None] + d[None, :]
        k = tl.load(keys + at, mask=valid[:, None], other=0.0).to(q.dtype)
        v = tl.load(values + at, mask=valid[:, None], other=0.0).to(q.dtype)
        m, l, acc = _step(q, k, v, valid, m, l, acc, IEEE)
    _store(m_out, l_out, acc_out, r * splits_total + first_split + tl.program_id(1), m, l, acc, GP, D)


@triton.jit
def _codes(ptr, t, valid, d, lut, CB: tl.constexpr, BITS: tl.constexpr, FP8: tl.constexpr):
    """(BLOCK, D) float32 code values of entries t: the packed byte of each channel, shifted."""
    byte = tl.load(ptr + t.to(tl.int64)[:, None] * CB + (d % CB)[None, :], mask=valid[:, None], other=0).to(tl.int32)
    if FP8:
        return tl.load(lut + byte)
    return ((byte >> ((d // CB) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _quant_kernel(
    q_ptr, kc, vc, vm, km, entry_group, starts, lengths, lut, m_out, l_out, acc_out,
    split, splits_total, first_split,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
    BITS: tl.constexpr, CB: tl.constexpr, FIELDS: tl.constexpr, VG: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    r, start, stop = _span(lengths, split)
    first = tl.load(starts + r)
    d = tl.arange(0, D)
    q, m, l, acc = _begin(q_ptr, r, G, GP, D)
    NV: tl.constexpr = D // VG
    for off in range(start, stop, BLOCK):
        local = off + tl.arange(0, BLOCK)
        valid = local < stop
        t = first + local
        # Keys: per channel, the scale (and minimum) of the entry's key group.
        grp = tl.load(entry_group + t, mask=valid, other=0).to(tl.int64)
        k_meta = km + (grp[:, None] * FIELDS) * D + d[None, :]
        k = _codes(kc, t, valid, d, lut, CB, BITS, FP8) * tl.load(k_meta, mask=valid[:, None], other=0.0).to(tl.float32)
        # Values: per token, the scale (and minimum) of the channel's group.
        v_meta = vm + (t.to(tl.int64)[:, None] * FIELDS) * NV + (d // VG)[None, :]
        v = _codes(vc, t, valid, d, lut, CB, BITS, FP8) * tl.load(v_meta, mask=valid[:, None], other=0.0).to(tl.float32)
        if FIELDS == 2:
            k += tl.load(k_meta + D, mask=valid[:, None], other=0.0).to(tl.float32)
            v += tl.load(v_meta + NV, mask=valid[:, None], other=0.0).to(tl.float32)
        m, l, acc = _step(q, k.to(q.dtype), v.to(q.dtype), valid, m, l, acc, IEEE)
    _store(m_out, l_out, acc_out, r * splits_total + first_split + tl.program_id(1), m, l, acc, GP, D)


@functools.cache
def _fp8_lut(device: torch.device) -> torch.Tensor:
    """(256,) float32 value of each e4m3 byte (NaN's byte reads 0; it is never written)."""
    return torch.nan_to_num(torch.arange(256, dtype=torch.uint8, device=device).view(FP8).float())


def group_rows(q_heads: int, kv_heads: int) -> int:
    """Rows a GQA group is padded to for tl.dot: a power of two, at least MIN_GROUP_ROWS."""
    return max(MIN_GROUP_ROWS, triton.next_power_of_2(q_heads // kv_heads))


def splits_for(rows: int, longest: int, device: torch.device) -> int:
    """Splits per row: enough programs to give every multiprocessor several (flash-decoding),
    never a split shorter than one BLOCK."""
    units = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(max(longest, 1), BLOCK), triton.cdiv(4 * units, rows)))


def decode_attention(
    query: torch.Tensor,  # (batch, q_heads, head_dim): one new query per sequence
    sources: list[Source],  # each over rows = batch * kv_heads, row b * kv_heads + h
    kv_heads: int,
    scaling: float,
    splits: int | None = None,  # per source; default: `splits_for`
) -> torch.Tensor:  # (batch, q_heads, head_dim) in query's dtype
    """Softmax attention of each query over every entry its KV head's row holds in `sources`
    (all entries are in the query's past: a decoding step appends before it attends)."""
    batch, q_heads, dim = query.shape
    rows, group = batch * kv_heads, q_heads // kv_heads
    gp = group_rows(q_heads, kv_heads)
    q = (query.float() * scaling).to(query.dtype).contiguous()  # (batch, q_heads, dim) == (rows, group, dim)
    per = [splits or splits_for(rows, s.longest, query.device) for s in sources]
    total = sum(per)
    m = torch.empty(rows, total, gp, dtype=torch.float32, device=query.device)
    l = torch.empty_like(m)
    acc = torch.empty(rows, total, gp, dim, dtype=torch.float32, device=query.device)
    ieee = query.dtype == torch.float32
    first = 0
    for source, n in zip(sources, per):
        split = triton.cdiv(triton.cdiv(max(source.longest, 1), n), BLOCK) * BLOCK
        common = dict(G=group, GP=gp, D=dim, BLOCK=BLOCK, IEEE=ieee)
        if isinstance(source, DenseRows):
            _dense_kernel[(rows, n)](
                q, source.keys, source.values, source.like, source.lengths, m, l, acc, split, total, first, **common
            )
        elif isinstance(source, PagedRows):
            _paged_kernel[(rows, n)](
                q, source.keys, source.values, source.tables, source.lengths, m, l, acc, split, total, first,
                source.tables.shape[1], source.keys.stride(0), **common, BS=source.keys.shape[1],
            )  # fmt: skip
        else:
            _quant_kernel[(rows, n)](
                q, source.kc, source.vc, source.vm, source.km, source.entry_group, source.starts, source.lengths,
                _fp8_lut(query.device), m, l, acc, split, total, first, **common,
                BITS=source.bits, CB=source.code_bytes, FIELDS=source.fields, VG=source.group, FP8=source.fp8,
            )  # fmt: skip
        first += n
    return combine(m, l, acc)[:, :group].reshape(batch, q_heads, dim).to(query.dtype)


def combine(
    m: torch.Tensor,  # (rows, splits, GP) running maxima
    l: torch.Tensor,  # (rows, splits, GP) normalisers
    acc: torch.Tensor,  # (rows, splits, GP, D) unnormalised outputs
) -> torch.Tensor:  # (rows, GP, D)
    """Merge partial softmax states: each split's weight is exp(its maximum - the overall one)."""
    weight = torch.exp(m - m.amax(1, keepdim=True))  # (rows, splits, GP)
    total = (l * weight).sum(1).clamp_min(torch.finfo(torch.float32).tiny)
    return (acc * weight[..., None]).sum(1) / total[..., None]
