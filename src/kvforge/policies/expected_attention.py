"""Keep what the queries still to come are expected to attend to.

Devoto et al., "Expected Attention: KV Cache Compression by Estimating Attention from Future
Queries Distribution", 2025: model the coming queries as a Gaussian fitted to the latest ones
(mean mu, covariance Sigma per query head); the expected attention logit of key k is then
mu.k s + k^T Sigma k s^2 / 2 (s the attention scaling), a softmax over the row turns it into
expected attention, averaged over the group's query heads, and each entry's score is that times
the norm of its value (plus `epsilon`, as the paper does), since an entry's effect on the
output scales with |v|.

Left open by the paper and chosen here: the statistics come from the last `window` queries of
each prompt chunk as they were (after rotary embedding, at their own positions) rather than
rotated to future positions, which the cache cannot do without the model's rotary table; the
last `window` entries are always kept, as their queries defined the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvforge.policies.base import Policy, StepContext, check_range
from kvforge.policies.registry import register


@register
@dataclass
class ExpectedAttention(Policy):
    window: int = 64
    epsilon: float = 0.02

    name: ClassVar[str] = "expected_attention"
    description: ClassVar[str] = "keep what a Gaussian model of the coming queries attends to, times |v| (Expected Attention)"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("window", self.window, 1)
        check_range("epsilon", self.epsilon, 0.0)

    def score(self, ctx: StepContext) -> torch.Tensor:
        view = ctx.view
        keys = view.keys.float()  # (batch, kv_heads, slots, d)
        batch, heads, slots, dim = keys.shape
        start = max(0, ctx.query.shape[2] - self.window)
        q = ctx.query[:, :, start:].float()  # (batch, q_heads, w, d)
        w = ctx.query_valid[:, start:].float()[:, None, :, None]  # (batch, 1, w, 1)
        count = w.sum(2, keepdim=True).clamp_min(1)
        mean = (q * w).sum(2, keepdim=True) / count  # (batch, q_heads, 1, d)
        centred = (q - mean) * w
        cov = centred.transpose(-1, -2) @ centred / count  # (batch, q_heads, d, d)
        group = q.shape[1] // heads
        mean = mean.view(batch, heads, group, dim)
        cov = cov.view(batch, heads, group, dim, dim)
        s = ctx.scaling
        logits = torch.einsum("bhgd,bhld->bhgl", mean, keys) * s
        logits = logits + 0.5 * s * s * torch.einsum("bhld,bhgde,bhle->bhgl", keys, cov, keys)
        logits = logits.masked_fill(~view.valid[:, :, None], float("-inf"))
        expected = logits.softmax(-1).mean(2)  # (batch, kv_heads, slots)
        score = (expected + self.epsilon) * view.values.float().norm(dim=-1)
        recent = view.positions >= ctx.query_positions[start]
        return torch.where(recent, float("inf"), score)

    def min_budget(self) -> int:
        return self.window

    def min_budget_reason(self) -> str:
        return f"its last window={self.window} entries are always kept"
