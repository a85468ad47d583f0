"""transformers' own caches, measured beside kvforge's rows: `DynamicCache` (what every user has)
and `QuantizedCache` with each backend transformers offers.

`QuantizedCache` is transformers' KIVI-like cache: a full-precision residual of recent tokens that,
once full, is dequantized with everything before it and quantized again as a whole (quanto, HQQ);
the fp8 backend appends e4m3 codes under one per-tensor scale frozen at the first update. The
integer backends are built with kvforge's group (32) and KIVI's residual (128, transformers' own
default: each time it fills, everything is requantized, so a shorter one requantizes more often;
kvforge's rows take `--quant-residual 128 --quant-prompt-residual` to compare like with like);
their axes stay transformers' defaults.

Bytes held are read from the tensors the cache holds (a quantized tensor subclass is opened into
the tensors it is made of), never computed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache, PreTrainedConfig, QuantizedCache

from kvforge.storage.base import buffers_of

GROUP = 32  # kvforge's default --quant-group
RESIDUAL = 128  # KIVI's and transformers' (kvforge's default before it became 0)


@dataclass(frozen=True)
class Baseline:
    label: str  # the row's policy column
    quant: str  # the row's quant column: none, int4, int2, fp8
    backend: str | None  # QuantizedCache backend; None: DynamicCache
    package: str | None = None  # what the backend imports, and the extra that installs it
    nbits: int | None = None

    def available(self) -> bool:
        return self.package is None or importlib.util.find_spec(self.package) is not None

    def make(self, config: PreTrainedConfig) -> Cache:
        if self.backend is None:
            return DynamicCache(config=config)
        if self.nbits is None:
            return QuantizedCache(self.backend, config)
        return QuantizedCache(self.backend, config, nbits=self.nbits, q_group_size=GROUP, residual_length=RESIDUAL)


DYNAMIC = "transformers DynamicCache"

BASELINES = {
    "dynamic": Baseline(DYNAMIC, "none", None),
    "quanto-int4": Baseline("transformers QuantizedCache quanto", "int4", "quanto", "optimum.quanto", 4),
    "quanto-int2": Baseline("transformers QuantizedCache quanto", "int2", "quanto", "optimum.quanto", 2),
    "hqq-int4": Baseline("transformers QuantizedCache hqq", "int4", "hqq", "hqq", 4),
    "hqq-int2": Baseline("transformers QuantizedCache hqq", "int2", "hqq", "hqq", 2),
    "fp8": Baseline("transformers QuantizedCache", "fp8", "fp8"),
}

# The package index name of each backend's import name, for the error that says how to get it.
_INSTALL = {"optimum.quanto": "optimum-quanto", "hqq": "hqq"}


def check_baselines(names: list[str], known: dict[str, Baseline] = BASELINES) -> list[Baseline]:
    """The baselines named (`--baselines`), each importable here, or a ValueError saying which
    names exist and how to install a missing backend."""
    out = []
    for name in names:
        if name not in known:
            raise ValueError(f"--baselines: unknown baseline {name!r}; known: {', '.join(known)}")
        baseline = known[name]
        if not baseline.available():
            assert baseline.package is not None
            pip = _INSTALL.get(baseline.package, baseline.package)
            raise ValueError(
                f"--baselines {name}: transformers' {baseline.backend} backend needs the package {pip!r}, which is not "
                f"installed; install it (`pip install {pip}`; kvforge's `pip install -e '.[baselines]'` brings the "
                f"tested optimum-quanto) or leave {name} out"
            )
        out.append(baseline)
    return out


def _tensors(obj: object) -> list[torch.Tensor]:
    """Every plain tensor inside `obj`: tensors, tensor subclasses (opened through
    `__tensor_flatten__`, as quanto's quantized tensors are), tuples, lists and dicts of them."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return [t for name in names for t in _tensors(getattr(obj, name))]
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def held_nbytes(cache: Cache) -> int:
    """Bytes of every tensor a transformers cache's layers hold (full-precision keys and values,
    and the quantized states with their scales), each buffer counted once."""
    tensors = []
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            tensors += _tensors(getattr(layer, name, None))
    return sum(buffers_of(tensors).values())
