"""`kvforge calibrate`: deterministic, cached per model on disk, refused for another model."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

import kvforge
from conftest import tiny_config, word_tokenizer
from kvforge.calibration.measure import calibrate
from kvforge.calibration import _KNOWN, Calibration, calibration_path, fingerprint
from kvforge.models import LoadedModel


def tiny(seed: int) -> LoadedModel:
    torch.manual_seed(seed)
    return LoadedModel(kvforge.enable(LlamaForCausalLM(tiny_config()).eval()), word_tokenizer(), f"tiny-{seed}")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty cache directory and no calibration known in-process (restored after)."""
    monkeypatch.setenv("KVFORGE_CACHE", str(tmp_path))
    known = dict(_KNOWN)
    _KNOWN.clear()
    yield tmp_path
    _KNOWN.clear()
    _KNOWN.update(known)


def same(a: Calibration, b: Calibration) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("retrieval", "query_direction", "kvzap", "kvzap_fit"))


def test_calibration_is_deterministic_and_cached_on_disk(cache_dir):
    model = tiny(5)
    first = calibrate(model)
    path = calibration_path(fingerprint(model.model))
    assert path.exists() and path.parent == cache_dir
    assert first.retrieval.shape == (2, 2) and first.query_direction.shape == (2, 2, 16) and first.kvzap.shape == (2, 2, 8 + 16 + 16 + 1)
    assert torch.allclose(first.query_direction.norm(dim=-1), torch.ones(2, 2))
    again = calibrate(model, force=True)  # measured again: the same numbers
    assert same(first, again)

    _KNOWN.clear()  # a new process: read from disk, no forward pass
    calls: list[int] = []
    handle = model.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        loaded = calibrate(model)
    finally:
        handle.remove()
    assert calls == [] and same(first, loaded) and loaded.seconds == again.seconds


def test_a_file_written_for_another_model_is_refused(cache_dir):
    a, b = tiny(5), tiny(6)
    assert fingerprint(a.model) != fingerprint(b.model)
    calibrate(a)
    _KNOWN.clear()
    # The file of model a, put where model b's would be.
    calibration_path(fingerprint(a.model)).rename(calibration_path(fingerprint(b.model)))
    with pytest.raises(ValueError, match="was written for model .* not this model"):
        calibrate(b)


def test_policies_needing_calibration_say_how_to_get_it(cache_dir):
    model = tiny(7)
    with pytest.raises(ValueError, match="run `kvforge calibrate"):
        kvforge.KVCache(model.model, kvforge.make_policy("razor"))
    calibrate(model)
    kvforge.KVCache(model.model, kvforge.make_policy("adakv:qfilters"))  # found once measured
