"""Keep what KVzip would keep, predicted from each entry alone: KVzip's choices at one prefill's cost.

Jegou et al., "KVzap: Fast, Adaptive, and Faithful KV Cache Pruning" (the surrogate of KVzip's
scores, also called Fast KVzip), 2025: a small per-layer model trained once per model maps what
is stored for an entry to the score KVzip's reconstruction would give it, so no extra forward
pass is needed. Here the model is linear, per layer and KV head, over what the cache holds for
the entry: the norms of the key's rotary pairs (rotary embedding turns each pair by a
position-dependent angle and keeps its norm), the value, the key, and a constant; it predicts
the logarithm of the KVzip score and is fitted by `kvforge calibrate` (ridge regression on
generated contexts). Budgets are spread like kvzip's (by default one threshold over every layer
and head; the prompt chunk is then compressed once it passed every layer). On the default model, adding the key itself to the position-free features
raised the Spearman correlation with KVzip's scores on a held-out context from 0.67 to 0.87. Like kvzip, the first `sinks` entries are kept and each layer's budget is
spent across its heads by the predicted score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvforge.policies.base import Policy, StepContext, check_range
from kvforge.policies.registry import register
from kvforge.policies.budgets import check_spread, spread_select, spread_targets


def kvzap_features(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(..., head_dim) keys and values -> (..., 2.5 head_dim + 1) features: the norm of each
    rotary pair of the key (dims i and i + head_dim / 2, as Llama-style rotary pairs them), the
    value, the key itself, and 1."""
    half = keys.shape[-1] // 2
    pairs = torch.sqrt(keys[..., :half] ** 2 + keys[..., half:] ** 2)
    return torch.cat([pairs, values, keys, torch.ones_like(values[..., :1])], -1)


@register
@dataclass
class KVzap(Policy):
    sinks: int = 4
    spread: str = "model"  # as kvzip's: one threshold over all layers and heads, per layer, or per head

    name: ClassVar[str] = "kvzap"
    description: ClassVar[str] = "keep what a per-layer surrogate of KVzip's scores predicts (KVzap); needs `kvforge calibrate`"
    needs_calibration: ClassVar[bool] = True
    mass_scores: ClassVar[str | None] = "log"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("sinks", self.sinks, 0)
        check_spread(self.spread)

    @property
    def defers(self) -> bool:  # type: ignore[override]
        # One threshold over all layers needs every layer's entries: compress after the forward.
        return self.spread == "model"

    def score(self, ctx: StepContext) -> torch.Tensor:
        assert ctx.calibration is not None
        view = ctx.view
        weights = ctx.calibration.kvzap[ctx.layer_idx].to(view.positions.device)  # (kv_heads, features)
        features = kvzap_features(view.keys.float(), view.values.float())  # (batch, kv_heads, slots, F)
        predicted = torch.einsum("bhsf,hf->bhs", features, weights)
        slot = torch.arange(predicted.shape[-1], device=predicted.device)
        return torch.where(slot < self.sinks, float("inf"), predicted)

    def layer_budgets(self, contexts: list[StepContext | None]) -> list[torch.Tensor | None]:
        return spread_targets(self.score, contexts, self.spread)

    def select(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        return spread_select(self.score(ctx), ctx, self.spread)
