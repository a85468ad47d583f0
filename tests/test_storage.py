"""The storage contract: the in-place layout against the ragged reference, growth, bytes, sharing."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import held_positions, left_padded
from kvforge import KVCache, make_policy
from kvforge.generate import DECODE, feed, greedy, prefill
from kvforge.storage import LAYOUTS, make_storage
from kvforge.storage.inplace import GROWTH, GROWTH_MIN, InPlaceKV

HEADS, DIM = 2, 8


def chunk(batch: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, HEADS, t, DIM, generator=gen), torch.randn(batch, HEADS, t, DIM, generator=gen)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_attend_equals_masked_softmax_over_everything_held(layout):
    storage = make_storage(layout, 2, HEADS, DIM, torch.float32, torch.device("cpu"))
    valid = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    k0, v0 = chunk(2, 5, 0)
    storage.append(k0, v0, torch.arange(5), valid)
    k1, v1 = chunk(2, 3, 1)
    storage.append(k1, v1, torch.arange(5, 8), torch.ones(2, 3, dtype=torch.bool))
    gen = torch.Generator().manual_seed(2)
    query = torch.randn(2, 2 * HEADS, 3, DIM, generator=gen)  # GQA groups of 2
    out = storage.attend(query, torch.arange(5, 8), torch.ones(2, 3, dtype=torch.bool), 0.3)
    keys, values = torch.cat([k0, k1], 2), torch.cat([v0, v1], 2)
    for b in range(2):
        real = torch.cat([valid[b], torch.ones(3, dtype=torch.bool)])
        for qh in range(2 * HEADS):
            h = qh // 2
            logits = query[b, qh] @ keys[b, h, real].T * 0.3  # (3, held)
            held = int(real.sum())
            causal = torch.arange(held)[None, :] <= torch.arange(held - 3, held)[:, None]
            probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
            torch.testing.assert_close(out[b, qh], probs @ values[b, h, real], rtol=1e-5, atol=1e-5)


def test_appends_grow_geometrically_and_write_in_place():
    storage = InPlaceKV(1, HEADS, DIM, torch.float32, torch.device("cpu"))
    k, v = chunk(1, 100, 3)
    storage.append(k, v, torch.arange(100), torch.ones(1, 100, dtype=torch.bool), exact=True)
    assert storage.allocated_nbytes == storage.kept_nbytes == 100 * HEADS * 2 * DIM * 4
    buffers = set()
    for step in range(200):
        k, v = chunk(1, 1, 10 + step)
        storage.append(k, v, torch.tensor([100 + step]), torch.ones(1, 1, dtype=torch.bool))
        buffers.add(storage.k[0].data_ptr())
        held = 101 + step
        assert storage.capacity(0) <= GROWTH * held + GROWTH_MIN  # spare room stays bounded
    assert len(buffers) <= 8  # 200 appends, a handful of reallocations: amortized growth
    assert storage.allocated_nbytes >= storage.kept_nbytes == 300 * HEADS * 2 * DIM * 4


def test_keep_frees_what_would_sit_idle_and_compacts_in_place_otherwise():
    storage = InPlaceKV(1, HEADS, DIM, torch.float32, torch.device("cpu"))
    k, v = chunk(1, 40, 4)
    storage.append(k, v, torch.arange(40), torch.ones(1, 40, dtype=torch.bool), exact=True)
    view = storage.view()
    index = torch.arange(0, 40, 2).expand(1, HEADS, 20)  # every other entry
    storage.keep(view, index, torch.ones(1, HEADS, 20, dtype=torch.bool))
    assert storage.allocated_nbytes == storage.kept_nbytes  # 40 -> 20: reallocated exactly
    assert held_positions(storage) == [list(range(0, 40, 2))] * HEADS
    torch.testing.assert_close(storage.view().keys[0, 1], k[0, 1, ::2])
    before = storage.k[0].data_ptr()
    view = storage.view()
    storage.keep(view, torch.arange(2, 20).expand(1, HEADS, 18), torch.ones(1, HEADS, 18, dtype=torch.bool))
    assert storage.k[0].data_ptr() == before  # 20 -> 18: compacted in place
    assert held_positions(storage) == [list(range(4, 40, 2))] * HEADS


def test_shared_rows_are_copied_before_writing():
    base = InPlaceKV(1, HEADS, DIM, torch.float32, torch.device("cpu"))
    k, v = chunk(1, 12, 5)
    base.append(k, v, torch.arange(12), torch.ones(1, 12, dtype=torch.bool))
    other = base.share(())
    view = other.view()
    other.keep(view, torch.arange(6).expand(1, HEADS, 6), torch.ones(1, HEADS, 6, dtype=torch.bool))
    k2, v2 = chunk(1, 1, 6)
    other.append(k2, v2, torch.tensor([12]), torch.ones(1, 1, dtype=torch.bool))
    assert held_positions(base) == [list(range(12))] * HEADS
    torch.testing.assert_close(base.view().keys, k)
    assert held_positions(other) == [list(range(6)) + [12]] * HEADS


def test_allocation_stays_within_a_quarter_of_kept_plus_one_growth_step(tiny_model):
    ids, _ = left_padded([40], seed=7)
    policy = make_policy("streaming", ratio=0.5, sinks=2, evict_every=4)
    cache = KVCache(tiny_model, policy)
    logits = prefill(tiny_model, cache, ids[0].tolist())
    assert cache.nbytes == cache.kept_nbytes  # compressed at once: nothing spare
    positions = torch.tensor([40])
    for _ in range(30):
        logits, positions = feed(tiny_model, cache, [[int(logits.argmax())]], positions, DECODE)
        logits = logits[0]
        for layer in cache.layers:
            storage = layer.storage
            for r, n in enumerate(storage.len):
                assert storage.capacity(r) <= GROWTH * (n + policy.evict_every) + GROWTH_MIN
            assert storage.kept_nbytes == storage.entries * 2 * 16 * 4
    assert cache.kept_nbytes <= cache.nbytes <= math.ceil(GROWTH * cache.kept_nbytes) + 2 * 2 * GROWTH_MIN * 2 * 16 * 4


def test_stacked_batch_decodes_unequal_rows_like_each_alone(tiny_model):
    prompts = [left_padded([n], seed=n)[0][0].tolist() for n in (30, 12, 21)]
    policy = make_policy("knorm", ratio=0.5, decode_budget=8, evict_every=3)
    caches, firsts = [], []
    for p in prompts:
        caches.append(KVCache(tiny_model, policy))
        firsts.append(prefill(tiny_model, caches[-1], p))
    batch = KVCache.stack(caches)
    got = greedy(tiny_model, batch, torch.stack(firsts), torch.tensor([len(p) for p in prompts]), 9, stop_ids=set())
    for b, p in enumerate(prompts):
        alone = KVCache(tiny_model, policy)
        first = prefill(tiny_model, alone, p)
        assert got[b] == greedy(tiny_model, alone, first[None], torch.tensor([len(p)]), 9, stop_ids=set())[0]
    assert batch.kept_lengths(0).max() <= 8 + 3 - 1


def test_heads_of_different_lengths_hold_exactly_their_bytes_and_attend_like_ragged():
    storages = [make_storage(layout, 2, HEADS, DIM, torch.float32, torch.device("cpu")) for layout in ("inplace", "ragged")]
    k, v = chunk(2, 30, 8)
    counts = torch.tensor([[20, 7], [30, 12]])  # (batch, heads): kept per head, all different
    for storage in storages:
        storage.append(k, v, torch.arange(30), torch.ones(2, 30, dtype=torch.bool))
        view = storage.view()
        index = torch.arange(30).expand(2, HEADS, 30).flip(-1)  # the most recent first
        storage.keep(view, index[..., :30], torch.arange(30) < counts[..., None])
    inplace, ragged = storages
    assert inplace.allocated_nbytes == inplace.kept_nbytes == int(counts.sum()) * 2 * DIM * 4
    assert held_positions(inplace) == held_positions(ragged)
    k1, v1 = chunk(2, 1, 9)
    gen = torch.Generator().manual_seed(10)
    query = torch.randn(2, 2 * HEADS, 1, DIM, generator=gen)
    outs = []
    for storage in storages:
        storage.append(k1, v1, torch.tensor([30]), torch.ones(2, 1, dtype=torch.bool))
        outs.append(storage.attend(query, torch.tensor([30]), torch.ones(2, 1, dtype=torch.bool), 0.25))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert inplace.lengths.tolist() == (counts + 1).tolist()
