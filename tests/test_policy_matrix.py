"""Checks every registered policy gets for free: add a row here when adding a policy file."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from transformers import DynamicCache

from conftest import held_positions, left_padded, word_tokenizer
from kvforge.policies.pyramidkv import depth_factor
from kvforge import KVCache, all_policies, make_policy
from kvforge.generate import DECODE, PREFILL, feed, settle
from kvforge.generate import prefill as prefill_ids
from kvforge.storage import LAYOUTS


@dataclass(frozen=True)
class Row:
    name: str
    params: dict = field(default_factory=dict)
    # How the budget is spread: "head" (every head keeps it), "layer" (a layer's heads share it,
    # unevenly), "depth" (each layer keeps its own share, its heads alike), "model" (all heads
    # of all layers share it; checked on the whole cache only), "content" (each head keeps what
    # its scores need, at most the budget).
    spread: str = "head"
    merges: bool = False  # kept values absorb evicted ones (they differ from the full cache's)


MATRIX = [
    Row("full"),
    Row("random", {"seed": 3}),
    Row("streaming", {"sinks": 2}),
    Row("knorm"),
    Row("snapkv", {"window": 4}),
    Row("h2o"),
    Row("tova"),
    Row("keydiff"),
    Row("compactor"),
    Row("expected_attention", {"window": 4}),
    Row("chunk:snapkv", {"window": 4, "size": 3}),
    Row("adakv:snapkv", {"window": 4}, spread="layer"),
    Row("adakv:chunk:knorm", {"size": 3}, spread="layer"),
    Row("pyramidkv:knorm", spread="depth"),
    Row("kvzip", {"chunk": 8, "overlap": 2, "sinks": 1}, spread="model"),
    Row("kvzip", {"chunk": 8, "spread": "layer"}, spread="layer"),
    Row("kvzap", {"sinks": 2, "spread": "head"}),
    Row("kvzap", {"sinks": 2}, spread="model"),
    Row("coverage:kvzip", {"chunk": 8, "overlap": 2, "sinks": 1}, spread="content"),
    Row("qfilters"),
    Row("razor", {"fraction": 0.5, "sinks": 2}, spread="model"),
    Row("cake:snapkv", {"window": 4}, spread="model"),
    Row("merge:knorm", {"threshold": 0.0}, merges=True),
    Row("restkv", {"chunk": 8, "overlap": 2, "sinks": 1}, spread="model"),
    Row("smooth:snapkv", {"window": 4, "kernel": 3}),
    Row("smooth:kvzap", {"sinks": 2, "pool": "max", "kernel": 5}, spread="model"),
]
COMPRESSING = [r for r in MATRIX if r.name != "full"]
RATIOS = [0.5, 0.75]
LENGTHS = [24, 17]  # a left-padded batch


def build(row: Row, ratio: float, **budgets: object):
    if row.name == "full":
        return make_policy(row.name, **row.params)
    return make_policy(row.name, ratio=ratio, **row.params, **budgets)


def prefill_batch(model, policy, ids: torch.Tensor, mask: torch.Tensor, layout: str = "inplace") -> KVCache:
    """One forward over a left-padded batch (positions counted from the padding, as transformers
    places them), then whatever the policy runs after the prompt (kvzip's reconstruction)."""
    return prefill_logits(model, policy, ids, mask, layout)[0]


def prefill_logits(model, policy, ids, mask, layout: str = "inplace", quant=None) -> tuple[KVCache, torch.Tensor]:
    """prefill_batch, and the (batch, vocab) logits of each row's next token."""
    cache = KVCache(model, policy, tokenizer=word_tokenizer(), layout=layout, quant=quant)
    cache.phase.mode = PREFILL
    logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]
    cache.phase.mode = None
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    settle(model, cache, rows, torch.full((len(rows),), ids.shape[1]))
    return cache, logits


