"""Quality per byte: from a summary's configurations, the best one within each byte budget (a
fraction of the dense bytes: what an uncompressed cache of the model's dtype holds for the same
tokens), and the configurations no cheaper one beats (the front, drawn as a line)."""

from __future__ import annotations

import math

BUDGETS = (1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32)


def _rank(entry: dict) -> tuple:
    """Better first: higher retention; on equal retention (a few 0-or-100 cases tie often) the
    configuration that makes the reference answers more likely (`likelihood.py`; one that did not
    measure it after those that did), then fewer bytes, then by name (a stable choice)."""
    logprob = entry.get("answer_logprob")
    unlikely = -logprob if logprob is not None else math.inf
    return (-round(entry["retention"], 9), unlikely, entry["kept_fraction"], entry["policy"], entry["ratio"], entry["quant"])


def best_within(entries: list[dict], budgets: tuple[float, ...] = BUDGETS) -> list[dict]:
    """For each budget, the configuration of the highest retention holding at most that fraction
    of the dense bytes ({"budget": b, "best": None} when none fits or none has a retention)."""
    scored = [e for e in entries if e.get("retention") is not None]
    out = []
    for budget in budgets:
        fitting = sorted((e for e in scored if e["kept_fraction"] <= budget), key=_rank)
        out.append({"budget": budget, "best": fitting[0] if fitting else None})
    return out


def front(entries: list[dict]) -> list[dict]:
    """The configurations that no configuration of fewer or equal bytes beats on retention, from
    the fewest bytes up (each one's retention higher than every cheaper one's)."""
    out: list[dict] = []
    for entry in sorted((e for e in entries if e.get("retention") is not None), key=lambda e: (e["kept_fraction"], *_rank(e))):
        if not out or entry["retention"] > out[-1]["retention"]:
            out.append(entry)
    return out


def configuration_label(entry: dict) -> str:
    """How reports name a configuration: 'kvzip 0.75 + int4' ('kvzip 0.5' unquantized, 'full + int4':
    the full cache has no ratio)."""
    name = entry["policy"] if entry["policy"] == "full" else f"{entry['policy']} {entry['ratio']:g}"
    return name + ("" if entry["quant"] == "none" else f" + {entry['quant']}")


def budget_label(budget: float) -> str:
    """0.125 -> '1/8'."""
    return f"1/{round(1 / budget)}"
