"""Quantized storage: codecs, packed bytes, the residual window, eviction inside key groups, every
policy with every mode, and the option errors."""

from __future__ import annotations

import pytest
import torch

from conftest import held_positions, left_padded
from kvforge import KVCache, make_policy
from kvforge.generate import DECODE, feed
from kvforge.generate import prefill as prefill_ids
from kvforge.storage import QuantSpec, make_storage
from kvforge.storage.codec import dequantize_keys, dequantize_values, pack, quantize_keys, quantize_values, unpack
from kvforge.storage.quantized import QuantizedKV
from test_policy_matrix import MATRIX, build, decode, prefill_logits

CODECS = ["int8", "int4", "int2", "fp8"]
MODES = [*CODECS, "mixed"]
SPEC = dict(group=4, residual=4)  # the tiny model's head_dim is 16


def spec_of(mode: str) -> QuantSpec:
    """A spec that quantizes most of the matrix's short prompts: mixed seals 4 groups at a time."""
    return QuantSpec(mode, group=2, residual=0) if mode == "mixed" else QuantSpec(mode, **SPEC)


def max_error_bound(x: torch.Tensor, axis: int, spec: QuantSpec) -> torch.Tensor:
    """The worst-case absolute error per element: half a step for integers; for e4m3, 2**-4 of
    the value (3 mantissa bits) or the subnormal spacing of the group's scale, whichever is more."""
    if spec.asymmetric:
        span = x.amax(axis, keepdim=True) - x.amin(axis, keepdim=True)
        return span / ((1 << spec.bits) - 1) / 2 + 1e-3 * span + 1e-6  # + float16 rounding of the scale
    peak = x.abs().amax(axis, keepdim=True)
    return x.abs() * 2**-4 + peak / 448 * 2**-9 + 1e-3 * x.abs() + 1e-6