def decode(model, cache: KVCache, logits: torch.Tensor, width: int, steps: int) -> list[torch.Tensor]:
    """Greedy decoding of `steps` tokens per row after a padded prefill of `width`; the logits of each step."""
    positions = torch.full((logits.shape[0],), width)
    out = []
    for _ in range(steps):
        logits, positions = feed(model, cache, [[int(t)] for t in logits.argmax(-1)], positions, DECODE)
        out.append(logits)
    return out


def prefill(model, row: Row, ratio: float, lengths: list[int]) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    ids, mask = left_padded(lengths)
    return prefill_batch(model, build(row, ratio), ids, mask), ids, mask


def test_every_registered_policy_has_a_row():
    assert {part for r in MATRIX for part in r.name.split(":")} == set(all_policies())


def expected_kept(row: Row, budget: int, layer: int, num_layers: int = 2) -> int:
    """Entries each head of `layer` keeps when the per-head budget is `budget` (for spread
    "layer", what a head keeps on average)."""
    if row.spread != "depth":
        return budget
    return max(1, round(budget * depth_factor(layer, num_layers, 20.0)))


def assert_kept(row: Row, lengths: torch.Tensor, budgets: list[int], layer: int, held: list[int] | None = None) -> None:
    """lengths: (batch, kv_heads) held by one layer; budgets: per sequence and head."""
    if row.spread == "model":
        return
    want = [expected_kept(row, b, layer) for b in budgets]
    if held is not None:
        want = [min(w, h) for w, h in zip(want, held)]
    if row.spread == "content":
        assert all(1 <= n <= w for ns, w in zip(lengths.tolist(), want) for n in ns)
        return
    if row.spread == "layer":  # the heads share the layer's budget
        assert lengths.sum(1).tolist() == [w * lengths.shape[1] for w in want]
    else:
        assert lengths.tolist() == [[w] * lengths.shape[1] for w in want]


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("row", COMPRESSING, ids=lambda r: r.name)
def test_keeps_exactly_the_budget_per_sequence_and_head(tiny_model, row, ratio):
    cache, _, _ = prefill(tiny_model, row, ratio, LENGTHS)
    budgets = [math.floor(n * (1 - ratio)) for n in LENGTHS]
    for layer in range(len(cache.layers)):
        assert_kept(row, cache.kept_lengths(layer), budgets, layer, LENGTHS)
    if row.spread == "model":  # 2 layers x 2 heads share 4 x the per-head budget (rounded down per head)
        total = sum(cache.kept_lengths(layer) for layer in range(len(cache.layers))).sum(1)
        assert all(4 * b - 4 <= t <= 4 * b for t, b in zip(total.tolist(), budgets))
    assert cache.get_seq_length() == max(LENGTHS)  # logical length: what transformers places tokens by


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("row", COMPRESSING, ids=lambda r: r.name)
def test_bytes_shrink_in_proportion(tiny_model, row, ratio):
    cache, _, _ = prefill(tiny_model, row, ratio, LENGTHS)
    per_entry = 2 * 16 * 4  # K and V, head_dim 16, float32
    assert cache.kept_nbytes == cache.entries() * per_entry
    assert cache.dense_nbytes == sum(LENGTHS) * 2 * 2 * per_entry  # 2 KV heads, 2 layers
    if row.spread in ("head", "layer"):  # (a layer keeping nearly all it held compacts in place, spare room kept)
        kept = sum(math.floor(n * (1 - ratio)) for n in LENGTHS)
        assert cache.nbytes == kept * 2 * 2 * per_entry
    if row.spread == "content":
        assert cache.kept_nbytes <= (1 - ratio) * cache.dense_nbytes
    else:
        assert cache.kept_nbytes / cache.dense_nbytes == pytest.approx(1 - ratio, abs=0.05)


