"""Per-model calibration: measured once by `kvforge calibrate`, kept on disk, refused for another model.

Some methods need facts about the model that no single prompt gives: which heads retrieve
(RazorAttention), the main direction of each head's queries (Q-Filters), a cheap surrogate of
KVzip's scores (KVzap). `kvforge calibrate` measures them (see `measure.py`) and writes one
safetensors file per model under $KVFORGE_CACHE (else ~/.cache/kvforge), named by a fingerprint
of the model's configuration and weights; the fingerprint is also stored inside the file, so a
file copied or renamed onto another model is refused rather than silently misapplied.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvforge.models import cache_dir

VERSION = 3  # bump when what is measured changes: older files are then measured again
_FINGERPRINTS: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()
_KNOWN: dict[str, Calibration] = {}  # measured or read in this process, by fingerprint


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's configuration and weights (every tensor's name, shape and
    first values: enough to tell models apart without reading 100s of MB). Memoized per model."""
    if model in _FINGERPRINTS:
        return _FINGERPRINTS[model]
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().flatten()[:64].float().cpu().numpy().tobytes())
    _FINGERPRINTS[model] = digest.hexdigest()[:24]
    return _FINGERPRINTS[model]


@dataclass
class Calibration:
    """What `kvforge calibrate` measured for one model; tensors are (layers, kv_heads, ...)."""

    model: str  # fingerprint
    name: str  # the model's display name, for messages
    retrieval: torch.Tensor  # (layers, kv_heads) attention on repeated random tokens (RazorAttention)
    query_direction: torch.Tensor  # (layers, kv_heads, head_dim) unit main direction of the queries
    kvzap: torch.Tensor  # (layers, kv_heads, features) weights of the surrogate of log kvzip scores
    kvzap_fit: torch.Tensor  # (layers,) Spearman correlation of the surrogate on held-out text
    seconds: dict[str, float] = field(default_factory=dict)  # what each measurement cost

    def save(self, path: Path) -> None:
        tensors = {k: getattr(self, k) for k in ("retrieval", "query_direction", "kvzap", "kvzap_fit")}
        save_measured(path, tensors, {"model": self.model, "name": self.name, "version": str(VERSION), "seconds": json.dumps(self.seconds)})

    @classmethod
    def load(cls, path: Path, model: str) -> Calibration:
        """Read `path`; a file written for another model is refused with what to do."""
        t, meta = load_measured(path, model, "calibration file")
        return cls(model, meta.get("name", ""), t["retrieval"], t["query_direction"], t["kvzap"], t["kvzap_fit"], json.loads(meta.get("seconds", "{}")))


def save_measured(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write what was measured of a model atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_measured(path: Path, model: str, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of `path`; a file measured for another model (by its fingerprint,
    stored inside) is refused with what to do."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("model") != model:
        raise ValueError(
            f"{what} {path} was written for model {meta.get('model')!r} ({meta.get('name')}), "
            f"not this model ({model}); delete it, then run `kvforge calibrate`"
        )
    return load_file(str(path)), meta


def calibration_path(model: str) -> Path:
    return cache_dir() / f"calibration-v{VERSION}-{model}.safetensors"


def remember(calibration: Calibration) -> Calibration:
    """Keep `calibration` for this process: caches built on its model find it without the disk."""
    _KNOWN[calibration.model] = calibration
    return calibration


def find_calibration(model: str) -> Calibration | None:
    """The calibration of the model with this fingerprint, if one was measured (this process
    first, then the cache directory)."""
    if model in _KNOWN:
        return _KNOWN[model]
    path = calibration_path(model)
    return remember(Calibration.load(path, model)) if path.exists() else None


def require_calibration(model: str, policy: str) -> Calibration:
    found = find_calibration(model)
    if found is None:
        raise ValueError(
            f"policy {policy!r} needs the model's calibration, which is not in {calibration_path(model).parent}: "
            f"run `kvforge calibrate --model <model>` once (kvforge eval, demo and generate run it when needed), "
            f"or kvforge.calibrate(loaded) in Python"
        )
    return found
