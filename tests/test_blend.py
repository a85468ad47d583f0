"""Stored documents reused anywhere in a prompt (kvforge.blend, CacheBlend)."""

from __future__ import annotations

import pytest
import torch

from conftest import word_tokenizer
from kvforge import KVSpec
from kvforge.blend import BlendPrompt, Rotation, blend_prefill, build_blend_prompt, select, splice
from kvforge.cache import KVCache, held_at
from kvforge.generate import feed, prefill
from kvforge.memory.kvmemory import KVMemory
from kvforge.models import LoadedModel
from kvforge.storage import QuantSpec
from kvforge.store import LocalStore


def words(start: int, n: int) -> str:
    return " ".join(f"w{5 + (start + i) % 100}" for i in range(n))


@pytest.fixture
def loaded(tiny_model) -> LoadedModel:  # type: ignore[no-untyped-def]
    return LoadedModel(tiny_model, word_tokenizer(), "tiny")


@pytest.fixture
def prompt() -> BlendPrompt:
    # <user> d1 d2 d3 question <assistant>: literal segments around three documents (the
    # word tokenizer reads "<user>" as three unknown words and has no token for blank lines).
    return build_blend_prompt(word_tokenizer(), [words(0, 30), words(40, 25), words(70, 20)], words(3, 6), chat=True)


def full_prefill(model, prompt: BlendPrompt) -> tuple[KVCache, torch.Tensor]:  # type: ignore[no-untyped-def]
    cache = KVCache(model, KVSpec().build())
    return cache, prefill(model, cache, prompt.ids)


def test_a_blend_prompt_is_the_full_prompt_in_segments(prompt):
    assert prompt.documents == [False, True, True, True, False]
    assert [len(s) for s in prompt.segments] == [3, 30, 25, 20, 9]
    ids = word_tokenizer()(f"<user> {words(0, 30)} {words(40, 25)} {words(70, 20)} {words(3, 6)} <assistant>", add_special_tokens=False)["input_ids"]
    assert prompt.ids == ids


@torch.inference_mode()
def test_refreshing_every_reused_token_is_a_full_prefill(loaded, prompt, tmp_path):
    _, reference = full_prefill(loaded.model, prompt)
    blended = blend_prefill(loaded, KVSpec().build(), KVSpec(), prompt, LocalStore(tmp_path), share=1.0)
    assert blended.stored == 0 and blended.refreshed == 75
    torch.testing.assert_close(blended.logits[0], reference, rtol=1e-4, atol=1e-4)
    again = blend_prefill(loaded, KVSpec().build(), KVSpec(), prompt, LocalStore(tmp_path), share=0.0)
    assert again.stored == 3 and again.refreshed == 0  # every document found in the store
    assert (again.logits[0] - reference).abs().max() > 1e-3  # reused as stored: not the full prefill


@torch.inference_mode()
def test_a_spliced_document_holds_the_keys_a_prefill_gives_at_its_new_positions(loaded, prompt):
    # Layer 0's K/V depend on the token and its position only: a document moved to position 3
    # must hold exactly the layer-0 keys a prefill of the whole prompt holds there.
    model = loaded.model
    full, _ = full_prefill(model, prompt)
    document = KVCache(model, KVSpec().build())
    prefill(model, document, prompt.segments[1])
    cache = KVCache(model, KVSpec().build())
    feed(model, cache, [prompt.segments[0]], torch.tensor([0]))
    splice(cache, document, Rotation(model))
    assert cache.get_seq_length() == 33 and cache.layers[0].tokens.tolist() == [33]
    positions = torch.arange(3, 33)
    spliced_keys, spliced_values, held = held_at(cache.layers[0].storage.view(), positions)
    keys, values, _ = held_at(full.layers[0].storage.view(), positions)
    assert bool(held.all())
    torch.testing.assert_close(spliced_keys, keys, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(spliced_values, values, rtol=1e-4, atol=1e-5)


@torch.inference_mode()
def test_a_compressed_document_stays_compressed_when_reused_and_refreshed(loaded, prompt, tmp_path):
    spec = KVSpec("knorm", 0.5)
    memory = KVMemory(16, torch.float32, "cpu", num_blocks=256, block_size=16)
    store = LocalStore(tmp_path)
    kept = []
    for segment in (s for s, d in zip(prompt.segments, prompt.documents) if d):
        document = KVCache(loaded.model, spec.build(), layout="paged", memory=memory)
        prefill(loaded.model, document, segment)
        kept.append(document.kept_lengths(1))
    literal = sum(len(s) for s, d in zip(prompt.segments, prompt.documents) if not d)
    for share in (0.0, 0.5):
        blended = blend_prefill(loaded, spec.build(), spec, prompt, store, share)
        # Each row holds its documents' kept entries and every literal token, refreshed or not.
        assert blended.cache.kept_lengths(1).tolist() == (sum(kept) + literal).tolist()
        assert blended.refreshed == (0 if share == 0 else 38)


@torch.inference_mode()
def test_select_picks_the_share_of_tokens_whose_values_moved_most(loaded, prompt, tmp_path):
    model = loaded.model
    cache = KVCache(model, KVSpec().build())
    feed(model, cache, [prompt.segments[0]], torch.tensor([0]))
    document = KVCache(model, KVSpec().build())
    prefill(model, document, prompt.segments[1])
    splice(cache, document, Rotation(model))
    positions = torch.arange(3, 33)
    chosen = select(model, cache, prompt.segments[1], positions, 0.2)
    assert len(chosen) == 6 and chosen.tolist() == sorted(chosen.tolist()) and set(chosen.tolist()) <= set(range(3, 33))
    assert cache.get_seq_length() == 33 and cache.layers[0].storage.lengths.tolist() == [[33, 33]]  # nothing stored
    assert select(model, cache, prompt.segments[1], positions, 0.0).tolist() == []


@torch.inference_mode()
def test_a_quantized_blend_holds_codes(loaded, prompt, tmp_path):
    spec = KVSpec(quant=QuantSpec("int4", group=16, residual=16))
    blended = blend_prefill(loaded, spec.build(), spec, prompt, LocalStore(tmp_path), 0.15)
    plain = KVCache(loaded.model, spec.build(), layout="paged", quant=spec.quant)
    prefill(loaded.model, plain, prompt.ids)
    # As many entries in codes and in the full-precision tail as a prefill of the prompt leaves.
    assert blended.cache.quant.mode == "int4" and blended.cache.bits_per_element == plain.bits_per_element < 32
    assert blended.cache.get_seq_length() == len(prompt.ids)


def test_bad_blends_are_refused_clearly(loaded, prompt, tmp_path):
    with pytest.raises(ValueError, match=r"share 1.5 must be in \[0, 1\]"):
        blend_prefill(loaded, KVSpec().build(), KVSpec(), prompt, LocalStore(tmp_path), share=1.5)
    with pytest.raises(ValueError, match="one non-empty document"):
        build_blend_prompt(word_tokenizer(), [], "w1", chat=True)
    with pytest.raises(ValueError, match="ends with literal text"):
        blend_prefill(loaded, KVSpec().build(), KVSpec(), BlendPrompt([[5], [6]], [False, True]), LocalStore(tmp_path))
