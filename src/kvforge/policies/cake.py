"""Per-layer budgets from each layer's attention: spread-out and shifting layers get more.

Qin et al., "CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences", ICLR 2025:
a layer whose attention is spread over many entries (high entropy) and moves from query to query
(high variance over time) needs more of the cache. Each layer's preference is
H^(1/tau1) * V^(1/tau2), from the attention of the chunk's last `preference_window` queries: H the mean
entropy of a query's attention, V the mean over entries of the variance of the attention an entry
gets across those queries (`preference_window`, named apart from the wrapped policy's
`window`). The cache's budget (every layer's prompt budget summed) is split in proportion. The paper cascades the split layer by layer to bound memory during the prefill; here
each prompt chunk is stored whole, scored by the wrapped policy, and every layer is compressed
once the chunk has passed through all of them (`defers`), so the cache holds at most the budget
plus one chunk, which `--prefill-chunk` bounds. Entries are chosen by the wrapped policy's scores;
while decoding the wrapped policy acts alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvforge.policies.base import StepContext, check_range, top_slots
from kvforge.policies.registry import register
from kvforge.policies.wrapper import Wrapper

SCORE, PREFERENCE = "cake_score", "cake_preference"


def window_attention(ctx: StepContext, window: int) -> torch.Tensor:
    """(batch, q_heads, w, slots) attention of the chunk's last `window` queries over what is held."""
    assert ctx.query is not None
    start = max(0, ctx.query.shape[2] - window)
    q = ctx.query[:, :, start:].float()
    keys = ctx.view.keys.float()
    group = q.shape[1] // keys.shape[1]
    logits = torch.einsum("bhqd,bhsd->bhqs", q, keys.repeat_interleave(group, 1)) * ctx.scaling
    allowed = ctx.allowed(start)  # (batch, kv_heads, w, slots)
    return logits.masked_fill(~allowed.repeat_interleave(group, 1), float("-inf")).softmax(-1)


@register
@dataclass
class CAKE(Wrapper):
    preference_window: int = 32
    tau1: float = 1.0
    tau2: float = 1.0

    name: ClassVar[str] = "cake"
    description: ClassVar[str] = "per-layer budgets from each layer's attention entropy and variance (CAKE)"
    defers: ClassVar[bool] = True  # type: ignore[misc]

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("preference_window", self.preference_window, 1)
        check_range("tau1", self.tau1, 1e-3)
        check_range("tau2", self.tau2, 1e-3)

    @property
    def aux_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return (*self.wrapped.aux_names, SCORE)

    def observe(self, ctx: StepContext) -> None:
        self.wrapped.observe(ctx)
        if ctx.decoding:
            return
        ctx.storage.set_aux(SCORE, ctx.view, self.wrapped.score(ctx))
        probs = window_attention(ctx, self.preference_window)  # (batch, q_heads, w, slots)
        real = ctx.query_valid[:, -probs.shape[2] :, None]  # (batch, w, 1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)  # (batch, q_heads, w)
        spread = (entropy * real[:, None, :, 0]).sum(-1) / real.sum(1).clamp_min(1)  # (batch, q_heads)
        shift = probs.var(dim=2).sum(-1) / ctx.view.valid.sum(-1).float().mean(1, keepdim=True).clamp_min(1)
        preference = spread.mean(1).clamp_min(1e-12) ** (1 / self.tau1) * shift.mean(1).clamp_min(1e-12) ** (1 / self.tau2)
        ctx.state[PREFERENCE] = preference  # (batch,)

    def layer_budgets(self, contexts: list[StepContext | None]) -> list[torch.Tensor | None]:
        if any(c is None or c.target is None or PREFERENCE not in c.state for c in contexts):
            return super().layer_budgets(contexts)
        stacked = torch.stack([c.target for c in contexts])  # type: ignore[union-attr]  # (layers, batch, kv_heads)
        preference = torch.stack([c.state[PREFERENCE] for c in contexts]).to(stacked.device)  # type: ignore[union-attr]
        share = preference / preference.sum(0, keepdim=True)
        split = torch.floor(stacked.sum(0, keepdim=True).double() * share[..., None]).long()
        least = self.min_budget()
        return list(split.clamp(min=least))

    def select(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        if ctx.decoding:
            return self.wrapped.select(ctx)
        assert ctx.budget is not None
        return top_slots(ctx.view.aux[SCORE], ctx.budget, ctx.view.valid)
