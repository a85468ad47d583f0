"""Reading less (Quest's key bounds, mean keys): page summaries, the pages a decoding step reads,
and the cache that reads them."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_config
from transformers import LlamaForCausalLM

import kvforge
from kvforge.cache import KVCache
from kvforge.eval.report import markdown, summarize
from kvforge.eval.runner import EvalConfig, run_eval
from kvforge.models import load_model
from kvforge.policies import make_policy
from kvforge.reading.pages import PAGE, chosen_slots, grow_summary, page_bounds, page_scores, page_sums, page_summary
from kvforge.storage import QuantSpec


def integer_keys(batch: int, heads: int, slots: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Keys that half precision holds exactly, so bounds compare without rounding."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-64, 64, (batch, heads, slots, dim), generator=g).float() / 8


def test_bounds_are_each_pages_least_and_most_key_and_empty_pages_are_infinite():
    keys = integer_keys(1, 2, 40, 4)
    lengths = torch.tensor([[40, 17]])
    least, most = page_bounds(keys, lengths)
    assert least.shape == (1, 2, 3, 4) and least.dtype == torch.float16
    assert torch.equal(least[0, 0, 2].float(), keys[0, 0, 32:40].amin(0))
    assert torch.equal(most[0, 0, 0].float(), keys[0, 0, :16].amax(0))
    assert torch.equal(least[0, 1, 1].float(), keys[0, 1, 16:17].amin(0))  # one entry: its own key
    assert bool((least[0, 1, 2] == float("inf")).all() and (most[0, 1, 2] == float("-inf")).all())


def test_a_logit_never_exceeds_its_pages_bound():
    keys, query = integer_keys(1, 1, 64, 8), integer_keys(1, 2, 1, 8, seed=1)  # two query heads share the row
    least, most = page_bounds(keys, torch.tensor([[64]]))
    bound = (query.clamp(min=0) @ most.float().transpose(-1, -2) + query.clamp(max=0) @ least.float().transpose(-1, -2))[0, :, 0]
    logits = (query[0, :, 0] @ keys[0, 0].T).view(2, 4, PAGE)  # (query heads, pages, PAGE)
    assert bool((logits.amax(-1) <= bound).all())


def test_page_sums_are_each_pages_sum_of_held_keys():
    keys = integer_keys(1, 1, 20, 4)
    sums = page_sums(keys, torch.tensor([[18]]))
    assert sums.shape == (1, 1, 2, 4) and sums.dtype == torch.float32
    assert torch.equal(sums[0, 0, 0], keys[0, 0, :16].sum(0)) and torch.equal(sums[0, 0, 1], keys[0, 0, 16:18].sum(0))


@pytest.mark.parametrize("kind", ["quest", "centroid"])
def test_appending_one_entry_per_row_gives_the_summary_of_the_grown_rows(kind):
    keys = integer_keys(2, 2, 34, 4, seed=2)
    lengths = torch.tensor([[31, 32], [16, 5]])
    summary = page_summary(kind, keys, lengths)
    added = torch.tensor([[True, True], [True, False]])  # the second sequence's second row is padding this step
    new = integer_keys(2, 2, 1, 4, seed=3)[:, :, 0]
    grown = keys.clone()
    for b in range(2):
        for h in range(2):
            if added[b, h]:
                grown[b, h, lengths[b, h]] = new[b, h]
    summary = grow_summary(kind, summary, new, lengths, added)
    want = page_summary(kind, grown, lengths + added.long())
    assert summary[0].shape == (2, 2, 3, 4)  # row (0, 1) began a third page
    assert all(torch.equal(got, wanted) for got, wanted in zip(summary, want, strict=True))


def test_a_step_reads_the_first_page_the_last_and_the_pages_with_the_highest_bound():
    # One row of 6 pages (90 entries, the last page partly filled); the query is all ones, so a
    # page's bound is the sum of its most; page 3 promises most, then page 1.
    lengths = torch.tensor([[90]])
    most = torch.zeros(1, 1, 6, 2, dtype=torch.float16)
    most[0, 0, 3], most[0, 0, 1] = 5.0, 2.0
    least = most - 1
    query = torch.ones(1, 1, 1, 2)
    score = page_scores("quest", query, [least, most], lengths)
    assert score[0, 0].tolist() == [0.0, 4.0, 0.0, 10.0, 0.0, 0.0]
    slots, read = chosen_slots(score, lengths, fraction=0.5)  # 3 pages: first, last, page 3
    pages = sorted({int(s) // PAGE for s, r in zip(slots[0, 0], read[0, 0]) if r})
    assert pages == [0, 3, 5] and int(read.sum()) == 16 + 16 + 10
    slots, read = chosen_slots(score, lengths, fraction=0.6)  # ceil(3.6) = 4: page 1 too
    assert sorted({int(s) // PAGE for s, r in zip(slots[0, 0], read[0, 0]) if r}) == [0, 1, 3, 5]
    slots, read = chosen_slots(score[..., :1], torch.tensor([[9]]), fraction=0.1)
    assert read[0, 0].tolist() == [True] * 9 + [False] * 7  # one page: all of it


def test_centroid_scores_a_page_by_its_mean_key_and_the_best_query_head_of_the_group():
    keys = torch.zeros(1, 1, 40, 2)
    keys[0, 0, 16:32, 0] = 3.0  # page 1: mean (3, 0)
    keys[0, 0, 32:40, 1] = 2.0  # page 2 (8 entries): mean (0, 2), not (0, 1)
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)  # two query heads on one KV head
    score = page_scores("centroid", query, page_summary("centroid", keys, torch.tensor([[40]])), torch.tensor([[40]]))
    assert score[0, 0].tolist() == [0.0, 3.0, 2.0]


@pytest.mark.parametrize("layout", ["inplace", "paged", "ragged"])
def test_reading_every_page_decodes_as_reading_everything(tiny_model, layout):
    ids = torch.randint(1, 128, (2, 70), generator=torch.Generator().manual_seed(4))
    outputs, caches = [], []
    for quant in ("none", "quest0.999", "centroid0.999"):
        cache = KVCache(tiny_model, make_policy("snapkv", ratio=0.5), quant=quant, layout=layout)
        outputs.append(tiny_model.generate(ids, past_key_values=cache, max_new_tokens=12, do_sample=False))
        caches.append(cache)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    assert caches[0].seq_read_fraction() is None and caches[1].seq_read_fraction().tolist() == [1.0, 1.0]


@pytest.mark.parametrize("kind", ["quest", "centroid"])
def test_a_cache_reading_an_eighth_reads_about_that_and_holds_its_summary(tiny_model, kind):
    ids = torch.randint(1, 128, (1, 300), generator=torch.Generator().manual_seed(5))
    plain = KVCache(tiny_model, make_policy("full"))
    tiny_model.generate(ids, past_key_values=plain, max_new_tokens=8, do_sample=False)
    cache = KVCache(tiny_model, make_policy("full"), quant=f"{kind}0.125")
    tiny_model.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False)
    # 300..306 entries held at the 7 steps that read pages: 19..20 pages, 3 read (first, last, one
    # chosen), the last partly filled.
    fraction = float(cache.seq_read_fraction()[0])
    assert 0.10 < fraction <= 3 * PAGE / 300
    layer = cache.layers[0]
    view = layer.storage.view()
    rebuilt = page_summary(kind, view.keys, view.lengths)  # kept up to date step by step, equal to rebuilt
    assert all(torch.allclose(got, want, atol=1e-4) for got, want in zip(layer.reader.summary, rebuilt, strict=True))
    bounds = 20 * 16 * 4 * 2 * 2  # pages x head_dim x (two fp16 rows, or one float32 row) x kv_heads x layers
    assert int(cache.seq_nbytes()[0]) == int(plain.seq_nbytes()[0]) + bounds
    assert cache.nbytes == plain.nbytes + bounds


@pytest.mark.parametrize("layout", ["inplace", "paged"])
def test_a_policy_that_scores_by_attention_at_decoding_sees_only_what_was_read(tiny_model, layout):
    ids = torch.randint(1, 128, (1, 120), generator=torch.Generator().manual_seed(6))
    cache = KVCache(tiny_model, make_policy("h2o", ratio=0.5), quant="quest0.25", layout=layout)
    tiny_model.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert 0 < float(cache.seq_read_fraction()[0]) < 1
    assert cache.kept_lengths(0).max() <= 60 + 6


@pytest.mark.parametrize("label", ["int4/quest1.5", "quest0", "questx", "int4/quest-0.1", "centroid2"])
def test_a_bad_read_fraction_is_a_one_line_error(label):
    with pytest.raises(ValueError, match=re.escape(label.split("/")[-1][:5])) as err:
        QuantSpec.parse(label)
    assert "\n" not in str(err.value) and ("(0, 1)" in str(err.value) or "fraction of pages" in str(err.value))


def test_labels_round_trip():
    for label in ("quest0.125", "int4/quest0.25", "int4/r32/quest0.5", "int4", "r32", "int4/centroid0.125"):
        assert QuantSpec.parse(label).label == label


def test_eval_rows_say_what_decoding_read(tiny_checkpoint, tmp_path):
    tiny = load_model(str(tiny_checkpoint))
    cfg = EvalConfig(model="tiny", tasks=["niah_single"], policies=["full"], ratios=[], length=256, samples=1,
                     quant=["none", "quest0.25"])  # fmt: skip
    rows, _ = run_eval(tiny, cfg, tmp_path / "run")
    by = {r.quant: r for r in rows}
    assert by["none"].read_fraction is None and 0 < by["quest0.25"].read_fraction < 0.5
    assert by["quest0.25"].cache_bytes > by["none"].cache_bytes  # its bounds are held too
    md = markdown(summarize(rows))
    assert "| quant | bits | read |" in md and "| full | 0 | quest0.25 |" in md


def test_the_first_two_layers_of_a_deep_model_read_every_page():
    torch.manual_seed(0)
    model = kvforge.enable(LlamaForCausalLM(tiny_config(num_hidden_layers=16)).eval())
    ids = torch.randint(1, 128, (1, 160), generator=torch.Generator().manual_seed(7))
    cache = KVCache(model, make_policy("full"), quant="quest0.125")
    model.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert [not layer.reader.summary for layer in cache.layers[:3]] == [True, True, False]
    read = [float(layer.reader.read.sum() / layer.reader.held.sum()) for layer in cache.layers]
    assert read[:2] == [1.0, 1.0] and max(read[2:]) <= 3 * PAGE / 160
    assert float(cache.seq_read_fraction()[0]) == pytest.approx(sum(read) / 16, rel=1e-3)


@pytest.mark.parametrize("kind", ["quest", "centroid"])
def test_an_eviction_the_next_append_makes_up_for_rebuilds_the_summary(kind):
    from kvforge.storage import make_storage
    from kvforge.storage.pageread import PageReader

    storage = make_storage("inplace", 1, 1, 4, torch.float32, torch.device("cpu"))
    keys = integer_keys(1, 1, 42, 4, seed=8)
    storage.append(keys[:, :, :40], keys[:, :, :40], torch.arange(40), torch.ones(1, 40, dtype=torch.bool))
    reader, query, valid = PageReader(kind, 0.5, 1), torch.ones(1, 2, 1, 4), torch.ones(1, 1, dtype=torch.bool)
    reader.attend(storage, query, torch.tensor([40]), valid, 1.0)
    view = storage.view()
    storage.keep(view, torch.arange(1, 40).view(1, 1, 39), torch.ones(1, 1, 39, dtype=torch.bool))  # the first goes
    storage.append(keys[:, :, 40:41], keys[:, :, 40:41], torch.tensor([40]), valid)  # 40 held again
    reader.attend(storage, query, torch.tensor([41]), valid, 1.0)
    rebuilt = page_summary(kind, storage.view().keys, storage.lengths)
    assert all(torch.equal(got, want) for got, want in zip(reader.summary, rebuilt, strict=True))


def test_bench_and_fidelity_name_a_reader_and_fidelity_measures_what_it_costs(tiny_checkpoint):
    from kvforge.eval.bench import run_bench
    from kvforge.eval.fidelity import fidelity

    tiny = load_model(str(tiny_checkpoint))
    specs = [QuantSpec(), QuantSpec.parse("centroid0.999"), QuantSpec.parse("quest0.2")]
    rows = run_bench(tiny, [200], [make_policy("full")], decode_tokens=2, baselines=[], quants=specs)
    assert [r.quant for r in rows] == ["none", "centroid0.999", "quest0.2"]
    ids = torch.randint(1, 128, (260,), generator=torch.Generator().manual_seed(9)).tolist()
    got = {f.quant: f for f in fidelity(tiny, ids, 220, [make_policy("full")], specs)}
    assert got["none"].kl == pytest.approx(0.0, abs=1e-6) and got["centroid0.999"].kl == pytest.approx(0.0, abs=1e-6)
    assert got["quest0.2"].kl > 1e-6  # reading a fifth of the pages changes the next-token distribution


def test_stacking_caches_that_read_less_keeps_each_sequences_counts(tiny_model):
    caches = []
    for seed, steps in ((10, 3), (11, 0)):  # the second has not decoded yet
        ids = torch.randint(1, 128, (1, 80), generator=torch.Generator().manual_seed(seed))
        cache = KVCache(tiny_model, make_policy("full"), quant="centroid0.25")
        tiny_model.generate(ids, past_key_values=cache, max_new_tokens=steps + 1, do_sample=False)
        caches.append(cache)
    first = caches[0].layers[1].reader
    stacked = KVCache.stack(caches)
    reader = stacked.layers[1].reader
    assert reader.kind == "centroid" and reader.fraction == 0.25 and not reader.dense
    assert reader.read.tolist() == [int(first.read[0]), 0] and reader.held.tolist() == [int(first.held[0]), 0]
    assert int(first.read[0]) > 0


def _paged_and_inplace(batch: int, heads: int, length: int, block: int):
    """The same entries (integer keys; the second sequence's first 10 tokens are padding) in a
    paged layout over a fresh memory of `block`-entry blocks and in the in-place layout."""
    from kvforge.memory.kvmemory import KVMemory
    from kvforge.storage import make_storage
    from kvforge.storage.paged import PagedKV

    memory = KVMemory(4, torch.float32, block_size=block)
    paged = PagedKV(batch, heads, 4, torch.float32, torch.device("cpu"), ("received",), memory=memory)
    inplace = make_storage("inplace", batch, heads, 4, torch.float32, torch.device("cpu"), ("received",))
    keys, values = integer_keys(batch, heads, length, 4, seed=10), integer_keys(batch, heads, length, 4, seed=11)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1:, :10] = False
    for storage in (paged, inplace):
        storage.append(keys, values, torch.arange(length), valid)
    return paged, inplace, memory


def assert_block_summaries_describe_the_rows(paged, kind: str) -> None:
    """What the memory's summaries of a paged storage's blocks describe is what its rows hold: the
    summary of its picture by pages of its blocks (8 entries)."""
    _, summary = paged.page_summaries(kind)
    view = paged.view()
    live = (torch.arange(summary[0].shape[2]) < (view.lengths[..., None] + 7) // 8)[..., None]
    for got, want in zip(summary, page_summary(kind, view.keys, view.lengths, 8), strict=True):
        assert torch.equal(torch.where(live, got, 0), torch.where(live, want, 0))


def _step(storages, step: int, position: int) -> None:
    new = integer_keys(2, 2, 1, 4, seed=100 + step)
    for storage in storages:
        storage.append(new, -new, torch.tensor([position]), torch.ones(2, 1, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["quest", "centroid"])
def test_a_paged_layout_reads_only_its_chosen_blocks_and_answers_as_the_picture_read_by_pages_of_its_blocks(kind):
    from kvforge.storage.pageread import PageReader

    paged, inplace, memory = _paged_and_inplace(2, 2, 70, block=8)
    by_blocks, by_picture = PageReader(kind, 0.3, 2), PageReader(kind, 0.3, 2, page=8)
    for step in range(4):
        _step([paged, inplace], step, 70 + step)
        query, valid = integer_keys(2, 4, 1, 4, seed=200 + step), torch.ones(2, 1, dtype=torch.bool)
        got = by_blocks.attend(paged, query, torch.tensor([70 + step]), valid, 0.5, accumulate="received")
        want = by_picture.attend(inplace, query, torch.tensor([70 + step]), valid, 0.5, accumulate="received")
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(by_blocks.read, by_picture.read) and bool((by_blocks.read < by_blocks.held / 2).all())
    # The attention each entry read received (h2o's state at decoding) lands on the same entries.
    received, reference = paged.view().aux["received"], inplace.view().aux["received"]
    assert torch.allclose(received, reference, atol=1e-6) and 0 < int((received > 0).sum()) < int(paged.lengths.sum())
    assert by_blocks.summary == []  # the memory holds them, per block
    assert_block_summaries_describe_the_rows(paged, kind)


@pytest.mark.parametrize("kind", ["quest", "centroid"])
def test_an_eviction_in_a_paged_layout_makes_its_rewritten_blocks_summarize_again(kind):
    paged, _, _ = _paged_and_inplace(2, 2, 40, block=8)
    paged.page_summaries(kind)
    view = paged.view()
    index = torch.arange(1, 40).expand(2, 2, 39)  # every row drops its first entry: blocks rewritten in place
    paged.keep(view, index, index < view.lengths[..., None])
    assert_block_summaries_describe_the_rows(paged, kind)


@pytest.mark.parametrize("kind", ["quest", "centroid"])
def test_forks_read_by_their_blocks_summaries_share_them_and_count_them_once(kind):
    from kvforge.memory.kvmemory import KVMemory
    from kvforge.storage.pageread import PageReader
    from kvforge.storage.paged import PagedKV

    memory = KVMemory(4, torch.float32, block_size=8)
    base = PagedKV(1, 1, 4, torch.float32, torch.device("cpu"), memory=memory)
    keys, one = integer_keys(1, 1, 21, 4, seed=12), torch.ones(1, 1, dtype=torch.bool)
    base.append(keys[:, :, :20], keys[:, :, :20], torch.arange(20), torch.ones(1, 20, dtype=torch.bool))
    base.append(keys[:, :, 20:], keys[:, :, 20:], torch.tensor([20]), one)
    PageReader(kind, 0.5, 1).attend(base, torch.ones(1, 2, 1, 4), torch.tensor([20]), one, 1.0)
    summaries = memory.store.summaries(kind, [])
    assert base.rows[0].blocks == [0, 1, 2] and summaries.covered[:3].tolist() == [8, 8, 5]
    forks = [base.share(()) for _ in range(3)]
    for fork in forks:  # each copies the shared, partly filled last block, with its summary, then extends it
        fork.append(keys[:, :, :1], keys[:, :, :1], torch.tensor([21]), one)
        PageReader(kind, 0.5, 1).attend(fork, torch.ones(1, 2, 1, 4), torch.tensor([21]), one, 1.0)
    assert [f.rows[0].blocks for f in forks] == [[0, 1, 3], [0, 1, 4], [0, 1, 5]]
    assert summaries.covered[:6].tolist() == [8, 8, 5, 6, 6, 6]
    held: dict[int, int] = {}
    for storage in (base, *forks):
        held |= storage.buffers()
    assert sum(held.values()) == 6 * (memory.block_nbytes + summaries.block_nbytes)
    assert summaries.block_nbytes == (2 * 4 * 2 if kind == "quest" else 4 * 4)
    assert int(forks[0].seq_nbytes()[0]) == 22 * 2 * 4 * 4 + 3 * summaries.block_nbytes


@pytest.mark.parametrize("kind", ["quest", "centroid"])
def test_a_paged_cache_reading_an_eighth_holds_one_summary_per_block(tiny_model, kind):
    ids = torch.randint(1, 128, (1, 300), generator=torch.Generator().manual_seed(5))
    plain = KVCache(tiny_model, make_policy("full"), layout="paged")
    tiny_model.generate(ids, past_key_values=plain, max_new_tokens=8, do_sample=False)
    cache = KVCache(tiny_model, make_policy("full"), quant=f"{kind}0.125", layout="paged")
    tiny_model.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False)
    # 300..306 entries at the steps that read pages: 10 blocks of 32, 2 read (first, last) of
    # the 10 (ceil(1.25) = 2), the last partly filled.
    fraction = float(cache.seq_read_fraction()[0])
    assert 32 / 306 < fraction <= 64 / 300
    assert all(not layer.reader.summary for layer in cache.layers)
    blocks = 10 * 2 * 2  # blocks per row x kv_heads x layers
    summary = 2 * 16 * 2 if kind == "quest" else 16 * 4  # head_dim 16: two float16 rows, or one float32
    assert cache.nbytes == plain.nbytes + blocks * summary  # both hold 10 blocks per row
    assert int(cache.seq_nbytes()[0]) == cache.kept_nbytes + blocks * summary


@pytest.mark.parametrize("kind", ["quest", "centroid"])
def test_the_paged_kernel_over_the_chosen_blocks_answers_as_the_torch_gather(kind, monkeypatch):
    """The kernel reads each row's chosen blocks through a block table of them (Triton's
    interpreter on a CPU); it attends over the same entries as `read_pages` and counts the same."""
    pytest.importorskip("triton")
    from kvforge.reading import kernels
    from kvforge.storage.pageread import PageReader

    outputs, readers = {}, {}
    for flag in ("0", "1"):
        monkeypatch.setenv("KVFORGE_KERNELS", flag)
        paged, _, _ = _paged_and_inplace(2, 2, 70, block=8)
        reader, calls = PageReader(kind, 0.3, 2), kernels.calls["decode"]
        steps = []
        for step in range(3):
            _step([paged], step, 70 + step)
            query = integer_keys(2, 4, 1, 4, seed=200 + step)
            steps.append(reader.attend(paged, query, torch.tensor([70 + step]), torch.ones(2, 1, dtype=torch.bool), 0.5))
        assert kernels.calls["decode"] - calls == (3 if flag == "1" else 0)
        outputs[flag], readers[flag] = torch.stack(steps), reader
    assert torch.allclose(outputs["0"], outputs["1"], atol=1e-5)
    assert torch.equal(readers["0"].read, readers["1"].read) and torch.equal(readers["0"].held, readers["1"].held)
