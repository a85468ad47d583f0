"""Heavy hitters plus recent tokens, by accumulated attention, during prefill and decoding.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023: a few tokens collect most of the attention over time; keep them and a
recent window, evicting as generation goes so the budget holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvforge.policies.base import Policy, StepContext, check_range
from kvforge.policies.registry import register


@register
@dataclass
class H2O(Policy):
    recent_fraction: float = 0.5

    name: ClassVar[str] = "h2o"
    description: ClassVar[str] = "keep heavy hitters by accumulated attention plus recent tokens (H2O)"
    holds_budget_while_decoding: ClassVar[bool] = True
    aux_names: ClassVar[tuple[str, ...]] = ("h2o_attention",)
    attention_state: ClassVar[str | None] = "h2o_attention"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("recent_fraction", self.recent_fraction, 0.0, 1.0)

    def score(self, ctx: StepContext) -> torch.Tensor:
        assert ctx.budget is not None
        recent = torch.ceil(ctx.budget.double() * self.recent_fraction).long()  # (batch, kv_heads)
        slot = torch.arange(ctx.view.valid.shape[-1], device=ctx.view.keys.device)
        # Slots are in time order: the last `recent` real slots of each row are the recent window.
        is_recent = slot >= (ctx.view.lengths - recent)[..., None]
        return torch.where(is_recent, float("inf"), ctx.view.aux["h2o_attention"])