@pytest.mark.parametrize("mode", CODECS)
def test_pack_and_unpack_round_trip(mode):
    spec = QuantSpec(mode)
    codes = torch.randint(0, 1 << min(spec.bits, 8), (5, 64), dtype=torch.uint8)
    packed = pack(codes, spec.bits)
    assert packed.shape == (5, 64 * spec.bits // 8)
    assert torch.equal(unpack(packed, spec.bits), codes)


@pytest.mark.parametrize("mode", CODECS)
def test_round_trip_error_is_bounded_on_random_data(mode):
    spec = QuantSpec(mode, group=32)
    gen = torch.Generator().manual_seed(0)
    # Keys with an outlier channel (what per-channel key quantization is for).
    keys = torch.randn(2, 3, 32, 64, generator=gen) + torch.linspace(-8, 8, 64)
    codes, meta = quantize_keys(keys, spec)
    err = (dequantize_keys(codes, meta, spec) - keys).abs()
    assert bool((err <= max_error_bound(keys, -2, spec)).all())
    values = torch.randn(2, 3, 40, 64, generator=gen)
    codes, meta = quantize_values(values, spec)
    grouped = values.view(2, 3, 40, 2, 32)
    bound = max_error_bound(grouped, -1, spec).expand_as(grouped).reshape_as(values)
    assert bool(((dequantize_values(codes, meta, spec) - values).abs() <= bound).all())


@pytest.mark.parametrize("mode", CODECS)
def test_round_trip_error_on_real_model_keys_and_values(default_model, mode):
    model, tok = default_model.model, default_model.tokenizer
    text = "The special magic number for Lima is 8661386. Remember it well, and the sea is calm. " * 6
    ids = tok(text, return_tensors="pt").input_ids[:, :64]
    cache = KVCache(model, make_policy("full"))
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    view = cache.layers[3].storage.view()
    spec = QuantSpec(mode, group=32)
    n = 64
    keys, values = view.keys[:, :, :n], view.values[:, :, :n]
    codes, meta = quantize_keys(keys.unflatten(2, (-1, 32)), spec)
    err = (dequantize_keys(codes, meta, spec).flatten(2, 3) - keys).abs()
    grouped = keys.unflatten(2, (-1, 32))
    assert bool((err <= max_error_bound(grouped, -2, spec).expand_as(grouped).flatten(2, 3)).all())
    codes, meta = quantize_values(values, spec)
    rel = (dequantize_values(codes, meta, spec) - values).norm() / values.norm()
    assert float(rel) < {"int8": 0.01, "int4": 0.12, "int2": 0.6, "fp8": 0.05}[mode]


def test_packed_bytes_are_exact():
    spec = QuantSpec("int4", group=8, residual=4)
    storage = make_storage("inplace", 1, 2, 16, torch.float32, torch.device("cpu"), (), spec)
    assert isinstance(storage, QuantizedKV)
    n = 27
    storage.append(torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16), torch.arange(n), torch.ones(1, n, dtype=torch.bool))
    storage.seal()
    # 27 = 16 quantized (two key groups of 8) + 11 in the tail (>= residual 4, < 4 + 8).
    assert storage.parts[0].quant.lengths.tolist() == [[16, 16]] and storage.tail.lengths.tolist() == [[11, 11]]
    codes = 16 * 16 * 4 // 8  # 16 entries x 16 channels x 4 bits, for K and again for V
    value_meta = 16 * 2 * (16 // 8) * 2  # per entry: scale and minimum per 8 channels, float16
    key_meta = 2 * 2 * 16 * 2  # per group: scale and minimum per channel, float16
    tail = 11 * 2 * 16 * 4  # K and V in float32
    per_head = 2 * codes + value_meta + key_meta + tail
    assert storage.allocated_nbytes == 2 * per_head
    assert storage.seq_nbytes().tolist() == [2 * per_head]
    assert storage.entries == 2 * n


def test_residual_window_across_group_boundaries():
    spec = QuantSpec("int8", group=4, residual=3)
    storage = QuantizedKV(1, 1, 16, torch.float32, torch.device("cpu"), (), spec)
    keys = torch.randn(1, 1, 40, 16)
    for t in range(40):
        storage.append(keys[:, :, t : t + 1], keys[:, :, t : t + 1], torch.tensor([t]), torch.ones(1, 1, dtype=torch.bool))
        storage.seal()
        held, tail = t + 1, int(storage.tail.lengths)
        assert int(storage.parts[0].quant.lengths) % 4 == 0
        assert min(held, 3) <= tail < 3 + 4  # the recent entries stay exact
        view = storage.view()
        torch.testing.assert_close(view.keys[0, 0, held - tail : held], keys[0, 0, held - tail : held])
        assert view.positions[0, 0].tolist() == list(range(held))  # oldest first, none lost


def test_a_prompt_is_quantized_whole_but_its_open_key_group():
    keys = torch.randn(1, 2, 27, 16)
    held = {}
    for prompt_residual in (False, True):
        spec = QuantSpec("int4", group=8, residual=8, prompt_residual=prompt_residual)
        storage = QuantizedKV(1, 2, 16, torch.float32, torch.device("cpu"), (), spec)
        storage.append(keys, keys, torch.arange(27), torch.ones(1, 27, dtype=torch.bool))
        storage.seal(prompt=True)
        held[prompt_residual] = storage.parts[0].quant.lengths.tolist(), storage.tail.lengths.tolist()
        # A decoding step's entry stays in full precision until residual + a group of them wait.
        storage.append(keys[:, :, :1], keys[:, :, :1], torch.tensor([27]), torch.ones(1, 1, dtype=torch.bool))
        storage.seal()
        assert storage.tail.lengths.tolist() == [[held[prompt_residual][1][0][0] + 1] * 2]
    assert held[False] == ([[24, 24]], [[3, 3]])  # 27 = three key groups of 8, then 3 open
    assert held[True] == ([[16, 16]], [[11, 11]])  # the old way: residual 8 <= tail < 8 + 8


@pytest.mark.parametrize("layout", ["inplace", "paged"])
@pytest.mark.parametrize("policy", ["knorm", "kvzip", "full"])
def test_a_compressed_prompt_keeps_no_full_precision_tail_but_the_question_does(tiny_model, layout, policy):
    """After the prompt's last compression (at once, or deferred as kvzip's) every row's tail is
    its open key group; the question appended after it stays in full precision (residual)."""
    spec = QuantSpec("int4", group=4, residual=8)
    ids, mask = left_padded([40, 33])
    cache, logits = prefill_logits(tiny_model, build_policy(policy), ids, mask, layout, quant=spec)
    for layer in cache.layers:
        picture = layer.storage._picture() if layout == "paged" else layer.storage
        assert int(picture.tail.lengths.max()) < 4
    before = [int(layer.storage.lengths.sum()) for layer in cache.layers]
    feed(tiny_model, cache, [[5, 6, 7], [8, 9, 10]], torch.full((2,), ids.shape[1]))
    for layer, n in zip(cache.layers, before):
        picture = layer.storage._picture() if layout == "paged" else layer.storage
        assert int(layer.storage.lengths.sum()) == n + 2 * 3 * layer.storage.kv_heads
        assert int(picture.tail.lengths.min()) >= 3  # the question's entries, not yet sealed


def test_by_default_appended_entries_are_quantized_once_their_key_group_is_complete():
    """The default residual is 0: after the prompt, only each row's open key group (fewer than
    `group` entries) is held in full precision, whatever was appended since."""
    assert QuantSpec("int4").residual == 0
    spec = QuantSpec("int4", group=8)
    keys = torch.randn(1, 2, 27, 16)
    storage = QuantizedKV(1, 2, 16, torch.float32, torch.device("cpu"), (), spec)
    storage.append(keys, keys, torch.arange(27), torch.ones(1, 27, dtype=torch.bool))
    storage.seal(prompt=True)
    tails = []
    for step in range(6):  # 3 open + 6 appended = 9: one more group of 8 sealed on the fifth step
        storage.append(keys[:, :, :1], keys[:, :, :1], torch.tensor([27 + step]), torch.ones(1, 1, dtype=torch.bool))
        storage.seal()
        tails.append(storage.tail.lengths[0, 0].item())
    assert tails == [4, 5, 6, 7, 0, 1]
    assert storage.parts[0].quant.lengths.tolist() == [[32, 32]]


def build_policy(name: str):
    return make_policy(name) if name == "full" else make_policy(name, ratio=0.5)


def test_eviction_inside_a_key_group_is_exact_and_frees_codes():
    spec = QuantSpec("int4", group=4, residual=0)
    storage = QuantizedKV(1, 2, 16, torch.float32, torch.device("cpu"), ("score",), spec)
    n = 12
    storage.append(torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16), torch.arange(n), torch.ones(1, n, dtype=torch.bool))
    storage.seal()
    assert storage.tail.entries == 0 and storage.parts[0].groups.lengths.tolist() == [[3, 3]]
    before = storage.view()
    before_keys, before_values = before.keys, before.values  # (views build K/V on first use)
    before_bytes = storage.allocated_nbytes
    # Head 0 keeps slots 1, 2 (group 0) and 9 (group 2); head 1 keeps 0..3 (group 0 only).
    index = torch.tensor([[[1, 2, 9, 0], [0, 1, 2, 3]]])
    mask = torch.tensor([[[True, True, True, False], [True, True, True, True]]])
    storage.keep(before, index, mask)
    after = storage.view()
    assert storage.lengths.tolist() == [[3, 4]]
    assert storage.parts[0].groups.lengths.tolist() == [[2, 1]]  # group 1 of head 0 emptied and left
    assert storage.parts[0].groups.fields["count"].tolist() == [2, 1, 4]
    assert after.positions[0, 0, :3].tolist() == [1, 2, 9]
    # Kept entries dequantize exactly as before: no requantization.
    torch.testing.assert_close(after.keys[0, 0, :3], before_keys[0, 0, [1, 2, 9]])
    torch.testing.assert_close(after.values[0, 1, :4], before_values[0, 1, :4])
    per_entry = 2 * 16 * 4 // 8 + 2 * 2 * (16 // 4)  # codes of K and V, value scales and minimums
    per_group = 2 * 16 * 2
    assert storage.allocated_nbytes == 7 * per_entry + 3 * per_group
    assert before_bytes == 24 * per_entry + 6 * per_group


