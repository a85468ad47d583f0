"""Per-layer budgets that shrink with depth.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funnelling",
2024: attention is spread wide in the lower layers and concentrates on a few tokens higher up,
so lower layers get more of the budget. Budgets fall linearly from the first layer to the last,
the last keeping 1/`beta` of the average (the paper's beta is 20) and the mean over layers being
the wrapped policy's budget. A layer never keeps more than it holds, so where the first layers
would exceed that the cache keeps less than the even split would; the bytes say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvforge.policies.base import StepContext, check_range
from kvforge.policies.registry import register
from kvforge.policies.wrapper import Wrapper


def depth_factor(layer: int, layers: int, beta: float) -> float:
    """This layer's share of the average budget: 2 - 1/beta at layer 0 down to 1/beta at the top."""
    if layers == 1:
        return 1.0
    low = 1.0 / beta
    return (2.0 - low) - (2.0 - 2.0 * low) * layer / (layers - 1)


@register
@dataclass
class PyramidKV(Wrapper):
    beta: float = 20.0

    name: ClassVar[str] = "pyramidkv"
    description: ClassVar[str] = "per-layer budgets falling linearly with depth (PyramidKV)"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("beta", self.beta, 1.0)

    def select(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        if not ctx.decoding:
            assert ctx.budget is not None
            held = ctx.view.lengths
            target = ctx.target if ctx.target is not None else ctx.budget
            scaled = torch.round(target.double() * depth_factor(ctx.layer_idx, ctx.num_layers, self.beta)).long()
            least = held.clamp(max=self.min_budget())
            ctx.budget = scaled.maximum(least).minimum(held)
        return self.wrapped.select(ctx)
