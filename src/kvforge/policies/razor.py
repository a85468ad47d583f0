"""Retrieval heads keep everything; the other heads keep the first tokens and a recent window.

Tang et al., "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads", 2024: only
a few heads look up distant tokens (they copy from the earlier occurrence of a repeated
sequence: echo and induction heads); the rest attend locally. The retrieval heads are found once
per model without training, by their attention on a random sequence seen twice (`kvforge
calibrate`): the `fraction` of KV heads with the highest scores, over the whole model (the
paper's 15%). At a given ratio the cache keeps the same share as any other policy: what the
retrieval heads keep whole is taken from the other heads' windows; when even that does not fit,
every head shares the budget alike (`sinks` + 1 at least for the others). The paper's
compensation token (the mean of the dropped entries) is left out: storage holds only entries of
real tokens. While decoding every head grows (retrieval heads must not evict).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvforge.policies.base import Policy, StepContext, check_range, top_slots
from kvforge.policies.registry import register


def retrieval_heads(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """(layers, kv_heads) bool: the `fraction` of heads with the highest retrieval scores."""
    count = round(fraction * scores.numel())
    chosen = torch.zeros(scores.numel(), dtype=torch.bool)
    chosen[scores.flatten().argsort(descending=True, stable=True)[:count]] = True
    return chosen.view(scores.shape)


@register
@dataclass
class Razor(Policy):
    fraction: float = 0.15
    sinks: int = 4

    name: ClassVar[str] = "razor"
    description: ClassVar[str] = "retrieval heads keep all, the others sinks + recent (RazorAttention); needs `kvforge calibrate`"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("fraction", self.fraction, 0.0, 1.0)
        check_range("sinks", self.sinks, 0)

    def min_budget(self) -> int:
        return self.sinks + 1

    def min_budget_reason(self) -> str:
        return f"sinks={self.sinks} plus one recent token"

    def select(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        assert ctx.budget is not None and ctx.calibration is not None
        heads = retrieval_heads(ctx.calibration.retrieval, self.fraction)  # (layers, kv_heads)
        total, whole = heads.numel(), int(heads.sum())
        mine = heads[ctx.layer_idx].to(ctx.budget.device)  # (kv_heads,)
        held = ctx.view.lengths
        target = ctx.target if ctx.target is not None else ctx.budget
        if not ctx.decoding and 0 < whole < total:
            # Per head on average `target` must hold; retrieval heads take what they hold.
            spare = (target * total - whole * held).double() / (total - whole)
            other = spare.floor().long().clamp(min=min(self.min_budget(), int(held.min())))
            kept_whole = ((target * total - (total - whole) * other).double() / whole).floor().long()
            budget = torch.where(mine, kept_whole.minimum(held), other.minimum(held))
        else:
            budget = ctx.budget
        slots = ctx.view.valid.shape[-1]
        recency = torch.arange(slots, device=held.device, dtype=torch.float32).expand_as(ctx.view.valid)
        return top_slots(torch.where(recency < self.sinks, float("inf"), recency), budget, ctx.view.valid)