@pytest.mark.parametrize("layout", ["inplace", "paged"])
@pytest.mark.parametrize("queries", [1, 5])
def test_ragged_groups_are_attended_as_their_dequantized_entries(layout, queries):
    """Rows holding different numbers of key groups, groups missing evicted entries: attention and
    the attention each entry received equal the dense math over the dequantized entries."""
    from kvforge.reading import attention_probs_sum, causal_allowed
    from kvforge.reading import attend as dense_attend

    spec = QuantSpec("int4", group=4, residual=2)
    storage = make_storage(layout, 2, 2, 16, torch.float32, torch.device("cpu"), ("score",), spec)
    gen = torch.Generator().manual_seed(3)
    n = 23
    storage.append(torch.randn(2, 2, n, 16, generator=gen), torch.randn(2, 2, n, 16, generator=gen), torch.arange(n), torch.ones(2, n, dtype=torch.bool))
    storage.seal()
    view = storage.view()
    keep = torch.rand(2, 2, n, generator=gen) < torch.tensor([0.9, 0.4, 0.6, 0.2]).view(2, 2, 1)  # rows of unequal counts
    index = torch.arange(n).expand(2, 2, n)
    storage.keep(view, index, keep)
    t = queries
    storage.append(torch.randn(2, 2, t, 16, generator=gen), torch.randn(2, 2, t, 16, generator=gen), torch.arange(n, n + t), torch.ones(2, t, dtype=torch.bool))
    quantized = (storage.parts[0].quant if layout == "inplace" else storage.parts[0].meta).entries
    assert len(set(storage.lengths.flatten().tolist())) > 1 and quantized > 0
    view = storage.view()
    query = torch.randn(2, 4, t, 16, generator=gen)
    positions, valid = torch.arange(n, n + t), torch.ones(2, t, dtype=torch.bool)
    allowed = causal_allowed(view.positions, view.valid, positions)
    want = dense_attend(query, view.keys, view.values, allowed, 0.25)
    torch.testing.assert_close(storage.attend(query, positions, valid, 0.25), want, rtol=1e-4, atol=1e-5)
    storage.accumulate_attention("score", query, positions, valid, 0.25)
    got = storage.view().aux["score"].masked_fill(~view.valid, 0.0)  # (padding slots show any entry)
    torch.testing.assert_close(got, attention_probs_sum(query, view.keys, allowed, valid.float(), 0.25).masked_fill(~view.valid, 0.0), rtol=1e-4, atol=1e-5)


