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
from kvforge.policies.wrapper import Wrapper, lexsort_desc, rows_from_chosen


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
        assert ctx.budget is not None
        valid = ctx.view.valid  # (batch, kv_heads, slots)
        scores = self.score(ctx).float().masked_fill(~valid, float("-inf"))
        batch, heads, slots = scores.shape
        # The floor: each head's own best entries, ahead of every other entry of the layer.
        floor = torch.ceil(ctx.budget.double() * self.floor).long().minimum(ctx.budget)  # (batch, kv_heads)
        rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = the head's best
        protected = (rank < floor[..., None]) & valid
        # Protected first, then by score; a flat top-k over the layer's heads spends the rest.
        order = torch.stack([protected.float(), scores], -1).view(batch, heads * slots, 2)
        # The layer's budget: what it asks of every head together, at most what they hold.
        target = ctx.target if ctx.target is not None else ctx.budget
        total = target.sum(-1).minimum(ctx.view.lengths.sum(-1))  # (batch,)
        flat = lexsort_desc(order)[:, : int(total.max())]  # (batch, k)
        chosen = torch.zeros(batch, heads * slots, dtype=torch.bool, device=scores.device)
        take = torch.arange(flat.shape[1], device=scores.device) < total[:, None]
        chosen.scatter_(1, flat, take)
        return rows_from_chosen(chosen.view(batch, heads, slots) & valid)

