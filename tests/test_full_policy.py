"""The `full` policy must be transformers' own cache, bit for bit in float32."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from conftest import left_padded
from kvforge import KVCache, make_policy


def step_logits(model, ids, mask, cache, steps: int) -> list[torch.Tensor]:
    """Logits of the prefill, then of `steps` greedy decode steps fed one token at a time."""
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    logits = [out.logits]
    positions = mask.sum(1, keepdim=True) - 1
    for _ in range(steps):
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        positions = positions + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        logits.append(out.logits)
    return logits


def test_full_matches_dynamic_cache_batch_1(tiny_model, tiny_reference):
    ids, mask = left_padded([24])
    ours = step_logits(tiny_model, ids, mask, KVCache(tiny_model, make_policy("full")), steps=5)
    ref = step_logits(tiny_reference, ids, mask, DynamicCache(config=tiny_reference.config), steps=5)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_full_matches_dynamic_cache_padded_batch(tiny_model, tiny_reference):
    ids, mask = left_padded([24, 15, 7])
    ours = step_logits(tiny_model, ids, mask, KVCache(tiny_model, make_policy("full")), steps=5)
    ref = step_logits(tiny_reference, ids, mask, DynamicCache(config=tiny_reference.config), steps=5)
    real = mask.bool()
    # Padding positions carry no meaning; every real position and every decode step must match.
    torch.testing.assert_close(ours[0][real], ref[0][real], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_full_batch_generates_what_each_prompt_generates_alone(tiny_model):
    lengths = [21, 9, 14]
    ids, mask = left_padded(lengths)
    cache = KVCache(tiny_model, make_policy("full"))
    # No EOS: every sequence generates exactly 8 tokens, so rows compare position by position.
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=None)
    batch = tiny_model.generate(ids, attention_mask=mask, past_key_values=cache, **kw)
    for b, n in enumerate(lengths):
        alone_ids = ids[b : b + 1, -n:]
        alone = tiny_model.generate(alone_ids, past_key_values=KVCache(tiny_model, make_policy("full")), **kw)
        assert batch[b, -8:].tolist() == alone[0, -8:].tolist()
    # Padding is never stored: each sequence holds exactly its real tokens (+ 7 fed-back tokens).
    held = cache.kept_lengths(0)  # (batch, kv_heads)
    assert held.tolist() == [[n + 7] * 2 for n in lengths]


def test_full_generate_equals_plain_transformers(tiny_model, tiny_reference):
    ids, _ = left_padded([30], seed=5)
    ours = tiny_model.generate(ids, past_key_values=KVCache(tiny_model, make_policy("full")), max_new_tokens=12, do_sample=False)
    ref = tiny_reference.generate(ids, max_new_tokens=12, do_sample=False)
    assert ours.tolist() == ref.tolist()


def test_cache_requires_kvforge_attention(tiny_reference):
    import pytest

    with pytest.raises(ValueError, match="kvforge.enable"):
        KVCache(tiny_reference, make_policy("full"))


def test_kvforge_attention_without_kvforge_cache_is_plain_attention(tiny_model, tiny_reference):
    ids, mask = left_padded([17, 11])
    ours = tiny_model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(config=tiny_model.config))
    ref = tiny_reference(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(config=tiny_model.config))
    real = mask.bool()
    torch.testing.assert_close(ours.logits[real], ref.logits[real], rtol=1e-5, atol=1e-5)


def test_greedy_loop_equals_generate(tiny_model, tiny_reference):
    from kvforge.generate import prefill, greedy

    ids, _ = left_padded([25], seed=9)
    cache = KVCache(tiny_model, make_policy("full"))
    logits = prefill(tiny_model, cache, ids[0].tolist())[None]
    (tokens,) = greedy(tiny_model, cache, logits, torch.tensor([25]), 10, stop_ids=set())
    ref = tiny_reference.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert tokens == ref[0, 25:].tolist()


def test_stacked_prefills_decode_like_each_prompt_alone(tiny_model):
    """Prompts prefilled one by one, stacked, then fed ragged chunks and decoded as one batch,
    give each prompt's own tokens; a row that stops early stops growing."""
    from kvforge.generate import feed, prefill, greedy

    prompts = [left_padded([n], seed=s)[0][0].tolist() for n, s in ((23, 1), (11, 2), (17, 3))]
    rests = [[5, 6, 7], [9], [3, 4]]
    bases, firsts = [], []
    for p in prompts:
        base = KVCache(tiny_model, make_policy("full"), record_prefill=True)
        firsts.append(prefill(tiny_model, base, p))
        bases.append(base)
    for name in ("full", "snapkv", "h2o"):
        policy = make_policy(name) if name == "full" else make_policy(name, ratio=0.5, **({"window": 4} if name == "snapkv" else {}))
        batch = KVCache.stack(bases).derive(policy)
        logits, pos = feed(tiny_model, batch, rests, torch.tensor([len(p) for p in prompts]))
        got = greedy(tiny_model, batch, logits, pos, 6, stop_ids=set())
        for b, (p, r) in enumerate(zip(prompts, rests)):
            alone = KVCache(tiny_model, policy)
            prefill(tiny_model, alone, p)
            lg, ps = feed(tiny_model, alone, [r], torch.tensor([len(p)]))
            assert got[b] == greedy(tiny_model, alone, lg, ps, 6, stop_ids=set())[0], (name, b)
            assert int(batch.seq_nbytes()[b]) == alone.kept_nbytes
            assert int(batch.seq_dense_nbytes()[b]) == alone.dense_nbytes
    # A stop token ends one row early: it emits no more tokens and stores nothing more.
    batch = KVCache.stack(bases).derive(make_policy("full"))
    logits, pos = feed(tiny_model, batch, rests, torch.tensor([len(p) for p in prompts]))
    stop = int(logits[1].argmax())
    got = greedy(tiny_model, batch, logits, pos, 5, stop_ids={stop})
    assert got[1] == [stop]
    assert int(batch.kept_lengths(0)[1, 0]) == len(prompts[1]) + len(rests[1])
