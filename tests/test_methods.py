"""What each method promises beyond the shared matrix: its own selection rule, checked directly."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import held_positions, left_padded, word_tokenizer
from kvforge import KVCache, make_policy
from kvforge.attention import output_projection
from kvforge.generate import feed, greedy, settle
from kvforge.generate import prefill as prefill_ids
from kvforge.reconstruct import passes
from kvforge.policies.base import StepContext
from kvforge.storage import make_storage


def storage_with(keys: torch.Tensor, positions: torch.Tensor | None = None):
    """An in-place storage holding `keys` (batch, heads, n, dim) as K and V, one chunk."""
    batch, heads, n, dim = keys.shape
    store = make_storage("inplace", batch, heads, dim, keys.dtype, keys.device, ())
    pos = torch.arange(n) if positions is None else positions
    store.append(keys, keys, pos, torch.ones(batch, n, dtype=torch.bool))
    return store


def context(store, budget: int, query: torch.Tensor | None = None) -> StepContext:
    batch, heads = store.lengths.shape
    n = int(store.lengths.max())
    q = query if query is not None else torch.zeros(batch, heads, 1, store.head_dim)
    ctx = StepContext(0, store, q, torch.tensor([n - 1]), torch.ones(batch, 1, dtype=torch.bool), 1.0)
    ctx.budget = ctx.target = torch.full((batch, heads), budget)
    return ctx


def test_adakv_heads_hold_different_counts_and_the_bytes_are_the_entries(tiny_model):
    ids, mask = left_padded([40, 33], seed=11)
    cache = KVCache(tiny_model, make_policy("adakv:snapkv", ratio=0.75, window=2, floor=0.0))
    tiny_model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    lengths = torch.stack([cache.kept_lengths(i) for i in range(2)])  # (layers, batch, heads)
    assert lengths.sum(-1)[:, :].tolist() == [[20, 16], [20, 16]]  # 2 heads x 10 and x 8 per layer
    assert bool((lengths[..., 0] != lengths[..., 1]).any()), "every head kept the same count"
    assert cache.nbytes == cache.kept_nbytes == cache.entries() * 2 * 16 * 4


def test_adakv_spends_the_layer_budget_on_the_highest_scores():
    # Head 0's keys have small norms (knorm keeps them), head 1's large: with no floor head 0
    # takes the whole layer budget, with floor 0.5 head 1 keeps half of its even share.
    keys = torch.cat([torch.full((1, 1, 8, 4), 0.1), torch.full((1, 1, 8, 4), 5.0)], 1)
    for floor, want in ((0.0, [8, 0]), (0.5, [6, 2])):
        store = storage_with(keys)
        ctx = context(store, 4)
        index, mask = make_policy("adakv:knorm", floor=floor).select(ctx)
        assert mask.sum(-1).tolist() == [want]


def test_chunk_keeps_whole_spans():
    # One high-scoring token in span 1 (positions 3..5): its whole span is kept, not its neighbours.
    keys = torch.full((1, 1, 12, 4), 3.0)
    keys[0, 0, 4] = 0.1  # knorm: the lowest norm scores highest
    store = storage_with(keys)
    index, mask = make_policy("chunk:knorm", size=3).select(context(store, 3))
    assert sorted(index[mask].tolist()) == [3, 4, 5]


def test_smooth_keeps_the_neighbours_of_a_high_score():
    # knorm scores every key 3.0 alike but position 5's (0.1): pooling over 3 lifts positions 4
    # and 6 with it, so a budget of 3 keeps the span 4..6 whole (mean and max alike). The slots are
    # held out of position order: neighbours are by position, not by slot.
    keys = torch.full((1, 1, 10, 4), 3.0)
    positions = torch.tensor([9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    keys[0, 0, 4] = 0.1  # position 5
    store = storage_with(keys, positions)
    for pool in ("avg", "max"):
        index, mask = make_policy("smooth:knorm", kernel=3, pool=pool).select(context(store, 3))
        assert sorted(positions[index[mask]].tolist()) == [4, 5, 6]
    # kernel 1 is the wrapped policy itself
    ctx = context(store, 3)
    torch.testing.assert_close(make_policy("smooth:knorm", kernel=1).score(ctx), make_policy("knorm").score(ctx))


def test_smooth_averages_the_scores_it_has_and_keeps_infinite_ones_alone():
    from kvforge.policies.smooth import pool_along

    inf = float("inf")
    scores = torch.tensor([[1.0, 4.0, -inf, 7.0, 2.0]])  # -inf: no score
    assert pool_along(scores, 3, "avg").tolist() == [[2.5, 2.5, 5.5, 4.5, 4.5]]
    assert pool_along(scores, 3, "max").tolist() == [[4.0, 4.0, 7.0, 7.0, 7.0]]
    # kvzip's sinks (slot 0) score +inf: they stay +inf and their neighbour keeps its own score
    store = make_storage("inplace", 1, 1, 4, torch.float32, torch.device("cpu"), ("kvzip",))
    store.append(torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4), torch.arange(6), torch.ones(1, 6, dtype=torch.bool))
    ctx = context(store, 3)
    kvzip = make_policy("kvzip", sinks=1)
    store.set_aux("kvzip", ctx.view, torch.tensor([[[0.0, 0.1, 0.2, 0.9, 0.3, 0.05]]]))
    smoothed = make_policy("smooth:kvzip", sinks=1, kernel=3, pool="max").score(ctx)
    assert kvzip.score(ctx)[0, 0, 0] == inf
    torch.testing.assert_close(smoothed, torch.tensor([[[inf, 0.2, 0.9, 0.9, 0.9, 0.3]]]))


def test_one_threshold_over_layers_keeps_exactly_the_budget_through_ties():
    from kvforge.policies.budgets import threshold_over_layers

    inf = float("inf")
    # Two layers, one sequence, two heads: a budget of 2 + 2 + 1 + 1 = 6 over scores that tie at
    # the threshold (0.5 four times): exactly 6 are kept, the sinks (+inf) and the 0.9s first.
    scores = [torch.tensor([[[inf, 0.9, 0.5, 0.1], [0.5, 0.5, 0.2, 0.1]]]), torch.tensor([[[inf, 0.5, 0.3, 0.0], [0.9, 0.1, 0.0, -inf]]])]
    targets = [torch.tensor([[2, 2]]), torch.tensor([[1, 1]])]
    counts = threshold_over_layers(scores, targets)
    assert sum(int(c.sum()) for c in counts) == 6
    assert counts[0][0, 0] >= 2 and counts[1][0].tolist()[1] == 1  # inf + 0.9; layer 1's 0.9
    # more +inf entries than the budget: all of them are kept
    assert [c.tolist() for c in threshold_over_layers([torch.full((1, 1, 3), inf)], [torch.tensor([[1]])])] == [[[3]]]


def test_compactor_sketch_approximates_exact_leverage():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 1, 200, 8, generator=gen) * torch.linspace(0.1, 3, 8)
    keys[0, 0, 17] = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0.0]) + 4.0 * torch.eye(8)[0]  # a rare direction
    ctx = context(storage_with(keys), 10)
    approx = make_policy("compactor", oversample=8).score(ctx)[0, 0]
    k = keys[0, 0].double()
    exact = ((k @ torch.linalg.inv(k.T @ k)) * k).sum(-1).float()
    assert int(approx.argmax()) == int(exact.argmax()) == 17
    assert torch.corrcoef(torch.stack([approx, exact]))[0, 1] > 0.9
    again = make_policy("compactor", oversample=8).score(ctx)[0, 0]
    assert torch.equal(approx, again)  # seeded: the same scores every time


def test_keydiff_keeps_the_key_least_like_the_others():
    keys = torch.ones(1, 1, 6, 4)
    keys[0, 0, 2] = torch.tensor([1.0, -1.0, 1.0, -1.0])
    score = make_policy("keydiff").score(context(storage_with(keys), 1))
    assert int(score[0, 0].argmax()) == 2


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("adakv", {}, "'adakv' wraps another policy"),
        ("knorm:snapkv", {}, "does not wrap another policy"),
        ("adakv:nope", {}, "unknown policy 'nope'"),
        ("adakv:snapkv", {"floor": 1.5}, "floor=1.5 is outside the allowed range"),
        ("chunk:snapkv", {"size": 0}, "size=0 is outside the allowed range"),
        ("pyramidkv:knorm", {"beta": 0.5}, "beta=0.5 is outside the allowed range"),
        ("adakv:chunk:snapkv", {"zzz": 1}, "has no parameter 'zzz'"),
        ("expected_attention", {"budget": 3}, "below the minimum of 64 entries"),
        ("kvzip", {"spread": "everywhere"}, "spread='everywhere' is not one of 'model', 'layer', 'head'"),
        ("smooth:knorm", {"kernel": 4}, "kernel=4 must be odd"),
        ("smooth:knorm", {"pool": "median"}, "pool='median' is not one of 'avg', 'max'"),
        ("smooth:adakv:knorm", {}, "put the other wrapper outside, e.g. adakv:smooth:knorm"),
    ],
)
def test_bad_names_and_hyperparameters_give_one_line_errors(name, params, message):
    with pytest.raises(ValueError, match=message) as err:
        make_policy(name, **params)
    assert "\n" not in str(err.value)


def test_composed_parameters_reach_the_policy_that_has_them():
    policy = make_policy("adakv:chunk:snapkv", ratio=0.6, floor=0.3, size=7, window=9)
    assert (policy.ratio, policy.floor, policy.wrapped.size, policy.wrapped.wrapped.window) == (0.6, 0.3, 7, 9)
    assert policy.full_name == "adakv:chunk:snapkv"
    assert policy.min_budget() == 9  # snapkv's window, whoever wraps it


@pytest.mark.parametrize("chunk", [40, 16])
def test_kvzip_scores_are_the_reconstruction_attention(tiny_model, chunk):
    """Each context entry's score is the most attention any query of the pass repeating its
    piece pays it (max over queries and the GQA group's heads), the softmax taken over the
    sinks, the piece and the pass's own tokens: re-derived from transformers' eager attention."""
    n, sinks = 36, 2
    ids = left_padded([n], seed=21)[0][0].tolist()
    policy = make_policy("kvzip", ratio=0.0, chunk=chunk, sinks=sinks)
    cache = KVCache(tiny_model, policy, tokenizer=word_tokenizer())
    with torch.inference_mode():
        prefill_ids(tiny_model, cache, ids)
    got = [layer.storage.view().aux["kvzip"][0] for layer in cache.layers]  # (kv_heads, n) per layer
    eager = copy.deepcopy(tiny_model)
    eager.set_attn_implementation("eager")
    kv_heads = tiny_model.config.num_key_value_heads
    for piece in passes(word_tokenizer(), policy.reconstruction(), [ids]):
        start, end, probe = piece.starts[0], piece.ends[0], piece.rows[0]
        with torch.inference_mode():
            probs = eager(input_ids=torch.tensor([ids + probe]), output_attentions=True).attentions
        columns = torch.zeros(n + len(probe), dtype=torch.bool)
        columns[:sinks] = columns[start:end] = columns[n:] = True
        for layer, p in enumerate(probs):
            rows = p[0, :, n:][..., columns]  # (q_heads, probe, in the softmax)
            rows = rows / rows.sum(-1, keepdim=True)
            lo = max(start, sinks)  # selected columns: the sinks, then the rest of the piece, then the pass
            span = rows[..., sinks : sinks + end - lo]
            want = span.amax(1).view(kv_heads, -1, span.shape[-1]).amax(1)  # (kv_heads, piece)
            torch.testing.assert_close(got[layer][:, lo:end], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("projected", [True, False])
def test_restkv_scores_how_far_dropping_an_entry_moves_the_outputs(projected):
    """probe_attention's "output" score, re-derived by brute force: for every query (of every
    head of the GQA group) take the entry out of the scoring softmax, recompute the output and
    measure how far the head's share of the output projection moved (or the output itself,
    without one); an entry scores the most of these. Two KV heads, two query heads each, a
    batch of two whose second row has a padding query; entries outside `scored` get 0."""
    from kvforge.reading import probe_attention

    torch.manual_seed(5)
    batch, kv_heads, group, t, slots, dim = 2, 2, 2, 4, 7, 8
    query = torch.randn(batch, kv_heads * group, t, dim)
    keys, values = torch.randn(batch, kv_heads, slots, dim), torch.randn(batch, kv_heads, slots, dim)
    new_keys, new_values = torch.randn(batch, kv_heads, t, dim), torch.randn(batch, kv_heads, t, dim)
    held_valid = torch.ones(batch, kv_heads, slots, dtype=torch.bool)
    scored = held_valid.clone()
    scored[:, :, 2] = False  # not in the repeated span: out of every softmax, score 0
    new_valid = torch.ones(batch, t, dtype=torch.bool)
    new_valid[1, 0] = False
    out_proj = torch.randn(6, kv_heads * group * dim) if projected else None  # (hidden, q_heads * head_dim)
    _, got = probe_attention(query, keys, values, held_valid, scored, new_keys, new_values, new_valid, 0.5, chunk=3, score="output", out_proj=out_proj)
    want = torch.zeros(batch, kv_heads, slots)
    for b, h, g, q in [(b, h, g, q) for b in range(batch) for h in range(kv_heads) for g in range(group) for q in range(t)]:
        if not new_valid[b, q]:
            continue
        own = new_valid[b, : q + 1]
        k = torch.cat([keys[b, h][scored[b, h]], new_keys[b, h, : q + 1][own]])
        v = torch.cat([values[b, h][scored[b, h]], new_values[b, h, : q + 1][own]])
        logits = k @ query[b, h * group + g, q] * 0.5
        out = torch.softmax(logits, 0) @ v
        head = h * group + g
        w = out_proj[:, head * dim : (head + 1) * dim] if projected else torch.eye(dim)
        for i, slot in enumerate(scored[b, h].nonzero()[:, 0].tolist()):
            keep = torch.arange(len(k)) != i
            moved = (w @ (torch.softmax(logits[keep], 0) @ v[keep] - out)).norm()
            want[b, h, slot] = max(want[b, h, slot], moved)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    _, attention = probe_attention(query, keys, values, held_valid, scored, new_keys, new_values, new_valid, 0.5)
    assert not torch.allclose(attention, got)  # the default score is the attention itself


def test_restkv_keeps_its_own_scores_and_answers_from_the_compressed_cache(tiny_model):
    ids = left_padded([40], seed=22)[0][0].tolist()
    cache = KVCache(tiny_model, make_policy("restkv", ratio=0.75, chunk=16), tokenizer=word_tokenizer())
    with torch.inference_mode():
        logits = prefill_ids(tiny_model, cache, ids)
    assert cache.entries() == 10 * tiny_model.config.num_hidden_layers * tiny_model.config.num_key_value_heads
    assert set(cache.layers[0].storage.view().aux) == {"restkv"}
    assert torch.isfinite(logits).all()
    # what the passes measure through: the attention's own output projection
    attention = tiny_model.model.layers[0].self_attn
    assert output_projection(attention) is attention.o_proj.weight


def test_kvzip_keeps_the_budget_and_answers_from_the_compressed_cache(tiny_model):
    ids = left_padded([40], seed=22)[0][0].tolist()
    cache = KVCache(tiny_model, make_policy("kvzip", ratio=0.75, chunk=16), tokenizer=word_tokenizer())
    with torch.inference_mode():
        logits = prefill_ids(tiny_model, cache, ids)
        assert cache.get_seq_length() == 40  # the passes stored nothing
        # 10 per head on average: one threshold over both layers and heads decides who keeps what.
        assert sum(int(cache.kept_lengths(i).sum()) for i in range(2)) == 40
        tokens = greedy(tiny_model, cache, logits[None], torch.tensor([40]), 4, set())
    assert len(tokens[0]) == 4 and cache.get_seq_length() == 43


def test_kvzip_needs_kvforge_prefill_not_generate(tiny_model):
    ids, mask = left_padded([20])
    cache = KVCache(tiny_model, make_policy("kvzip"), tokenizer=word_tokenizer())
    with pytest.raises(ValueError, match="kvforge.prefill"):
        tiny_model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=2)


def test_kvzip_without_a_tokenizer_says_how_to_give_one(tiny_model):
    cache = KVCache(tiny_model, make_policy("kvzip"))
    with pytest.raises(ValueError, match="tokenizer=tokenizer"):
        prefill_ids(tiny_model, cache, list(range(1, 20)))


@pytest.mark.parametrize("name", ["h2o", "kvzip", "adakv:snapkv"])
def test_answering_on_a_fork_leaves_the_compressed_cache_as_it_was(tiny_model, name):
    ids = left_padded([40], seed=23)[0][0].tolist()
    params = {"window": 4} if "snapkv" in name else {}
    cache = KVCache(tiny_model, make_policy(name, ratio=0.5, decode_budget=12, evict_every=2, **params), tokenizer=word_tokenizer())
    with torch.inference_mode():
        prefill_ids(tiny_model, cache, ids)
        before = [(layer.storage.view().keys.clone(), held_positions(layer.storage), layer.storage.export_aux()) for layer in cache.layers]
        answers = []
        for question in ([5, 6, 7], [9, 10], [5, 6, 7]):
            fork = cache.fork()
            out, positions = feed(tiny_model, fork, [question], torch.tensor([40]))
            answers.append(greedy(tiny_model, fork, out, positions, 12, set())[0])
            assert fork.get_seq_length() == 40 + len(question) + 11
    assert answers[0] == answers[2]  # the same question on a fresh fork answers the same
    for (keys, positions, aux), layer in zip(before, cache.layers):
        torch.testing.assert_close(layer.storage.view().keys, keys)
        assert held_positions(layer.storage) == positions
        for k, v in layer.storage.export_aux().items():
            for a, b in zip(v, aux[k]):
                torch.testing.assert_close(a, b)
    assert cache.get_seq_length() == 40


def test_merge_folds_evicted_values_into_the_nearest_kept_entry():
    # Keys: entries 0 and 1 point the same way, 2 elsewhere; knorm keeps the two smallest norms.
    keys = torch.tensor([[1.0, 0, 0, 0], [2.0, 0.1, 0, 0], [0, 0.5, 0, 0], [0, 0, 0, 9.0]])[None, None]
    values = torch.arange(16.0).view(1, 1, 4, 4)
    store = make_storage("inplace", 1, 1, 4, torch.float32, "cpu", ())
    store.append(keys, values, torch.arange(4), torch.ones(1, 4, dtype=torch.bool))
    ctx = context(store, 2)
    index, mask = make_policy("merge:knorm", threshold=0.5).select(ctx)
    store.keep(ctx.view, index, mask)
    view = store.view()
    assert view.positions[0, 0].tolist() == [0, 2]  # knorm kept the smallest norms
    # Entry 1 (cosine ~1 with entry 0) was folded into entry 0 with weight ~1; entry 3 (orthogonal
    # to both) was dropped; entry 2 kept its value.
    w = float(torch.nn.functional.cosine_similarity(keys[0, 0, 1], keys[0, 0, 0], dim=0))
    torch.testing.assert_close(view.values[0, 0, 0], (values[0, 0, 0] + w * values[0, 0, 1]) / (1 + w))
    torch.testing.assert_close(view.values[0, 0, 1], values[0, 0, 2])


def test_merging_a_derived_cache_leaves_the_base_untouched(tiny_model):
    ids = left_padded([30], seed=31)[0]
    base = KVCache(tiny_model, make_policy("full"), record_prefill=True)
    with torch.inference_mode():
        tiny_model(input_ids=ids, past_key_values=base, use_cache=True)
        before = [layer.storage.view().values.clone() for layer in base.layers]
        for layout_policy in ("merge:knorm", "merge:snapkv"):
            base.derive(make_policy(layout_policy, ratio=0.5, threshold=-1.0))
    for layer, values in zip(base.layers, before):
        torch.testing.assert_close(layer.storage.view().values, values)


def test_merge_shares_the_wrapped_policys_passes_in_a_sweep(tiny_model):
    """merge:kvzip derived after kvzip in one sweep takes kvzip's reconstruction scores instead of
    running the passes again, and holds what it holds when derived alone."""
    ids = left_padded([30], seed=32)[0]
    base = KVCache(tiny_model, make_policy("full"), record_prefill=True, tokenizer=word_tokenizer())
    positions = torch.tensor([30])
    with torch.inference_mode():
        tiny_model(input_ids=ids, past_key_values=base, use_cache=True)
        observed: dict = {}
        settle(tiny_model, base.derive(make_policy("kvzip", ratio=0.5, chunk=8), observed), ids.tolist(), positions, observed)
        merged = make_policy("merge:kvzip", ratio=0.5, chunk=8, threshold=-1.0)
        shared = base.derive(merged, observed)
        assert settle(tiny_model, shared, ids.tolist(), positions, observed) > 0  # the passes' seconds, not run again
        alone = base.derive(merged)
        settle(tiny_model, alone, ids.tolist(), positions)
    for a, b in zip(shared.layers, alone.layers):
        assert held_positions(a.storage) == held_positions(b.storage)
        torch.testing.assert_close(a.storage.view().values, b.storage.view().values)


def test_generate_goes_on_from_a_kvzip_prefill(tiny_model):
    ids = left_padded([40], seed=24)[0]
    cache = KVCache(tiny_model, make_policy("kvzip", ratio=0.5, chunk=16), tokenizer=word_tokenizer())
    with torch.inference_mode():
        prefill_ids(tiny_model, cache, ids[0, :-1].tolist())  # all but the last prompt token
        kept = cache.entries()
        out = tiny_model.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert out.shape == (1, 44) and cache.get_seq_length() == 43
    assert cache.entries() == kept + 4 * 2 * 2  # 4 tokens (the last prompt one and 3 generated) x layers x heads