def test_int8_greedy_output_equals_full_precision_on_the_real_model(default_model):
    model, tok = default_model.model, default_model.tokenizer
    ids = tok("Write three sentences about the sea, the wind and the boats that sail between the islands.", return_tensors="pt").input_ids
    outs = []
    for quant in (None, QuantSpec("int8", group=8, residual=0)):
        cache = KVCache(model, make_policy("full"), quant=quant)
        with torch.inference_mode():
            outs.append(model.generate(ids, past_key_values=cache, max_new_tokens=24, do_sample=False))
    assert torch.equal(outs[0], outs[1])
    # 8-bit codes, float16 scales and minimums per 8 tokens or channels (4 bits), a float32 tail under 8.
    assert 12 <= cache.bits_per_element < 16


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("row", MATRIX, ids=lambda r: r.name)
def test_every_policy_composes_with_every_mode(tiny_model, row, mode):
    """The policy decides what is kept, the storage how: the same entries as the full-precision
    cache after the prompt (the policy acts before its chunk is quantized), the same budgets while
    decoding, and fewer bytes."""
    ids, mask = left_padded([24, 17])
    policy = build(row, 0.5) if row.name == "full" else build(row, 0.5, evict_every=2)
    plain, logits = prefill_logits(tiny_model, policy, ids, mask)
    quant, q_logits = prefill_logits(tiny_model, policy, ids, mask, quant=spec_of(mode))
    assert [held_positions(a.storage) for a in plain.layers] == [held_positions(b.storage) for b in quant.layers]
    assert quant.nbytes < plain.nbytes
    decode(tiny_model, plain, logits, ids.shape[1], 5)
    decode(tiny_model, quant, q_logits, ids.shape[1], 5)
    for a, b in zip(plain.layers, quant.layers):
        assert a.storage.lengths.tolist() == b.storage.lengths.tolist()
        view = b.storage.view()
        assert bool((view.positions[view.valid] < ids.shape[1] + 5).all())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("row", [r for r in MATRIX if r.name in ("full", "knorm", "h2o", "adakv:snapkv", "kvzip")], ids=lambda r: r.name)
