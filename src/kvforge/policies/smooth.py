"""Smooth the wrapped policy's scores over neighbouring positions, so spans are kept whole.

An entry's score is the mean (`pool="avg"`) or the most (`"max"`) of the wrapped policy's scores
over the `kernel` entries centred on it, neighbours taken in position order among what the row
holds. Li et al.'s SnapKV pools its window attention this way (kernel 5-7, "clustering"), and An
et al., "ReST-KV: Robust KV Cache Eviction with Layer-wise Output Reconstruction and
Spatial-Temporal Smoothing", ICLR 2026, smooths its scores spatially too (mean, kernel 5): a
token a question will need rarely stands alone. On this model a needle's number is one token per
digit, and a per-entry score (kvzap's, predicted from each entry alone) may keep some digits and
drop others; pooling lifts the neighbours of high scores, so the whole number may survive.
Unlike `chunk:` (fixed spans, each head its own budget), the window slides with every entry and
the wrapped policy's way of spending its budget (kvzip's and kvzap's thresholds over layers and
heads) is kept. The default (mean over 3) is the one of four tried that kept as many of eight
prose needles as kvzap alone at 0.75 + int4 (mean over 5, max over 3 or 5: one to three fewer;
README). Measured at 2048 tokens, it helps kvzap at 1/16 and 1/32 and loses around kvzip, whose
scores come from the model's own reconstruction rather than from each entry alone.

Invariants: an infinite score (a sink, an entry no pass scored) stays infinite and does not
spread to its neighbours; padding never enters a window; a kernel of 1 changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvforge.policies.base import StepContext, check_range
from kvforge.policies.budgets import spread_select, spread_targets
from kvforge.policies.registry import register
from kvforge.policies.wrapper import Wrapper

POOLS = ("avg", "max")


def pool_along(scores: torch.Tensor, kernel: int, pool: str) -> torch.Tensor:
    """(rows, n) finite scores, -inf where there is none -> (rows, n) each the max or the mean of
    the scores in the `kernel` window centred on it (entries without a score left out)."""
    pad = kernel // 2
    x = scores[:, None, :]  # (rows, 1, n)
    if pool == "max":
        return F.max_pool1d(x, kernel, stride=1, padding=pad)[:, 0]
    present = torch.isfinite(x).float()
    window = torch.ones(1, 1, kernel, device=scores.device)
    total = F.conv1d(torch.where(present.bool(), x, 0.0), window, padding=pad)
    count = F.conv1d(present, window, padding=pad)
    return (total / count.clamp_min(1)).masked_fill(count == 0, float("-inf"))[:, 0]


@register
@dataclass
class Smooth(Wrapper):
    kernel: int = 3  # odd: the entry and kernel // 2 neighbours on each side
    pool: str = "avg"  # "avg" or "max"

    name: ClassVar[str] = "smooth"
    description: ClassVar[str] = "pool the wrapped policy's scores over the `kernel` nearest positions, so spans stay whole (SnapKV, ReST-KV)"
    example: ClassVar[str] = "kvzap"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel={self.kernel} must be odd (the entry and as many neighbours on each side); give e.g. --param kernel={self.kernel + 1}")
        if self.pool not in POOLS:
            raise ValueError(f"pool={self.pool!r} is not one of {', '.join(map(repr, POOLS))}")
        if self.wrapped.wraps:
            raise ValueError(
                f"smooth wraps a scoring policy, not {self.wrapped.full_name!r}: put the other wrapper outside, "
                f"e.g. {self.wrapped.name}:smooth:{self.wrapped.wrapped.full_name}"
            )

    @property
    def spread(self) -> str | None:
        """How the wrapped policy spends its budget over heads and layers (kvzip's, kvzap's), or
        None for one budget per row."""
        return getattr(self.wrapped, "spread", None)

    def score(self, ctx: StepContext) -> torch.Tensor:
        raw = self.wrapped.score(ctx).float()  # (batch, kv_heads, slots)
        valid = ctx.view.valid
        batch, heads, slots = raw.shape
        # Held entries in position order, padding last.
        positions = ctx.view.positions.masked_fill(~valid, torch.iinfo(ctx.view.positions.dtype).max)
        order = positions.argsort(dim=-1)
        ordered = raw.gather(-1, order)
        forced = ordered == float("inf")
        finite = ordered.masked_fill(~valid.gather(-1, order) | ~torch.isfinite(ordered), float("-inf"))
        pooled = pool_along(finite.view(batch * heads, slots), self.kernel, self.pool).view(batch, heads, slots)
        pooled = pooled.masked_fill(forced, float("inf"))
        return torch.empty_like(pooled).scatter_(-1, order, pooled).masked_fill(~valid, float("-inf"))

    # Spent as the wrapped policy spends its budget, by the smoothed scores; a policy with one
    # budget per row keeps the top ones (`Policy.select` on `self.score`).
    def layer_budgets(self, contexts: list[StepContext | None]) -> list[torch.Tensor | None]:
        if self.spread is None:
            return super().layer_budgets(contexts)
        return spread_targets(self.score, contexts, self.spread)

    def select(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spread is None:
            return super().select(ctx)
        return spread_select(self.score(ctx), ctx, self.spread)
