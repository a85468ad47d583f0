"""The speed/memory benchmark on the tiny checkpoint: row shape, ratios to full, real measurements."""

from __future__ import annotations

import pytest

from kvforge.eval.baselines import BASELINES, DYNAMIC, Baseline, check_baselines
from kvforge.eval.bench import (
    BenchRow,
    batch_lengths,
    format_batch_table,
    format_table,
    ratios_to_full,
    run_batch_bench,
    run_bench,
)
from kvforge.models import load_model
from kvforge.policies.registry import make_policy

LENGTHS = [64, 128]
FP8 = BASELINES["fp8"].label


@pytest.fixture(scope="module")
def rows(tiny_checkpoint) -> list[BenchRow]:
    loaded = load_model(str(tiny_checkpoint))
    policies = [make_policy("full"), make_policy("snapkv", ratio=0.5, window=8)]
    baselines = check_baselines(["dynamic", "fp8"])
    return run_bench(loaded, LENGTHS, policies, decode_tokens=4, prefill_chunk=32, baselines=baselines)


def by_key(rows: list[dict[str, object]]) -> dict[tuple[object, object], dict[str, object]]:
    return {(r["length"], r["policy"]): r for r in rows if r["prefill_chunk"] is None}


def test_one_row_per_length_policy_and_chunking(rows):
    keys = [(r.length, r.policy, r.prefill_chunk) for r in rows]
    policies = [(DYNAMIC, None), (FP8, None), ("full", None), ("snapkv[window=8]", None), ("full", 32), ("snapkv[window=8]", 32)]
    assert sorted(keys, key=str) == sorted(((n, p, c) for n in LENGTHS for p, c in policies), key=str)
    # transformers' own caches, then the one-shot full cache, lead each length.
    assert [r.policy for r in rows if r.length == 64][:3] == [DYNAMIC, FP8, "full"]


def test_full_is_its_own_reference(rows):
    for (_, policy), d in by_key(ratios_to_full(rows)).items():
        if policy == "full":
            vs_full = {k: v for k, v in d.items() if k.endswith("_vs_full")}
            assert len(vs_full) == 5
            assert all(v == 1.0 for v in vs_full.values()), vs_full


def test_dynamic_cache_baseline_holds_the_same_bytes_as_full(rows):
    table = by_key(ratios_to_full(rows))
    for n in LENGTHS:
        assert table[(n, DYNAMIC)]["cache_bytes"] == table[(n, "full")]["cache_bytes"]
        assert table[(n, DYNAMIC)]["decode_tokens_per_s"] > 0
        assert table[(n, DYNAMIC)]["bits_per_element"] == 32.0  # float32 K/V


def test_quantized_cache_baseline_holds_its_codes(rows):
    # transformers' fp8 QuantizedCache: one byte per element plus a per-tensor scale, read from its tensors.
    for r in rows:
        if r.policy == FP8:
            assert r.quant == "fp8"
            assert 8.0 < r.bits_per_element < 8.1
            assert r.cache_bytes < 0.26 * r.dense_bytes
            assert r.decode_tokens_per_s > 0


def test_quanto_baseline_where_installed(tiny_checkpoint):
    pytest.importorskip("optimum.quanto")
    loaded = load_model(str(tiny_checkpoint))
    rows = run_bench(loaded, [160], [make_policy("full")], decode_tokens=2, baselines=check_baselines(["dynamic", "quanto-int4"]))
    dynamic, quanto = rows[0], rows[1]
    assert (quanto.policy, quanto.quant) == ("transformers QuantizedCache quanto", "int4")
    # 4-bit codes with per-group scales and shifts: more than 4 bits, far fewer than float32's 32.
    assert 4.0 < quanto.bits_per_element < 12.0
    assert quanto.cache_bytes < dynamic.cache_bytes / 2


def test_unknown_or_missing_baselines_are_refused():
    with pytest.raises(ValueError, match="unknown baseline 'paged'; known: dynamic, quanto-int4"):
        check_baselines(["paged"])
    missing = {"other-int4": Baseline("transformers QuantizedCache other", "int4", "other", "kvforge_no_such_backend", 4)}
    with pytest.raises(ValueError, match="needs the package 'kvforge_no_such_backend'.*pip install kvforge_no_such_backend"):
        check_baselines(["other-int4"], missing)


def test_chunked_rows_never_hold_more_than_budget_plus_a_chunk(rows):
    entry = 2 * 16 * 4 * 2 * 2  # K+V rows of head_dim 16, float32, 2 KV heads, 2 layers
    for r in rows:
        if r.policy == "snapkv[window=8]" and r.prefill_chunk == 32:
            kept_tokens = r.kept_bytes // entry
            assert kept_tokens == r.length // 2  # the ratio holds at the end
            assert r.peak_cache_bytes <= (kept_tokens + 32) * entry
            assert r.kept_bytes <= r.cache_bytes <= 1.25 * r.kept_bytes  # compaction frees what would sit idle