def test_each_sequence_of_a_batch_is_quantized_on_its_own(tiny_model, row, mode):
    lengths = [24, 17]
    spec = spec_of(mode)
    batch, _ = prefill_logits(tiny_model, build(row, 0.5), *left_padded(lengths), quant=spec)
    width = max(lengths)
    for b, n in enumerate(lengths):
        ids, mask = left_padded(lengths)
        alone, _ = prefill_logits(tiny_model, build(row, 0.5), ids[b : b + 1, -n:], mask[b : b + 1, -n:], quant=spec)
        for la, lb in zip(batch.layers, alone.layers):
            va, vb = la.storage.view(), lb.storage.view()
            assert (va.positions[b][va.valid[b]] - (width - n)).tolist() == vb.positions[0][vb.valid[0]].tolist()
        assert batch.seq_nbytes()[b] == alone.seq_nbytes()[0]


def test_int8_decoding_stays_close_to_full_precision(tiny_model):
    ids, mask = left_padded([40, 33])
    policy = make_policy("full")
    plain, logits = prefill_logits(tiny_model, policy, ids, mask)
    quant, q_logits = prefill_logits(tiny_model, policy, ids, mask, quant=QuantSpec("int8", group=4, residual=0))
    torch.testing.assert_close(logits, q_logits)  # the prompt is attended in full precision
    a = decode(tiny_model, plain, logits, ids.shape[1], 4)
    b = decode(tiny_model, quant, logits, ids.shape[1], 4)
    for la, lb in zip(a, b):
        torch.testing.assert_close(la, lb, rtol=0.02, atol=0.02)


