"""Picking a configuration for a memory size: what `kvforge tune` decides and the file it writes.

A user states a memory (a fraction of the dense bytes, `1/8`, or bytes per sequence, `40MiB`) or a
least retention; the sweep's summary (`report.summarize`) gives every configuration's bytes and
retention on the user's cases; `choose` takes the best that fits. The choice is written as a tuned
configuration, a small JSON file that `generate`, `eval` and `serve` read with `--config` (the
setting as a `KVSpec`, and what was measured, so a later run can be compared with it).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvforge.eval.front import best_within
from kvforge.eval.runner import write_atomic
from kvforge.spec import KVSpec
from kvforge.storage.codec import QuantSpec

KIND, VERSION = "kvforge-tuned-config", 1
SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class Memory:
    """A memory size: a fraction of the dense bytes, or bytes per sequence (exactly one set)."""

    fraction: float | None = None
    nbytes: int | None = None

    @property
    def label(self) -> str:
        if self.fraction is not None:
            inverse = 1 / self.fraction
            return f"1/{inverse:g}" if abs(inverse - round(inverse)) < 1e-9 else f"{self.fraction:g}"
        assert self.nbytes is not None
        return f"{self.nbytes / 2**20:g}MiB"

    def fits(self, entry: dict) -> bool:
        if self.fraction is not None:
            return entry["kept_fraction"] <= self.fraction
        return entry["cache_bytes"] <= self.nbytes  # type: ignore[operator]


def parse_memory(text: str) -> Memory:
    """'1/8' or '0.125' (of the dense bytes), '40MiB', '512KiB', '1.5GB' (per sequence)."""
    raw = text.strip()
    hint = "give a fraction of the dense bytes (1/8, 0.125) or a size per sequence (40MiB)"
    unit = raw.lstrip("+-0123456789./").lower()
    number = raw[: len(raw) - len(unit)]
    try:
        if unit:
            value = float(number) * SIZE_UNITS[unit]
            if not math.isfinite(value) or value < 1:
                raise ValueError
            return Memory(nbytes=int(value))
        top, _, bottom = raw.partition("/")
        fraction = float(top) / float(bottom) if bottom else float(top)
    except (ValueError, KeyError, ZeroDivisionError):
        raise ValueError(f"--memory {text!r} is not understood; {hint}") from None
    if not 0 < fraction <= 1:
        raise ValueError(f"--memory {text!r} is outside (0, 1] of the dense bytes; {hint}")
    return Memory(fraction=fraction)


def most_entries(memory: Memory, tokens: int, dense_bits: int, bits: float, row_count: int, head_dim: int) -> float:
    """The most entries per row (sequence, layer, KV head) `memory` can hold for a `tokens`-token
    case, each element at `bits` (a lower bound of a codec's: no scales counted), of `row_count`
    rows of `head_dim`-wide keys and values whose dense elements take `dense_bits`."""
    if memory.fraction is not None:
        return memory.fraction * tokens * dense_bits / bits
    assert memory.nbytes is not None
    return memory.nbytes * 8 / (row_count * 2 * head_dim * bits)


def choose(entries: list[dict], memory: Memory | None = None, min_retention: float | None = None) -> dict | None:
    """The configuration to use: within `memory`, the highest retention (then the fewest bytes,
    as `front.best_within` ranks); with `min_retention`, the fewest bytes keeping at least it.
    None when nothing measured qualifies."""
    scored = [e for e in entries if e.get("retention") is not None]
    if memory is not None:
        fitting = [e for e in scored if memory.fits(e)]
        return best_within(fitting, (1.0,))[0]["best"]
    assert min_retention is not None
    keeping = [e for e in scored if e["retention"] >= min_retention]
    return min(keeping, key=lambda e: (e["kept_fraction"], -e["retention"], e["policy"], e["ratio"]), default=None)


def measured(entry: dict) -> dict[str, Any]:
    """What a summary's entry says of a configuration, as a tuned configuration keeps it."""
    keys = ("samples", "retention", "mean", "kept_fraction", "cache_bytes", "bits_per_element", "scores")
    return {k: entry.get(k) for k in keys}


@dataclass(frozen=True)
class TunedConfig:
    """A chosen KV setting, with how it was chosen and what it measured."""

    spec: KVSpec
    model: str
    chosen_for: dict[str, Any]  # {"memory": "1/8"} or {"min_retention": 0.95}
    measured: dict[str, Any]  # on the cases it was chosen on (see `measured`)
    check: dict[str, Any] | None = None  # on held-out cases, where there were some

    def to_json(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "kind": KIND, "version": VERSION, "model": self.model,
            "policy": spec.policy, "ratio": spec.ratio, "budget": spec.budget, "params": dict(spec.params),
            "quant": asdict(spec.quant), "chosen_for": self.chosen_for, "measured": self.measured, "check": self.check,
        }  # fmt: skip

    def save(self, path: Path) -> None:
        write_atomic(path, (json.dumps(self.to_json(), indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: str | Path) -> TunedConfig:
        """Read and check a file `save` wrote; a damaged or foreign file is refused, naming why."""
        where = f"--config {str(path)!r}"
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as err:
            raise ValueError(f"cannot read {where}: {err.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{where} is damaged (not JSON: {err}); write it again with `kvforge tune`") from None
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise ValueError(f"{where} is not a tuned configuration (written by `kvforge tune`)")
        if data.get("version") != VERSION:
            raise ValueError(f"{where} is version {data.get('version')!r}; this kvforge reads version {VERSION}")
        try:
            quant = QuantSpec(**data["quant"])
            spec = KVSpec(data["policy"], data["ratio"], quant, data["budget"], tuple(dict(data["params"]).items()))
            spec.build()
            return cls(spec, str(data["model"]), dict(data["chosen_for"]), dict(data["measured"]), data.get("check"))
        except (KeyError, TypeError) as err:
            raise ValueError(f"{where} is damaged (missing or wrong field {err}); write it again with `kvforge tune`") from None
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
