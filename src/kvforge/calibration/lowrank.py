"""Per-model bases for low-rank storage (`--quant int4/r32`, `int4/think32`; `storage/lowrank.py`).

For every layer and KV head, the eigenvectors of the keys' (after rotary, as they are stored)
and the values' second-moment matrices on calibration text, most energy first, with each
component's share of the energy: the first r columns are the best r-dimensional basis for those
entries in the least-squares sense. Beside them, the key channels ranked by ThinK's query-driven
score (Xu et al., 2025, "ThinK: Thinner Key Cache by Query-Driven Pruning"): channel j of a head
scores ||Q[:, j]|| * ||K[:, j]||, the Frobenius norm of what dropping it takes from the logits
Q K^T (that channel's outer product Q[:, j] K[:, j]^T); `think` keys keep the r best channels as
they are, so a key basis of r columns of the identity. ThinK ranks per prompt over its last
queries; here the ranking is measured once on calibration text (static, as LeanK finds channel
importance to be), so it fits the same per-layer basis. Measured once per model by `kvforge
calibrate` (or the first command that asks for a rank) and kept beside the calibration, in a file
of its own named and checked by the model's fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kvforge.calibration.store import load_measured, save_measured
from kvforge.models import cache_dir
from kvforge.storage.lowrank import Basis

VERSION = 2  # 2: key channels by ThinK's score
_KNOWN: dict[str, Bases] = {}
FIELDS = ("keys", "values", "key_energy", "value_energy", "key_channels", "channel_share")


@dataclass
class Bases:
    """One model's bases: keys and values (layers, kv_heads, head_dim, head_dim), columns by
    decreasing energy; key_energy and value_energy (layers, kv_heads, head_dim), each row
    summing to 1; key_channels (layers, kv_heads, head_dim) int64, the key channels by ThinK's
    score, highest first, and channel_share (same shape) each one's share of the score."""

    model: str  # fingerprint
    name: str
    keys: torch.Tensor
    values: torch.Tensor
    key_energy: torch.Tensor
    value_energy: torch.Tensor
    key_channels: torch.Tensor
    channel_share: torch.Tensor

    def layer(self, index: int, rank: int, key_basis: str = "pca") -> Basis:
        """Layer `index`'s basis of `rank` columns; `key_basis` "think" (`QuantSpec.key_basis`): the
        keys' best channels by ThinK's score instead of their main directions (values alike)."""
        values = self.values[index, :, :, :rank].contiguous()
        if key_basis == "think":
            return Basis(channel_columns(self.key_channels[index, :, :rank], self.keys.shape[-2]), values)
        return Basis(self.keys[index, :, :, :rank].contiguous(), values)

    def kept_energy(self, rank: int) -> tuple[float, float]:
        """The mean share of the keys' and the values' energy the first `rank` columns hold."""
        return float(self.key_energy[..., :rank].sum(-1).mean()), float(self.value_energy[..., :rank].sum(-1).mean())

    def kept_channel_share(self, rank: int) -> float:
        """The mean share of ThinK's score the best `rank` key channels hold."""
        return float(self.channel_share[..., :rank].sum(-1).mean())

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


def think_channels(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_heads, m, dim) a group's queries and (kv_heads, n, dim) its keys -> (kv_heads, dim)
    int64 channels by ||Q[:, j]|| * ||K[:, j]||, highest first, and (kv_heads, dim) each one's
    share of the summed score, in that order."""
    score = queries.double().norm(dim=1) * keys.double().norm(dim=1)
    share, channels = (score / score.sum(-1, keepdim=True).clamp(min=1e-30)).sort(-1, descending=True)
    return channels, share.float()


def channel_columns(channels: torch.Tensor, dim: int) -> torch.Tensor:
    """(kv_heads, rank) kept channels -> (kv_heads, dim, rank) the identity's columns for them: a
    basis whose coordinates are those channels as they are."""
    eye = torch.eye(dim)
    return eye[:, channels].permute(1, 0, 2).contiguous()


def remember(bases: Bases) -> Bases:
    _KNOWN[bases.model] = bases
    return bases
