"""One budget per layer, spent across its heads by score, with a floor per head.

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference", 2024: heads differ in how concentrated their attention is, so a layer's budget
is better spent where the scores are high than split evenly. Each head first keeps its own top
`floor` fraction of an even share (the paper's safeguard, 0.2 by default); the rest of the
layer's budget goes to the highest scores of any head. Heads end up holding different numbers
of entries, and the storage holds exactly that many.

Scores are compared across heads as the wrapped policy gives them (attention mass for snapkv,
h2o and tova, which is comparable across heads). While decoding each head keeps the share the
prompt left it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvforge.policies.base import StepContext, check_range
from kvforge.policies.registry import register
from kvforge.policies.budgets import spend_across_heads
from kvforge.policies.wrapper import Wrapper


@register
@dataclass
class AdaKV(Wrapper):
    floor: float = 0.2

    name: ClassVar[str] = "adakv"
    description: ClassVar[str] = "one budget per layer, spent across heads by score with a per-head floor (Ada-KV)"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("floor", self.floor, 0.0, 1.0)

    def select(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        if ctx.decoding:
            return self.wrapped.select(ctx)
        return spend_across_heads(self.score(ctx), ctx, self.floor)
