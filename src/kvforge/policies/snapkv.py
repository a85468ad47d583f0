"""Keep what the last prompt tokens attend to.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024:
the attention of an observation window at the end of the prompt, pooled along the sequence,
predicts what generation will read. The window itself is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvforge.policies.base import Policy, StepContext, check_range
from kvforge.policies.registry import register


@register
@dataclass
class SnapKV(Policy):
    window: int = 64
    kernel: int = 5
    pooling: str = "avg"

    name: ClassVar[str] = "snapkv"
    description: ClassVar[str] = "keep tokens the last `window` prompt tokens attend to, pooled (SnapKV)"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("window", self.window, 1)
        check_range("kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel={self.kernel} must be odd so pooling keeps positions centred; use e.g. 5 or 7")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"pooling={self.pooling!r} is not one of 'avg', 'max'")

    def min_budget(self) -> int:
        return self.window

    def min_budget_reason(self) -> str:
        return f"its observation window={self.window} is always kept"

    def score(self, ctx: StepContext) -> torch.Tensor:
        attn = ctx.attention(last=self.window)  # (batch, kv_heads, slots)
        batch, heads, slots = attn.shape
        pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
        pooled = pool(attn.reshape(batch * heads, 1, slots), self.kernel, stride=1, padding=self.kernel // 2)
        pooled = pooled.view(batch, heads, slots)
        window_start = ctx.query_positions[max(0, ctx.query_positions.numel() - self.window)]
        return torch.where(ctx.view.positions >= window_start, float("inf"), pooled)