def test_snapkv_holds_about_half(rows):
    table = by_key(ratios_to_full(rows))
    for n in LENGTHS:
        full, snap = table[(n, "full")], table[(n, "snapkv[window=8]")]
        assert full["cache_bytes"] == full["dense_bytes"] > 0
        assert 0.4 <= snap["cache_bytes_vs_full"] <= 0.6
        assert snap["dense_bytes"] == full["dense_bytes"]  # same input for every policy


def test_measurements_are_real(rows):
    for r in rows:
        assert r.peak_bytes >= 0 and r.peak_source
        assert r.decode_tokens_per_s > 0
        assert r.prefill_seconds > 0
        assert 0 <= r.compress_seconds <= r.prefill_seconds
    snap = [r for r in rows if r.policy == "snapkv[window=8]"]
    assert all(r.compress_seconds > 0 for r in snap)  # snapkv did compress inside the prefill


def test_table_names_every_policy_and_length(rows):
    text = format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows)  # header, rule, one line per row
    for r in rows:
        assert any(f"| {r.length} | {r.label} |" in line for line in lines)
    assert "(1.00x)" in text


def test_ratios_to_full_without_full_row_are_none(rows):
    only_snap = [r for r in rows if r.policy == "snapkv[window=8]"]
    for d in ratios_to_full(only_snap):
        assert d["cache_bytes_vs_full"] is None


def test_rejects_lengths_past_the_context(tiny_checkpoint):
    loaded = load_model(str(tiny_checkpoint))
    with pytest.raises(ValueError, match="context"):
        run_bench(loaded, [510], [make_policy("full")], decode_tokens=4)


def test_batch_lengths_keep_the_total():
    equal, spread = batch_lengths(100, 8)
    assert equal == [100] * 8 and sum(spread) == 800
    assert min(spread) == 50 and len(set(spread)) == 8


def test_batch_bench_times_equal_and_unequal_batches(tiny_checkpoint):
    loaded = load_model(str(tiny_checkpoint))
    rows = run_batch_bench(loaded, 40, 4, make_policy("knorm", ratio=0.5), decode_tokens=3)
    assert [len(set(r.lengths)) for r in rows] == [1, 4]
    assert all(r.step_seconds > 0 for r in rows)
    # The same total of prompt tokens, compressed per sequence: the kept entries match closely.
    assert abs(rows[0].kept_bytes - rows[1].kept_bytes) <= 0.05 * rows[0].kept_bytes
    assert "unequal" in format_batch_table(rows)


def test_batched_decoding_forks_one_prefill_into_each_batch(tiny_checkpoint):
    from kvforge.eval.batch_decode import format_decode_table, run_batched_decode
    from kvforge.storage import QuantSpec

    loaded = load_model(str(tiny_checkpoint))
    policies = [make_policy("full"), make_policy("knorm", ratio=0.5)]
    rows = run_batched_decode(loaded, [96], [1, 3], policies, [QuantSpec(), QuantSpec("int4", group=8, residual=16)], decode_tokens=4)
    assert [(r.batch, r.policy, r.quant) for r in rows][:4] == [(1, "full", "none"), (1, "knorm", "none"), (1, "full", "int4/g8"), (1, "knorm", "int4/g8")]
    by = {(r.batch, r.policy, r.quant): r for r in rows}
    for key in [("full", "none"), ("knorm", "none"), ("full", "int4/g8")]:
        assert by[(3, *key)].cache_bytes == 3 * by[(1, *key)].cache_bytes  # every fork holds its own copy
    assert by[(1, "knorm", "none")].cache_bytes < by[(1, "full", "none")].cache_bytes
    assert all(r.tokens_per_s > 0 and r.ms_per_step > 0 for r in rows)
    assert "| 96 | 3 | knorm int4/g8 | 0.5 |" in format_decode_table(rows)
    with pytest.raises(ValueError, match="must be positive integers"):
        run_batched_decode(loaded, [96], [0], policies, [QuantSpec()])


@pytest.mark.parametrize("mode", ["none", "int4"])
def test_attention_bench_evicts_unequal_shares_per_head(mode):
    import torch

    from kvforge.eval.attention_bench import SHAPES, build_storage
    from kvforge.storage import QuantSpec

    spec = QuantSpec(mode, group=16, residual=16)
    storage = build_storage(SHAPES["default"], 200, 2, spec, torch.float32, torch.device("cpu"), ratio=0.5)
    # 3 KV heads keep 0.5x, 1x and 1.5x of half the 200 tokens, in both sequences.
    assert storage.lengths.tolist() == [[50, 100, 150]] * 2
    whole = build_storage(SHAPES["default"], 200, 2, spec, torch.float32, torch.device("cpu"))
    assert whole.lengths.tolist() == [[200] * 3] * 2
    assert storage.allocated_nbytes < 0.7 * whole.allocated_nbytes
    with pytest.raises(ValueError, match=r"--ratios: 1.0 is outside \[0, 1\)"):
        from kvforge.eval.attention_bench import run_attention_bench

        run_attention_bench("default", [8], [1], [spec], torch.float32, torch.device("cpu"), ratios=(1.0,))