def test_chunked_prefill_and_decode_budget_hold_with_quantization(tiny_model):
    spec = QuantSpec("int4", **SPEC)
    cache = KVCache(tiny_model, make_policy("knorm", ratio=0.5, decode_budget=10, evict_every=3), quant=spec)
    row = left_padded([30], seed=15)[0][0].tolist()
    logits = prefill_ids(tiny_model, cache, row, chunk=6)[None]
    assert int(cache.kept_lengths(0).max()) <= 15
    positions = torch.tensor([30])
    for _ in range(12):
        logits, positions = feed(tiny_model, cache, [[int(logits[0].argmax())]], positions, DECODE)
        assert int(cache.kept_lengths(0).max()) <= 10 + 3 - 1


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(mode="int3"), "quant"), (dict(mode="int4", group=0), "quant-group"), (dict(mode="int4", residual=-1), "quant-residual")],
)
def test_bad_options_name_the_option(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        QuantSpec(**kwargs)
    assert "\n" not in str(err.value)


def test_a_group_that_does_not_divide_head_dim_is_refused(tiny_model):
    with pytest.raises(ValueError, match="quant-group 6 does not divide head_dim 16"):
        KVCache(tiny_model, make_policy("full"), quant=QuantSpec("int4", group=6))


def test_quantized_modes_share_what_a_policy_observed_of_the_prefill(tiny_model):
    """A prompt is observed (kvzip's passes included) before it is quantized, so an eval derives
    every mode from what the first one observed."""
    from conftest import word_tokenizer
    from kvforge.generate import settle

    ids, _ = left_padded([30], seed=6)
    base = KVCache(tiny_model, make_policy("full"), record_prefill=True, tokenizer=word_tokenizer())
    tiny_model(input_ids=ids, past_key_values=base, use_cache=True)
    positions = torch.tensor([30])
    observed: dict = {}
    for mode in ("int4", "int2", "fp8", "mixed"):
        policy = make_policy("kvzip", ratio=0.5, chunk=8)
        shared = base.derive(policy, observed, spec_of(mode))
        settle(tiny_model, shared, ids.tolist(), positions, observed)
        alone = base.derive(policy, None, spec_of(mode))
        settle(tiny_model, alone, ids.tolist(), positions)
        assert [held_positions(a.storage) for a in shared.layers] == [held_positions(b.storage) for b in alone.layers]
        assert shared.nbytes == alone.nbytes < base.nbytes / 2


def test_mixed_holds_the_entries_that_matter_most_with_more_bits():
    spec = QuantSpec("mixed", group=4, residual=0, split=0.25)
    assert spec.batch == (4, 1)  # four key groups sealed at once: one int4, three int2
    storage = QuantizedKV(1, 2, 16, torch.float32, torch.device("cpu"), (), spec)
    assert storage.wants_importance
    n = 32
    keys, values = torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16)
    storage.append(keys, values, torch.arange(n), torch.ones(1, n, dtype=torch.bool))
    important = torch.zeros(1, 2, n)
    chosen = [1, 3, 5, 9, 16, 20, 27, 31]  # four of each 16 sealed at once
    important[..., chosen] = 1.0
    storage.seal(lambda: important)
    high, low = storage.parts
    assert high.spec.mode == "int4" and low.spec.mode == "int2"
    assert high.quant.lengths.tolist() == [[8, 8]] and low.quant.lengths.tolist() == [[24, 24]]
    assert storage.tail.entries == 0
    assert high.quant.padded("pos")[0, 0].tolist() == chosen  # in time order within the part
    view = storage.view()
    assert view.positions[0, 0].tolist() == list(range(n))  # the view interleaves them in time
    err = (view.keys - keys).abs().amax(-1)[0, 0]  # per entry
    span = keys.amax() - keys.amin()
    assert float(err[chosen].max()) <= float(span) / 15  # int4 steps
    assert float(err.max()) <= float(span) / 3  # int2 steps
    per_entry_4, per_entry_2 = 2 * 16 * 4 // 8 + 2 * 2 * (16 // 4), 2 * 16 * 2 // 8 + 2 * 2 * (16 // 4)
    per_group = 2 * 16 * 2
    assert storage.allocated_nbytes == 2 * (8 * per_entry_4 + 24 * per_entry_2 + 8 * per_group)


