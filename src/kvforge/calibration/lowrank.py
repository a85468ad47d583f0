"""Per-model bases for low-rank storage (`--quant int4/r32`, `storage/lowrank.py`).

For every layer and KV head, the eigenvectors of the keys' (after rotary, as they are stored)
and the values' second-moment matrices on calibration text, most energy first, with each
component's share of the energy: the first r columns are the best r-dimensional basis for those
entries in the least-squares sense. Measured once per model by `kvforge calibrate` (or the first
command that asks for a rank) and kept beside the calibration, in a file of its own named and
checked by the model's fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kvforge.calibration.store import load_measured, save_measured
from kvforge.models import cache_dir
from kvforge.storage.lowrank import Basis

VERSION = 1
_KNOWN: dict[str, Bases] = {}
FIELDS = ("keys", "values", "key_energy", "value_energy")


@dataclass
class Bases:
    """One model's bases: keys and values (layers, kv_heads, head_dim, head_dim), columns by
    decreasing energy; key_energy and value_energy (layers, kv_heads, head_dim), each row
    summing to 1."""

    model: str  # fingerprint
    name: str
    keys: torch.Tensor
    values: torch.Tensor
    key_energy: torch.Tensor
    value_energy: torch.Tensor

    def layer(self, index: int, rank: int) -> Basis:
        return Basis(self.keys[index, :, :, :rank].contiguous(), self.values[index, :, :, :rank].contiguous())

    def kept_energy(self, rank: int) -> tuple[float, float]:
        """The mean share of the keys' and the values' energy the first `rank` columns hold."""
        return float(self.key_energy[..., :rank].sum(-1).mean()), float(self.value_energy[..., :rank].sum(-1).mean())

    def save(self, path: Path) -> None:
        save_measured(path, {k: getattr(self, k) for k in FIELDS}, {"model": self.model, "name": self.name})

    @classmethod
    def load(cls, path: Path, model: str) -> Bases:
        t, meta = load_measured(path, model, "low-rank bases file")
        return cls(model, meta.get("name", ""), *(t[k] for k in FIELDS))


def bases_path(model: str) -> Path:
    return cache_dir() / f"lowrank-v{VERSION}-{model}.safetensors"


def find_bases(model: str) -> Bases | None:
    if model not in _KNOWN and bases_path(model).exists():
        _KNOWN[model] = Bases.load(bases_path(model), model)
    return _KNOWN.get(model)


def require_bases(model: str, label: str) -> Bases:
    found = find_bases(model)
    if found is None:
        raise ValueError(
            f"--quant {label} holds entries in the model's low-rank bases, which are not in {bases_path(model).parent}: "
            f"run `kvforge calibrate --model <model>` once (generate, eval and tune run it when needed)"
        )
    return found


def principal(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads, n, dim) entries -> (heads, dim, dim) eigenvectors of their second moment, most
    energy first, and (heads, dim) each one's share of the energy."""
    moment = torch.einsum("hnd,hne->hde", x.double(), x.double())
    energy, vectors = torch.linalg.eigh(moment)  # ascending
    energy, vectors = energy.flip(-1).clamp(min=0), vectors.flip(-1)
    return vectors.float(), (energy / energy.sum(-1, keepdim=True).clamp(min=1e-30)).float()


def remember(bases: Bases) -> Bases:
    _KNOWN[bases.model] = bases
    return bases
