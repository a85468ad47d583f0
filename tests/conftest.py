"""Shared fixtures: a tiny random-weight Llama with GQA, and the real default model (loaded once)."""

from __future__ import annotations

import copy
import functools
import os

import torch

if not torch.cuda.is_available():
    # The Triton kernels run under Triton's interpreter on a CPU-only machine. Loading a
    # transformers model imports Triton, so this must be set before anything else is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import kvforge  # noqa: E402

VOCAB = 128


def tiny_config(**overrides: object) -> LlamaConfig:
    # 2 layers, 4 query heads sharing 2 KV heads (GQA groups of 2), head_dim 16.
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    base.update(overrides)
    return LlamaConfig(**base)


@pytest.fixture(scope="session")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    return kvforge.enable(model)


@pytest.fixture(scope="session", autouse=True)
def tiny_calibration(tiny_model: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory):
    """The tiny model's calibration, measured once per session (in a temporary cache directory)
    and remembered in-process, so policies that need one (razor, qfilters, kvzap) find it; its
    low-rank bases too (`--quant .../rN`)."""
    from kvforge.calibration.measure import calibrate, calibrate_lowrank
    from kvforge.models import LoadedModel

    mp = pytest.MonkeyPatch()
    mp.setenv("KVFORGE_CACHE", str(tmp_path_factory.mktemp("calibration")))
    try:
        calibrate_lowrank(LoadedModel(tiny_model, word_tokenizer(), "tiny"))
        return calibrate(LoadedModel(tiny_model, word_tokenizer(), "tiny"))
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def tiny_reference(tiny_model: LlamaForCausalLM) -> LlamaForCausalLM:
    """The same weights on transformers' own SDPA attention."""
    ref = copy.deepcopy(tiny_model)
    ref.set_attn_implementation("sdpa")
    return ref


@pytest.fixture(scope="session")
def default_model() -> kvforge.models.LoadedModel:
    return kvforge.load_model("default")


def left_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (batch, max(lengths)), left-padded with token 0."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n :] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask[b, width - n :] = 1
    return ids, mask


@functools.cache
def word_tokenizer():
    """A word-level tokenizer over the tiny model's vocabulary (w0, w1, ...), with a chat template."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[EOS]", "<user>", "<assistant>"] + [f"w{i}" for i in range(VOCAB - 5)]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
    tokenizer.chat_template = (
        "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    return tokenizer


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model: LlamaForCausalLM):
    """A local HF checkpoint dir: the tiny model (context 512) and the word-level tokenizer."""
    path = tmp_path_factory.mktemp("tiny-checkpoint")
    tiny_model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def held_positions(storage) -> list[list[int]]:
    """[batch * kv_heads] logical positions a storage holds per row, oldest first."""
    view = storage.view()
    rows = view.positions.flatten(0, 1)
    valid = view.valid.flatten(0, 1)
    return [r[v].tolist() for r, v in zip(rows, valid)]


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """A real redis-server of this test's own on a free loopback port: (url, process). `make
    test` installs Debian's redis-server where it is missing."""
    import shutil
    import socket
    import subprocess
    import time

    import redis

    exe = shutil.which("redis-server")
    assert exe is not None, "redis-server is missing: `make test` installs it (apt-get install redis-server)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.time() + 20
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            assert time.time() < deadline and proc.poll() is None, "redis-server did not start"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0", proc
    proc.terminate()
    proc.wait(timeout=20)
