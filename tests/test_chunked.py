"""Chunked prefill: exact at ratio 0, bounded by budget + one chunk, and errors for bad values."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import held_positions, left_padded
from kvforge import KVCache, make_policy
from kvforge.cli import main
from kvforge.generate import feed, greedy, prefill

ENTRY = 2 * 16 * 4  # one K row + one V row: head_dim 16, float32


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_prefill_at_ratio_0_equals_one_shot(tiny_model, chunk):
    ids = left_padded([37], seed=11)[0][0].tolist()
    one_shot, chunked = KVCache(tiny_model, make_policy("full")), KVCache(tiny_model, make_policy("full"))
    a, b = prefill(tiny_model, one_shot, ids), prefill(tiny_model, chunked, ids, chunk)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert held_positions(chunked.layers[1].storage) == [list(range(37))] * 2
    steps_a = greedy(tiny_model, one_shot, a[None], torch.tensor([37]), 8, stop_ids=set())
    steps_b = greedy(tiny_model, chunked, b[None], torch.tensor([37]), 8, stop_ids=set())
    assert steps_a == steps_b


def test_chunked_prefill_of_a_padded_batch_equals_one_shot(tiny_model):
    rows = [left_padded([n], seed=n)[0][0].tolist() for n in (23, 9, 16)]
    start = torch.zeros(3, dtype=torch.long)
    one_shot, chunked = KVCache(tiny_model, make_policy("full")), KVCache(tiny_model, make_policy("full"))
    a, _ = feed(tiny_model, one_shot, rows, start, "prefill")
    b, _ = feed(tiny_model, chunked, rows, start, "prefill", chunk=4)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_peak_cache_bytes_stay_under_budget_plus_one_chunk(tiny_model):
    ids = left_padded([64], seed=12)[0][0].tolist()
    cache = KVCache(tiny_model, make_policy("knorm", ratio=0.75))
    prefill(tiny_model, cache, ids, chunk=16)
    rows = 2 * 2  # layers x KV heads
    assert cache.kept_nbytes == 16 * rows * ENTRY  # a quarter of 64 at the end
    # The largest budget before the last chunk is a quarter of 48 tokens: 12 entries, plus 16 new.
    assert cache.peak_nbytes <= (12 + 16) * rows * ENTRY
    one_shot = KVCache(tiny_model, make_policy("knorm", ratio=0.75))
    prefill(tiny_model, one_shot, ids)
    # One-shot: a layer holds the whole prompt until its compression (layers compress in turn).
    assert one_shot.peak_nbytes == (64 + 16) * 2 * ENTRY


def test_model_generate_compresses_each_prefill_chunk(tiny_model):
    # transformers' own chunked prefill (generation_config.prefill_chunk_size) drives the same
    # cache: every multi-token forward is a prompt chunk.
    ids = left_padded([40], seed=13)[0]
    cache = KVCache(tiny_model, make_policy("knorm", ratio=0.5))
    tiny_model.generate(ids, past_key_values=cache, max_new_tokens=2, do_sample=False, prefill_chunk_size=8)
    assert cache.kept_lengths(0).tolist() == [[20 + 1] * 2]  # half of 40, plus one fed-back token
    assert cache.peak_nbytes <= (16 + 8) * 2 * 2 * ENTRY


def test_budget_and_ratio_are_alternatives(tiny_model):
    ids = left_padded([40], seed=14)[0][0].tolist()
    cache = KVCache(tiny_model, make_policy("snapkv", budget=10, window=4))
    prefill(tiny_model, cache, ids, chunk=12)
    assert cache.kept_lengths(1).tolist() == [[10, 10]]


@pytest.mark.parametrize(
    ("policy", "params", "match"),
    [
        ("streaming", {"budget": 4, "sinks": 4}, r"budget=4 .* minimum of 5 .*sinks=4.* --budget >= 5"),
        ("snapkv", {"decode_budget": 8, "window": 16}, r"decode_budget=8 .* minimum of 16 .* --decode-budget"),
        ("knorm", {"evict_every": 0}, r"evict_every=0 is outside the allowed range \[1, inf\)"),
        ("full", {"budget": 8}, r"budget=8 does not apply to policy 'full'"),
    ],
)
def test_bad_budgets_name_the_field(policy, params, match):
    with pytest.raises(ValueError, match=match):
        make_policy(policy, **params)


def test_prefill_chunk_must_be_positive(tiny_model):
    with pytest.raises(ValueError, match=r"prefill_chunk=0 must be at least 1 token \(--prefill-chunk\)"):
        prefill(tiny_model, KVCache(tiny_model, make_policy("full")), [1, 2, 3], chunk=0)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--prefill-chunk", "0"], "--prefill-chunk 0 is outside the allowed range [1, inf)"),
        (["--policy", "streaming", "--budget", "3"], "budget=3 is below the minimum of 5 entries for policy 'streaming'"),
        (["--ratio", "0.5", "--budget", "8"], "give either --ratio or --budget, not both"),
    ],
)
def test_cli_rejects_bad_budget_options_in_one_line(capsys, tiny_checkpoint, tmp_path, extra, match):
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"w{i % 100}" for i in range(60)))
    argv = ["generate", "--model", str(tiny_checkpoint), "--prompt-file", str(doc), "--max-new-tokens", "2", *extra, "w1"]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and match in err and len(err.splitlines()) == 1, err


def test_cli_generate_chunked_reports_peak_cache_bytes(capsys, tiny_checkpoint, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"w{i % 100}" for i in range(120)))
    argv = ["generate", "--model", str(tiny_checkpoint), "--prompt-file", str(doc), "--policy", "knorm", "--budget", "20",
            "--prefill-chunk", "16", "--max-new-tokens", "1", "--query-aware", "--json", "w1 w2"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    layers_heads = 2 * 2
    # The whole prompt is compressed chunk by chunk and nothing is decoded after it.
    assert result["peak_cache_bytes"] <= (20 + 16) * layers_heads * ENTRY
    assert result["kept_bytes"] < result["dense_cache_bytes"] / 2
