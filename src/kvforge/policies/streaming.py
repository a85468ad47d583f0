"""Attention sinks plus a recent window.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (StreamingLLM),
ICLR 2024: the first few tokens absorb attention mass and must stay; the rest is recency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvforge.policies.base import Policy, StepContext, check_range
from kvforge.policies.registry import register


@register
@dataclass
class Streaming(Policy):
    sinks: int = 4

    name: ClassVar[str] = "streaming"
    description: ClassVar[str] = "keep the first `sinks` tokens and the most recent ones (StreamingLLM)"
    holds_budget_while_decoding: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("sinks", self.sinks, 0)

    def min_budget(self) -> int:
        return self.sinks + 1

    def min_budget_reason(self) -> str:
        return f"sinks={self.sinks} plus one recent token"

    def score(self, ctx: StepContext) -> torch.Tensor:
        # Slots are in time order, so the slot index is recency; sinks outrank everything.
        slots = ctx.view.valid.shape[-1]
        recency = torch.arange(slots, device=ctx.view.keys.device, dtype=torch.float32).expand_as(ctx.view.valid)
        return torch.where(recency < self.sinks, float("inf"), recency)
