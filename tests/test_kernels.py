"""The Triton decoding kernels against the torch reference: compiled on a GPU, under Triton's
interpreter on the CPU. Skipped only where Triton cannot be imported (`make test` installs it)."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")  # conftest sets TRITON_INTERPRET=1 where there is no GPU

from kvforge.reading.kernels.decode import decode_attention  # noqa: E402
from kvforge.reading.rows import DenseRows, PagedRows, QuantRows  # noqa: E402
from kvforge.storage.codec import QuantSpec, dequantize_keys, dequantize_values, quantize_keys, quantize_values  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Triton's interpreter computes bfloat16 wrongly (numpy has no bfloat16): it is checked compiled only.
HALF = [torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def reference(query: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], kv_heads: int, scaling: float) -> torch.Tensor:
    """query (batch, q_heads, dim); keys/values: per row b * kv_heads + h, (n_r, dim) -> (batch, q_heads, dim)."""
    batch, q_heads, dim = query.shape
    group = q_heads // kv_heads
    out = torch.zeros(batch, q_heads, dim, dtype=torch.float32, device=query.device)
    for r, (k, v) in enumerate(zip(keys, values)):
        if k.shape[0] == 0:
            continue
        b, h = divmod(r, kv_heads)
        q = query[b, h * group : (h + 1) * group].float()
        out[b, h * group : (h + 1) * group] = torch.softmax(q @ k.float().T * scaling, -1) @ v.float()
    return out


def dense_rows(keys: list[torch.Tensor], values: list[torch.Tensor]) -> DenseRows:
    def addresses(ts: list[torch.Tensor]) -> torch.Tensor:
        return torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=DEVICE)

    lengths = [k.shape[0] for k in keys]
    return DenseRows(addresses(keys), addresses(values), torch.tensor(lengths, dtype=torch.int32, device=DEVICE), keys[0], max(lengths))


CASES = [  # (batch, kv_heads, group, head_dim, row lengths)
    (2, 2, 1, 64, [0, 1, 37, 130]),
    (1, 3, 3, 64, [5, 64, 65]),
    (2, 1, 8, 128, [200, 1]),
]


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("batch, kv_heads, group, dim, lengths", CASES)
def test_paged_rows_match_the_reference(batch, kv_heads, group, dim, lengths, splits, dtype):
    block_size = 16
    gen = torch.Generator().manual_seed(len(lengths) * dim + group + 1)
    counts = [-(-n // block_size) for n in lengths]
    store_k = torch.randn(sum(counts) + 5, block_size, dim, generator=gen).to(DEVICE, dtype)
    store_v = torch.randn(sum(counts) + 5, block_size, dim, generator=gen).to(DEVICE, dtype)
    # Each row's blocks scattered over the store, in no order: the kernel follows the tables.
    ids = torch.randperm(store_k.shape[0], generator=gen)[: sum(counts)].split(counts)
    width = max(counts)
    tables = torch.stack([torch.cat([b, b.new_zeros(width - len(b))]) for b in ids]).to(DEVICE)
    keys = [store_k[b].reshape(-1, dim)[:n] for b, n in zip(ids, lengths)]
    values = [store_v[b].reshape(-1, dim)[:n] for b, n in zip(ids, lengths)]
    query = torch.randn(batch, kv_heads * group, dim, generator=gen).to(DEVICE, dtype)
    rows = PagedRows(store_k, store_v, tables, torch.tensor(lengths, dtype=torch.int32, device=DEVICE), max(lengths))
    got = decode_attention(query, [rows], kv_heads, 0.125, splits=splits)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), reference(query, keys, values, kv_heads, 0.125), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("batch, kv_heads, group, dim, lengths", CASES)
def test_dense_rows_match_the_reference(batch, kv_heads, group, dim, lengths, splits, dtype):
    gen = torch.Generator().manual_seed(len(lengths) * dim + group)
    # Rows live in buffers with spare room after them (as the in-place layout's do).
    keys = [torch.randn(n + 7, dim, generator=gen).to(DEVICE, dtype)[:n] for n in lengths]
    values = [torch.randn(n + 7, dim, generator=gen).to(DEVICE, dtype)[:n] for n in lengths]
    query = torch.randn(batch, kv_heads * group, dim, generator=gen).to(DEVICE, dtype)
    got = decode_attention(query, [dense_rows(keys, values)], kv_heads, 0.125, splits=splits)
    want = reference(query, keys, values, kv_heads, 0.125)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert got.dtype == dtype and got.shape == query.shape
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def quant_rows(keys: list[torch.Tensor], values: list[torch.Tensor], spec: QuantSpec, drop: int) -> tuple[QuantRows, list, list]:
    """Quantize each row (a multiple of spec.group entries) in key groups, then drop every
    `drop`-th entry (eviction inside groups: a group's scale stays for the entries left).
    Returns the rows and the dequantized keys and values the kernel must see."""
    kc, vc, vm, km, eg, lengths, seen_k, seen_v = [], [], [], [], [], [], [], []
    groups = 0
    for k, v in zip(keys, values):
        n, dim = k.shape
        codes, meta = quantize_keys(k.view(n // spec.group, spec.group, dim), spec)  # (ng, G, cb), (ng, fields, dim)
        vcodes, vmeta = quantize_values(v, spec)
        deq_k = dequantize_keys(codes, meta, spec).view(n, dim)
        deq_v = dequantize_values(vcodes, vmeta, spec)
        keep = torch.tensor([i % drop != drop - 1 for i in range(n)], dtype=torch.bool) if drop else torch.ones(n, dtype=torch.bool)
        group_of = torch.arange(n) // spec.group + groups
        kc.append(codes.reshape(n, spec.code_bytes(dim))[keep])
        vc.append(vcodes[keep])
        vm.append(vmeta[keep])
        km.append(meta)
        eg.append(group_of[keep])
        lengths.append(int(keep.sum()))
        seen_k.append(deq_k[keep])
        seen_v.append(deq_v[keep])
        groups += n // spec.group
    lens = torch.tensor(lengths)
    rows = QuantRows(
        spec.bits, spec.code_bytes(dim), spec.meta_fields, spec.group, not spec.asymmetric, torch.cat(kc).to(DEVICE), torch.cat(vc).to(DEVICE), torch.cat(vm).to(DEVICE), torch.cat(km).to(DEVICE),
        torch.cat(eg).to(DEVICE, torch.int32), (torch.cumsum(lens, 0) - lens).to(DEVICE), lens.to(DEVICE, torch.int32),
        max(lengths),
    )  # fmt: skip
    return rows, seen_k, seen_v


@pytest.mark.parametrize("drop", [0, 3])
@pytest.mark.parametrize("mode", ["int8", "int4", "int2", "fp8"])
@pytest.mark.parametrize("group, dim", [(1, 64), (3, 64), (8, 128)])
def test_quantized_rows_match_the_dequantized_reference(mode, group, dim, drop):
    spec = QuantSpec(mode, group=16)
    kv_heads, batch = 2, 2
    gen = torch.Generator().manual_seed(dim + group)
    lengths = [0, 16, 48, 80]  # whole key groups per row (the quantized parts hold whole groups)
    keys = [torch.randn(n, dim, generator=gen) * torch.linspace(0.2, 3, dim) for n in lengths]  # channels of unequal range
    values = [torch.randn(n, dim, generator=gen) for n in lengths]
    rows, seen_k, seen_v = quant_rows(keys, values, spec, drop)
    query = torch.randn(batch, kv_heads * group, dim, generator=gen).to(DEVICE)
    got = decode_attention(query, [rows], kv_heads, dim**-0.5, splits=2)
    want = reference(query, [k.to(DEVICE) for k in seen_k], [v.to(DEVICE) for v in seen_v], kv_heads, dim**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sources_share_one_softmax():
    """A quantized part and a full-precision tail of the same rows: one softmax over both."""
    spec = QuantSpec("int4", group=16)
    gen = torch.Generator().manual_seed(5)
    dim, kv_heads, group = 64, 2, 3
    old = [torch.randn(32, dim, generator=gen) for _ in range(kv_heads)]
    old_v = [torch.randn(32, dim, generator=gen) for _ in range(kv_heads)]
    tail = [torch.randn(n, dim, generator=gen).to(DEVICE) for n in (1, 20)]  # a residual across a group boundary
    tail_v = [torch.randn(n, dim, generator=gen).to(DEVICE) for n in (1, 20)]
    rows, seen_k, seen_v = quant_rows(old, old_v, spec, 0)
    query = torch.randn(1, kv_heads * group, dim, generator=gen).to(DEVICE)
    got = decode_attention(query, [rows, dense_rows(tail, tail_v)], kv_heads, 0.125)
    keys = [torch.cat([a.to(DEVICE), b]) for a, b in zip(seen_k, tail)]
    vals = [torch.cat([a.to(DEVICE), b]) for a, b in zip(seen_v, tail_v)]
    torch.testing.assert_close(got, reference(query, keys, vals, kv_heads, 0.125), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant", [None, "int8", "int4", "int2", "fp8", "mixed", "paged"])
@pytest.mark.parametrize("policy", ["full", "knorm", "adakv:snapkv"])
def test_decoding_through_the_kernels_predicts_what_the_torch_path_does(tiny_model, monkeypatch, policy, quant):
    """The whole decoding path of a model: the storages hand their rows to the kernel."""
    from conftest import left_padded
    from test_policy_matrix import decode, prefill_logits

    from kvforge import make_policy
    from kvforge.reading.kernels import calls
    from kvforge.storage.codec import QuantSpec

    layout = "paged" if quant == "paged" else "inplace"  # "paged": full precision, rows in blocks
    spec = QuantSpec(quant, group=8, residual=4) if quant not in (None, "paged") else None
    ids, mask = left_padded([24, 17])
    results = []
    for flag in ("0", "1"):
        monkeypatch.setenv("KVFORGE_KERNELS", flag)
        made = make_policy(policy) if policy == "full" else make_policy(policy, ratio=0.5)
        with torch.inference_mode():
            cache, logits = prefill_logits(tiny_model, made, ids, mask, layout, quant=spec)
            before = calls["decode"]
            results.append([logits, *decode(tiny_model, cache, logits, ids.shape[1], 4)])
            assert calls["decode"] - before == (4 * 2 if flag == "1" else 0)  # 4 steps x 2 layers, or none
    for torch_path, kernel_path in zip(*results):
        torch.testing.assert_close(kernel_path, torch_path, rtol=1e-4, atol=1e-4)


def test_attention_bench_rows_report_real_bytes_and_both_paths(monkeypatch):
    from kvforge.eval.attention_bench import format_attention_table, run_attention_bench

    monkeypatch.setenv("KVFORGE_KERNELS", "1")  # the kernel path too (interpreted on a CPU)
    specs = [QuantSpec("none"), QuantSpec("int4", residual=16)]
    rows = run_attention_bench("default", [96], [2], specs, torch.float32, DEVICE, steps=1, ratios=(0.0, 0.5))
    by = {(r.layout, r.path, r.ratio): r for r in rows}
    kvforge = {(f"kvforge {q}", p, ratio) for q in ("none", "int4") for p in ("torch", "triton") for ratio in (0.0, 0.5)}
    assert set(by) == {("sdpa", "torch", 0.0)} | kvforge
    dense = 2 * 2 * 3 * 96 * 64 * 4  # K and V, batch 2, 3 KV heads, 96 tokens, head_dim 64, float32
    assert by[("sdpa", "torch", 0.0)].held_bytes == dense == by[("kvforge none", "triton", 0.0)].held_bytes
    assert by[("kvforge int4", "torch", 0.0)].held_bytes < dense / 2  # 64 of 96 tokens in int4 (two key groups), 32 in full
    # Half the tokens evicted: half the entries kept, spare capacity at most a quarter of them.
    assert dense / 2 <= by[("kvforge none", "triton", 0.5)].held_bytes <= dense / 2 * 1.25
    assert by[("kvforge int4", "torch", 0.5)].held_bytes < by[("kvforge int4", "torch", 0.0)].held_bytes
    assert all(r.ms_per_step > 0 and r.bound_ms > 0 for r in rows)
    assert "| default | 96 | 2 | kvforge int4 | triton | 0.5 |" in format_attention_table(rows)



def test_attention_bench_paged_rows_hold_exact_blocks_on_both_paths(monkeypatch):
    from kvforge.eval.attention_bench import run_attention_bench

    monkeypatch.setenv("KVFORGE_KERNELS", "1")
    rows = run_attention_bench("default", [96], [2], [QuantSpec("none")], torch.float32, DEVICE, steps=1, ratios=(0.0,), paged=True)
    paged = {r.path: r for r in rows if r.layout == "kvforge paged"}
    assert set(paged) == {"torch", "triton"}
    dense = 2 * 2 * 3 * 96 * 64 * 4  # 96 tokens: three whole blocks of 32 per row, nothing spare
    assert all(r.held_bytes == dense and r.ms_per_step > 0 for r in paged.values())


AOT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kvforge.reading.kernels.decode as kd

target = GPUTarget("cuda", 90, 32)  # Hopper (H100, H200): compiled ahead of time, no GPU needed
state = {"m_out": "*fp32", "l_out": "*fp32", "acc_out": "*fp32", "split": "i32", "splits_total": "i32", "first_split": "i32"}
common = {"G": 4, "GP": 16, "D": 128, "BLOCK": kd.BLOCK}
for dtype in ("bf16", "fp32"):  # fp16 takes bf16's path; fp32 the exact (IEEE) dot products
    signature = {"q_ptr": "*" + dtype, "k_rows": "*i64", "v_rows": "*i64", "like": "*" + dtype, "lengths": "*i32", **state,
                 **{name: "constexpr" for name in ("G", "GP", "D", "BLOCK", "IEEE")}}
    triton.compile(ASTSource(kd._dense_kernel, signature, {**common, "IEEE": dtype == "fp32"}), target=target)
    signature = {"q_ptr": "*" + dtype, "keys": "*" + dtype, "values": "*" + dtype, "tables": "*i64", "lengths": "*i32", **state,
                 "width": "i32", "block_stride": "i64", **{name: "constexpr" for name in ("G", "GP", "D", "BLOCK", "BS", "IEEE")}}
    triton.compile(ASTSource(kd._paged_kernel, signature, {**common, "BS": 32, "IEEE": dtype == "fp32"}), target=target)
    for bits, fp8 in ((8, False), (4, False), (2, False), (8, True)) if dtype == "bf16" else ((4, False),):
        signature = {"q_ptr": "*" + dtype, "kc": "*u8", "vc": "*u8", "vm": "*fp16", "km": "*fp16", "entry_group": "*i32",
                     "starts": "*i64", "lengths": "*i32", "lut": "*fp32", **state,
                     **{name: "constexpr" for name in ("G", "GP", "D", "BLOCK", "IEEE", "BITS", "CB", "FIELDS", "VG", "FP8")}}
        constants = {**common, "IEEE": dtype == "fp32", "BITS": bits, "CB": 128 * bits // 8, "FIELDS": 1 if fp8 else 2, "VG": 32, "FP8": fp8}
        triton.compile(ASTSource(kd._quant_kernel, signature, constants), target=target)

import kvforge.reading.kernels.received as kr

# The received-attention kernel's two passes: half inputs (tl.dot's default precision) and
# float32 (IEEE), short and long query blocks, head_dim 64 and 128, GQA groups 1, 3 and 8.
rows = {"q_ptr": None, "k_rows": "*i64", "p_rows": "*i64", "like": None, "lengths": "*i32", "q_positions": "*i32"}
for dtype, block_t, dim, group in (("bf16", kr.BLOCK_T, 128, 8), ("fp16", kr.SHORT_T, 64, 3), ("fp32", kr.SHORT_T, 128, 1)):
    constants = {"G": group, "D": dim, "BLOCK_T": block_t, "BLOCK_L": kr.BLOCK_L, "IEEE": dtype == "fp32"}
    fixed = {**rows, "q_ptr": "*" + dtype, "like": "*" + dtype}
    names = {name: "constexpr" for name in constants}
    signature = {**fixed, "lse_out": "*fp32", "T": "i32", "scale": "fp32", **names}
    triton.compile(ASTSource(kr._lse_kernel, signature, constants), target=target)
    signature = {**fixed, "weight": "*fp32", "lse": "*fp32", "out": "*fp32", "T": "i32", "width": "i32", "kv_heads": "i32", "scale": "fp32", **names}
    triton.compile(ASTSource(kr._sum_kernel, signature, constants), target=target)
print("compiled")
"""


def test_the_kernels_compile_for_a_hopper_gpu():
    """The interpreter does not check what only the compiler does (types, tl.dot shapes): compile
    every variant for sm_90 ahead of time, which needs no GPU."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", AOT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-2000:]
