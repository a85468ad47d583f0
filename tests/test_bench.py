"""The speed/memory benchmark on the tiny checkpoint: row shape, ratios to full, real measurements."""

from __future__ import annotations

import pytest

from kvforge.eval.bench import BenchRow, format_table, ratios_to_full, run_bench
from kvforge.models import load_model
from kvforge.policies.registry import make_policy

LENGTHS = [64, 128]


@pytest.fixture(scope="module")
def rows(tiny_checkpoint) -> list[BenchRow]:
    loaded = load_model(str(tiny_checkpoint))
    policies = [make_policy("full"), make_policy("snapkv", ratio=0.5, window=8)]
    return run_bench(loaded, LENGTHS, policies, decode_tokens=4)


def by_key(rows: list[dict[str, object]]) -> dict[tuple[object, object], dict[str, object]]:
    return {(r["length"], r["policy"]): r for r in rows}


def test_one_row_per_length_and_policy(rows):
    keys = [(r.length, r.policy) for r in rows]
    assert sorted(keys) == sorted((n, p) for n in LENGTHS for p in ("full", "snapkv"))
    # full is measured first at each length: it is the reference.
    assert [r.policy for r in rows if r.length == 64][0] == "full"


def test_full_is_its_own_reference(rows):
    for (_, policy), d in by_key(ratios_to_full(rows)).items():
        if policy == "full":
            vs_full = {k: v for k, v in d.items() if k.endswith("_vs_full")}
            assert len(vs_full) == 4
            assert all(v == 1.0 for v in vs_full.values()), vs_full


def test_snapkv_holds_about_half(rows):
    table = by_key(ratios_to_full(rows))
    for n in LENGTHS:
        full, snap = table[(n, "full")], table[(n, "snapkv")]
        assert full["cache_bytes"] == full["dense_bytes"] > 0
        assert 0.4 <= snap["cache_bytes_vs_full"] <= 0.6
        assert snap["dense_bytes"] == full["dense_bytes"]  # same input for every policy


def test_measurements_are_real(rows):
    for r in rows:
        assert r.peak_bytes >= 0 and r.peak_source
        assert r.decode_tokens_per_s > 0
        assert r.prefill_seconds > 0
        assert 0 <= r.compress_seconds <= r.prefill_seconds
    snap = [r for r in rows if r.policy == "snapkv"]
    assert all(r.compress_seconds > 0 for r in snap)  # snapkv did compress inside the prefill


def test_table_names_every_policy_and_length(rows):
    text = format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows)  # header, rule, one line per row
    for r in rows:
        assert any(f"| {r.length} | {r.policy} |" in line for line in lines)
    assert "(1.00x)" in text


def test_ratios_to_full_without_full_row_are_none(rows):
    only_snap = [r for r in rows if r.policy == "snapkv"]
    for d in ratios_to_full(only_snap):
        assert d["cache_bytes_vs_full"] is None


def test_rejects_lengths_past_the_context(tiny_checkpoint):
    loaded = load_model(str(tiny_checkpoint))
    with pytest.raises(ValueError, match="context"):
        run_bench(loaded, [510], [make_policy("full")], decode_tokens=4)
