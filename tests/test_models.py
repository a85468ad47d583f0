"""Resolving what --model names, without loading weights."""

from __future__ import annotations

import pytest

from kvforge.models import ModelNotFoundError, cache_dir, default_gguf_path, load_model, resolve


def test_a_gguf_file_resolves_to_its_folder_and_name(tmp_path):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve(str(gguf)) == (tmp_path, "tiny.gguf")


def test_a_checkpoint_dir_resolves_to_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve(str(tmp_path)) == (tmp_path, None)


def test_anything_else_says_what_is_accepted(tmp_path):
    with pytest.raises(ModelNotFoundError, match="expected 'default', a local Hugging Face checkpoint directory"):
        resolve(str(tmp_path))  # a folder without config.json


def test_default_model_file_is_found_in_its_package():
    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KVFORGE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


def test_random_models_of_known_shapes_are_built_where_they_run():
    from kvforge.models import RANDOM_SHAPES

    loaded = load_model("random:tiny", dtype="bfloat16", device="cpu")
    assert loaded.model.config.num_hidden_layers == 2 and loaded.dtype_name == "bfloat16"
    assert loaded.model.config._attn_implementation == "kvforge"
    eight = RANDOM_SHAPES["llama-3.1-8b"]
    assert (eight["num_attention_heads"], eight["num_key_value_heads"], eight["head_dim"]) == (32, 8, 128)
    with pytest.raises(ModelNotFoundError, match="unknown random model shape 'gpt'; use random:<shape> with one of llama-3.1-8b, smollm2-135m, tiny"):
        load_model("random:gpt")


@pytest.mark.model
def test_the_default_models_random_shape_is_its_shape():
    from transformers import AutoConfig

    from kvforge.models import RANDOM_SHAPES, default_checkpoint

    real = AutoConfig.from_pretrained(default_checkpoint()).to_dict()
    shape = RANDOM_SHAPES["smollm2-135m"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings"):  # fmt: skip
        assert shape[key] == real[key], key
    assert shape["rope_theta"] == real["rope_parameters"]["rope_theta"]