@pytest.mark.parametrize("row", MATRIX, ids=lambda r: r.name)
def test_kept_entries_are_the_full_cache_entries_at_their_positions(tiny_model, tiny_reference, row):
    cache, ids, mask = prefill(tiny_model, row, 0.5, LENGTHS)
    ref = DynamicCache(config=tiny_reference.config)
    tiny_reference(input_ids=ids, attention_mask=mask, past_key_values=ref, use_cache=True)
    for layer_idx, layer in enumerate(cache.layers):
        view = layer.storage.view()
        full_k = ref.layers[layer_idx].keys  # (batch, kv_heads, T, head_dim)
        full_v = ref.layers[layer_idx].values
        b, h, s = view.valid.nonzero(as_tuple=True)
        pos = view.positions[b, h, s]
        assert bool(mask[b, pos].all()), "a padding token was kept"
        torch.testing.assert_close(view.keys[b, h, s], full_k[b, h, pos], rtol=1e-5, atol=1e-5)
        if not row.merges:
            torch.testing.assert_close(view.values[b, h, s], full_v[b, h, pos], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("row", COMPRESSING, ids=lambda r: r.name)
def test_decoding_after_eviction_attends_over_exactly_the_kept_tokens(tiny_model, tiny_reference, row):
    # Reference: a plain cache filled with just the kept K/V (same count per head at batch 1),
    # the new token at its true position. Matching logits means positions and masks are right.
    if row.spread in ("layer", "model", "content"):
        pytest.skip("heads hold different counts, which a DynamicCache cannot; test_storage checks ragged attention")
    n = 26
    cache, ids, mask = prefill(tiny_model, row, 0.5, [n])
    ref = DynamicCache(config=tiny_reference.config)
    for layer_idx, layer in enumerate(cache.layers):
        view = layer.storage.view()
        ref.update(view.keys, view.values, layer_idx)
    token = torch.tensor([[7]])
    ours = tiny_model(
        input_ids=token, attention_mask=torch.ones(1, n + 1, dtype=torch.long), past_key_values=cache, use_cache=True
    ).logits
    kept = ref.get_seq_length()
    theirs = tiny_reference(
        input_ids=token,
        attention_mask=torch.ones(1, kept + 1, dtype=torch.long),
        position_ids=torch.tensor([[n]]),
        past_key_values=ref,
        use_cache=True,
    ).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("evict_every", [1, 4])
@pytest.mark.parametrize("row", MATRIX, ids=lambda r: r.name)
def test_decoding_budget(tiny_model, row, evict_every):
    ids, mask = left_padded(LENGTHS)
    policy = build(row, 0.5) if row.name == "full" else build(row, 0.5, evict_every=evict_every)
    cache, logits = prefill_logits(tiny_model, policy, ids, mask)
    after_prompt = cache.kept_lengths(1).clone()
    new = 6
    decode(tiny_model, cache, logits, ids.shape[1], new - 1)
    # Like generate(), feed back new - 1 = 5 tokens. Policies that hold their budget evict back to it
    # whenever a row reaches budget + evict_every: with 4, after the 4th token, so one is left over.
    grown = new - 1
    if policy.holds_budget_while_decoding:
        grown = (new - 1) % evict_every
    assert cache.kept_lengths(1).tolist() == (after_prompt + grown).tolist()
    assert cache.get_seq_length() == max(LENGTHS) + new - 1


@pytest.mark.parametrize("layout", ["inplace", "paged"])
@pytest.mark.parametrize("row", COMPRESSING, ids=lambda r: r.name)
def test_each_sequence_of_a_batch_is_compressed_on_its_own(tiny_model, row, layout):
    ids, mask = left_padded(LENGTHS)
    batch = prefill_batch(tiny_model, build(row, 0.5), ids, mask, layout)
    width = max(LENGTHS)
    for b, n in enumerate(LENGTHS):
        alone = prefill_batch(tiny_model, build(row, 0.5), ids[b : b + 1, -n:], mask[b : b + 1, -n:], layout)
        for layer_idx in range(len(batch.layers)):
            in_batch = batch.layers[layer_idx].storage.view()
            solo = alone.layers[layer_idx].storage.view()
            got = in_batch.positions[b][in_batch.valid[b]] - (width - n)
            assert got.tolist() == solo.positions[0][solo.valid[0]].tolist()


@pytest.mark.parametrize("layout", ["inplace", "paged"])
@pytest.mark.parametrize("row", COMPRESSING, ids=lambda r: r.name)
def test_deriving_from_one_full_prefill_equals_compressing_during_prefill(tiny_model, row, layout):
    ids, mask = left_padded([30], seed=4)
    direct = prefill_batch(tiny_model, build(row, 0.5), ids, mask, layout)
    base = KVCache(tiny_model, make_policy("full"), record_prefill=True, tokenizer=word_tokenizer(), layout=layout)
    tiny_model(input_ids=ids, past_key_values=base, use_cache=True)
    derived = base.derive(build(row, 0.5))
    settle(tiny_model, derived, ids.tolist(), torch.tensor([30]))
    for a, b in zip(direct.layers, derived.layers):
        torch.testing.assert_close(a.storage.view().keys, b.storage.view().keys)
        assert held_positions(a.storage) == held_positions(b.storage)
    token = torch.tensor([[5]])
    after_direct = tiny_model(input_ids=token, past_key_values=direct, use_cache=True).logits
    after_derived = tiny_model(input_ids=token, past_key_values=derived, use_cache=True).logits
    torch.testing.assert_close(after_direct, after_derived)
    assert base.entries() == 30 * 2 * 2  # the base is untouched and can serve the next policy


@pytest.mark.parametrize("row", COMPRESSING, ids=lambda r: r.name)
def test_ratios_sharing_observed_state_equal_separate_derivation(tiny_model, row):
    ids, _ = left_padded([30], seed=6)
    base = KVCache(tiny_model, make_policy("full"), record_prefill=True, tokenizer=word_tokenizer())
    tiny_model(input_ids=ids, past_key_values=base, use_cache=True)
    observed: dict = {}
    positions = torch.tensor([30])
    for ratio in (0.25, 0.5, 0.75):
        shared = base.derive(build(row, ratio), observed)
        settle(tiny_model, shared, ids.tolist(), positions, observed)
        alone = base.derive(build(row, ratio))
        settle(tiny_model, alone, ids.tolist(), positions)
        for a, b in zip(shared.layers, alone.layers):
            assert held_positions(a.storage) == held_positions(b.storage)
            for name, state in a.storage.view().aux.items():
                torch.testing.assert_close(state, b.storage.view().aux[name])


@pytest.mark.parametrize("budget", [None, 7])
@pytest.mark.parametrize("row", COMPRESSING, ids=lambda r: r.name)
def test_chunked_prefill_holds_the_budget_after_every_chunk(tiny_model, row, budget):
    # A padded batch fed 5 tokens per row at a time; each chunk is compressed at once.
    rows = [left_padded([n], seed=n)[0][0].tolist() for n in LENGTHS]
    policy = build(row, 0.5) if budget is None else build(row, 0.0, budget=budget)
    cache = KVCache(tiny_model, policy, tokenizer=word_tokenizer())
    positions = torch.zeros(len(rows), dtype=torch.long)
    kept = [[0] * len(rows) for _ in cache.layers]  # per layer and sequence, for spread "depth"
    for start in range(0, max(LENGTHS), 5):
        _, positions = feed(tiny_model, cache, [r[start : start + 5] for r in rows], positions, "prefill")
        seen = [min(n, start + 5) for n in LENGTHS]
        target = [budget if budget else max(1, math.floor(s * 0.5)) for s in seen]
        for layer in range(len(cache.layers)):
            lengths = cache.kept_lengths(layer)
            if row.spread != "depth":
                assert_kept(row, lengths, target, layer, held=seen)
                continue
            # Each layer keeps its share of the target, once some row holds more than the target.
            held = [k + min(5, max(0, n - start)) for k, n in zip(kept[layer], LENGTHS)]
            if any(t < h for t, h in zip(target, held)):
                held = [min(expected_kept(row, t, layer), h) for t, h in zip(target, held)]
            kept[layer] = held
            assert lengths.tolist() == [[h] * 2 for h in held]
    assert cache.get_seq_length() == 24  # chunks of width 5, 5, 5, 5 and 4


@pytest.mark.parametrize("row", COMPRESSING, ids=lambda r: r.name)
def test_decode_budget_holds_after_every_step(tiny_model, row):
    cache = KVCache(tiny_model, build(row, 0.5, decode_budget=6, evict_every=3), tokenizer=word_tokenizer())
    logits = prefill_ids(tiny_model, cache, left_padded([30], seed=15)[0][0].tolist())[None]  # (1, vocab)
    positions = torch.tensor([30])
    for _ in range(20):
        logits, positions = feed(tiny_model, cache, [[int(logits[0].argmax())]], positions, DECODE)
        for layer in range(len(cache.layers)):
            assert int(cache.kept_lengths(layer).max()) <= 6 + 3 - 1
    assert cache.get_seq_length() == 50


@pytest.mark.parametrize("row", MATRIX, ids=lambda r: r.name)
def test_every_layout_keeps_and_predicts_what_the_ragged_one_does(tiny_model, row):
    ids, mask = left_padded(LENGTHS)
    policy = build(row, 0.5) if row.name == "full" else build(row, 0.5, evict_every=2)
    results = {}
    for layout in LAYOUTS:
        cache, logits = prefill_logits(tiny_model, policy, ids, mask, layout)
        steps = [logits] + decode(tiny_model, cache, logits, ids.shape[1], 5)
        results[layout] = (steps, [held_positions(layer.storage) for layer in cache.layers], cache.kept_nbytes)
    b, pos_b, kept_b = results.pop("ragged")
    for a, pos_a, kept_a in results.values():
        assert pos_a == pos_b and kept_a == kept_b
        for la, lb in zip(a, b):
            torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_bf16(tiny_model, tmp_path_factory):
    """The tiny model in bfloat16, calibrated for its own activations (calibrations are per dtype)."""
    import copy

    from kvforge.calibration.measure import calibrate
    from kvforge.models import LoadedModel

    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    mp = pytest.MonkeyPatch()
    mp.setenv("KVFORGE_CACHE", str(tmp_path_factory.mktemp("calibration-bf16")))
    try:
        calibrate(LoadedModel(model, word_tokenizer(), "tiny-bf16"))
    finally:
        mp.undo()
    return model


@pytest.mark.parametrize("quant", [None, "int4"])
@pytest.mark.parametrize("row", MATRIX, ids=lambda r: r.name)
def test_every_policy_runs_in_bfloat16_and_holds_half_the_bytes(tiny_model, tiny_bf16, row, quant):
    from kvforge.storage.codec import QuantSpec

    spec = QuantSpec(quant, group=8, residual=4) if quant else None
    ids, mask = left_padded(LENGTHS)
    with torch.inference_mode():
        cache, logits = prefill_logits(tiny_bf16, build(row, 0.5), ids, mask, quant=spec)
        steps = decode(tiny_bf16, cache, logits, ids.shape[1], 4)
        ref, ref_logits = prefill_logits(tiny_model, build(row, 0.5), ids, mask)
        decode(tiny_model, ref, ref_logits, ids.shape[1], 4)
    assert all(bool(torch.isfinite(s).all()) and s.dtype == torch.bfloat16 for s in [logits, *steps])
    assert cache.dense_nbytes * 2 == ref.dense_nbytes  # 2 bytes per element instead of 4
    if quant is None:
        assert cache.kept_nbytes * 2 == ref.kept_nbytes
        assert all(layer.storage.dtype == torch.bfloat16 for layer in cache.layers)
    # The prompt's last logits before any compression touched them agree to bfloat16's precision.
    torch.testing.assert_close(logits.float(), ref_logits, rtol=0.05, atol=0.05)
