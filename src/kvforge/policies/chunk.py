"""Keep or drop whole spans of tokens instead of single tokens.

Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM
Inference", 2025: token-level selection keeps fragments of a phrase (two digits of a seven-digit
number); scoring fixed spans of `size` tokens (the paper's 10) by their tokens' scores and
keeping the best spans whole keeps phrases whole. Spans are cut by logical position from the
row's oldest held entry (the first token, unless it was evicted), so padding does not move them;
only the last span that fits is cut short.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvforge.policies.base import StepContext, check_range
from kvforge.policies.registry import register
from kvforge.policies.budgets import lexsort_desc
from kvforge.policies.wrapper import Wrapper


@register
@dataclass
class ChunkKV(Wrapper):
    size: int = 10

    name: ClassVar[str] = "chunk"
    description: ClassVar[str] = "keep whole spans of `size` tokens, by the summed score of the wrapped policy (ChunkKV)"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("size", self.size, 1)

    def _scores(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(span score, token score) per slot, each (batch, kv_heads, slots): a span scores the
        mean of its tokens' scores, or +inf if it holds a must-keep entry (an infinite score)."""
        tokens = self.wrapped.score(ctx).float()
        valid = ctx.view.valid
        positions = ctx.view.positions
        oldest = positions.masked_fill(~valid, positions.max() + 1).amin(-1, keepdim=True)
        span = torch.div((positions - oldest).clamp(min=0), self.size, rounding_mode="floor").masked_fill(~valid, 0)
        finite = tokens.masked_fill(~valid | tokens.isinf(), 0.0)
        spans = int(span.max()) + 1
        zeros = torch.zeros(*span.shape[:2], spans, device=span.device)
        total = zeros.scatter_add(-1, span, finite)
        members = zeros.scatter_add(-1, span, valid.float()).clamp_min(1)
        forced = zeros.scatter_add(-1, span, (tokens == float("inf")).float()) > 0
        per_span = (total / members).masked_fill(forced, float("inf")).gather(-1, span)
        return per_span.masked_fill(~valid, float("-inf")), tokens

    def score(self, ctx: StepContext) -> torch.Tensor:
        # Seen from a wrapper around this one (adakv:chunk:...): the span's score, in the wrapped
        # policy's units; the order inside a span is then left to that wrapper.
        return self._scores(ctx)[0]

    def select(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        assert ctx.budget is not None
        per_span, tokens = self._scores(ctx)
        batch, heads, slots = per_span.shape
        # Best spans first; inside a span (the one cut short) the wrapped policy's order.
        keys = torch.stack([per_span, tokens.masked_fill(~ctx.view.valid, float("-inf"))], -1)
        order = lexsort_desc(keys.view(batch * heads, slots, 2)).view(batch, heads, slots)
        k = int(ctx.budget.max())
        index = order[..., :k]
        mask = torch.arange(k, device=index.device) < ctx.budget[..., None]
        return index, mask & ctx.view.valid.gather(-1, index)