def test_mixed_bytes_lie_between_int2_and_int4():
    held = {}
    for mode in ("int4", "mixed", "int2"):
        storage = QuantizedKV(1, 2, 16, torch.float32, torch.device("cpu"), (), QuantSpec(mode, group=4, residual=0))
        storage.append(torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16), torch.arange(64), torch.ones(1, 64, dtype=torch.bool))
        storage.seal()  # mixed without an importance: the smaller the key norm, the more it matters
        assert storage.tail.entries == 0
        held[mode] = storage.allocated_nbytes
    assert held["int2"] < held["mixed"] < held["int4"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("row", MATRIX, ids=lambda r: r.name)
def test_codes_over_blocks_keep_and_predict_what_the_flat_quantized_layout_does(tiny_model, row, mode):
    """The paged layout with a quantization mode holds its codes in a codec memory's blocks and
    its tail in the K/V memory's: the same entries, the same logits (prompt and decoding with a
    budget that evicts quantized entries), and no more than a block's slack per row beyond."""
    ids, mask = left_padded([24, 17])
    policy = build(row, 0.5) if row.name == "full" else build(row, 0.5, evict_every=2)
    results = {}
    with torch.inference_mode():
        for layout in ("inplace", "paged"):
            cache, logits = prefill_logits(tiny_model, policy, ids, mask, layout, quant=spec_of(mode))
            positions = [held_positions(layer.storage) for layer in cache.layers]
            results[layout] = ([logits, *decode(tiny_model, cache, logits, ids.shape[1], 5)], positions, cache)
    (flat_logits, flat_positions, flat), (paged_logits, paged_positions, paged) = results["inplace"], results["paged"]
    assert paged_positions == flat_positions
    for a, b in zip(flat_logits, paged_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [layer.storage.lengths.tolist() for layer in paged.layers] == [layer.storage.lengths.tolist() for layer in flat.layers]
    assert type(paged.layers[0].storage).__name__ == "PagedQuantKV"


def test_a_quantized_fork_holds_no_second_copy_of_its_codes(tiny_model):
    from kvforge.memory.kvmemory import KVMemory

    ids, mask = left_padded([40, 33])
    spec = QuantSpec("int4", **SPEC)
    memory = KVMemory(16, torch.float32, "cpu")  # the tiny model's head_dim: codes and tail share its blocks
    with torch.inference_mode():
        cache = KVCache(tiny_model, make_policy("knorm", ratio=0.5), layout="paged", quant=spec, memory=memory)
        logits = tiny_model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]
        storage = cache.layers[0].storage
        assert storage.parts[0].memory is memory and storage.parts[0].rows[0].groups  # codes are held in blocks
        held, used = cache.nbytes, memory.pool.num_used
        assert held == used * memory.block_nbytes  # bytes are the blocks' (one layer's blocks are its own)
        forks = [cache.fork() for _ in range(4)]
        assert memory.pool.num_used == used  # the forks stand on the same blocks
        assert all(f.nbytes == held for f in forks)  # each counts what it holds
        first = decode(tiny_model, forks[0], logits, ids.shape[1], 6)  # writes, and seals new groups
        second = decode(tiny_model, forks[1], logits, ids.shape[1], 6)  # reads the blocks fork 0 shared
        for a, b in zip(first, second):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        del forks, first, second
        assert memory.pool.num_used == used
    del cache, storage
    assert memory.pool.num_used == 0


def test_a_quantized_cache_swapped_out_and_in_decodes_exactly_as_one_that_stayed(tiny_model):
    from kvforge.memory.kvmemory import KVMemory

    ids, mask = left_padded([40, 33])
    spec = QuantSpec("mixed", group=2, residual=0)
    memory = KVMemory(16, torch.float32, "cpu", num_blocks=256)  # bounded, as an engine's
    with torch.inference_mode():
        stayed, logits = prefill_logits(tiny_model, make_policy("knorm", ratio=0.5), ids, mask, "paged", quant=spec)
        want = decode(tiny_model, stayed, logits, ids.shape[1], 4)
        moved, _ = prefill_logits(tiny_model, make_policy("knorm", ratio=0.5), ids, mask, "paged", quant=spec)
        held = moved.nbytes
        swapped = moved.swap_out("cpu")
        assert moved.nbytes == 0
        assert sum(part.nbytes for part in swapped) == held  # bytes as they were: codes stay codes
        moved.memory = memory  # into a bounded memory of its own
        moved.swap_in(swapped)
        assert memory.pool.num_used * memory.block_nbytes == moved.nbytes == held
        got = decode(tiny_model, moved, logits, ids.shape[1], 4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_label_names_its_group_where_it_is_not_the_default():
    assert QuantSpec.parse("int4/g16").group == 16 and QuantSpec.parse("int4/g16").label == "int4/g16"
    assert QuantSpec.parse("int4", group=16).label == "int4/g16"  # --quant-group 16
    assert QuantSpec.parse("int4/g8", group=16).group == 8  # the label's own group wins
    assert QuantSpec.parse("int4").label == "int4" and QuantSpec.parse("int4/g32").label == "int4"
    assert QuantSpec.parse("centroid0.25", group=16).label == "centroid0.25"  # nothing quantized: no group
    spec = QuantSpec.parse("int4/g16/r32/centroid0.125")
    assert (spec.group, spec.rank, spec.read, spec.label) == (16, 32, 0.125, "int4/g16/r32/centroid0.125")
    with pytest.raises(ValueError, match="--quant-group must be a positive integer"):
        QuantSpec.parse("int4/g0")


def reachable_tensors(obj: object, seen: set[int] | None = None) -> list[torch.Tensor]:
    """Every tensor an object holds through attributes, dataclass fields, lists and dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.nn.Module)):
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    children = list(obj.values()) if isinstance(obj, dict) else list(obj) if isinstance(obj, (list, tuple, set)) else list(getattr(obj, "__dict__", {}).values())
    return [t for child in children for t in reachable_tensors(child, seen)]


@pytest.mark.parametrize("quant", [None, QuantSpec("int4", **SPEC)], ids=["none", "int4"])
@pytest.mark.parametrize("layout", ["inplace", "paged"])
def test_decoding_a_ragged_cache_holds_no_keys_values_or_codes_it_does_not_count(tiny_model, layout, quant):
    """Rows of different lengths are read through a padded picture (of their codes; the paged
    layout: gathered from its blocks): made for one attention call, never kept beside what is
    held (it would hold it twice, uncounted). Every tensor of head_dim-wide rows a decoding cache
    holds is counted in its buffers, or is the block memory's own arena (the pool: its blocks
    are what a cache counts)."""
    cache = KVCache(tiny_model, make_policy("adakv:knorm", ratio=0.5), quant=quant, layout=layout)
    row = left_padded([40], seed=16)[0][0].tolist()
    logits = prefill_ids(tiny_model, cache, row)[None]
    positions = torch.tensor([40])
    for _ in range(3):
        logits, positions = feed(tiny_model, cache, [[int(logits[0].argmax())]], positions, DECODE)
    storages = [layer.storage for layer in cache.layers]
    assert any(len(set(s.lengths.flatten().tolist())) > 1 for s in storages)  # ragged: the padded path ran
    holders = [h for s in storages for h in [s, *getattr(s, "parts", []), getattr(s, "tail", None)]]  # paged: block rows
    pool = {t.untyped_storage().data_ptr() for h in holders if hasattr(h, "memory") for t in reachable_tensors(h.memory.store)}
    counted = set(cache.buffers()) | pool
    rows = [t for s in storages for t in reachable_tensors(s) if t.numel() and t.dim() >= 2 and t.shape[-1] == 16]
    assert rows and all(t.untyped_storage().data_ptr() in counted for t in rows)


def test_whole_groups_in_ragged_rows_are_padded_as_the_scatter_pads_them(tiny_model):
    from kvforge.storage.qpart import _padded_rows, _scatter_groups

    cache = KVCache(tiny_model, make_policy("adakv:knorm", ratio=0.5), quant=QuantSpec("int4", **SPEC))
    prefill_ids(tiny_model, cache, left_padded([40], seed=17)[0][0].tolist())
    parts = [p for layer in cache.layers for p in layer.storage.parts if p.quant.entries]
    ragged = [p for p in parts if p.quant.uniform() is None and bool((p.groups.fields["count"] == 4).all())]
    assert ragged  # head-wise budgets, whole groups: the fast path's case
    for part in ragged:
        fast, scattered = _padded_rows(part), _scatter_groups(part)
        assert torch.equal(fast.valid, scattered.valid) and torch.equal(fast.index, scattered.index)
        valid = fast.valid
        assert torch.equal(fast.vc[valid], scattered.vc[valid]) and torch.equal(fast.vm[valid], scattered.vm[valid])
        assert torch.equal(fast.kc.flatten(2, 3)[valid], scattered.kc.flatten(2, 3)[valid])
        whole = valid.view(*valid.shape[:2], -1, 4)[..., 0]  # (b, h, NG): groups a row holds
        assert torch.equal(fast.km[whole], scattered.km[whole])
