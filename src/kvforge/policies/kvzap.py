"""Keep what KVzip would keep, predicted from each entry alone: KVzip's choices at one prefill's cost.

Jegou et al., "KVzap: Fast, Adaptive, and Faithful KV Cache Pruning" (the surrogate of KVzip's
scores, also called Fast KVzip), 2025: a small per-layer model trained once per model maps what
is stored for an entry to the score KVzip's reconstruction would give it, so no extra forward
pass is needed. Here the model is linear, per layer and KV head, over what the cache holds for
the entry: the norms of the key's rotary pairs (rotary embedding turns each pair by a
position-dependent angle and keeps its norm), the value, the key, and a constant; it predicts
the logarithm of the KVzip score and is fitted by `kvforge calibrate` (ridge regression on
generated contexts). On the default model, adding the key itself to the position-free features
raised the Spearman correlation with KVzip's scores on a held-out context from 0.67 to 0.87. Like kvzip, the first `sinks` entries are kept and each layer's budget is
spent across its heads by the predicted score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvforge.policies.base import Policy, StepContext, check_range
from kvforge.policies.registry import register
from kvforge.policies.wrapper import spend_across_heads


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
    head_budgets: bool = True

    name: ClassVar[str] = "kvzap"
    description: ClassVar[str] = "keep what a per-layer surrogate of KVzip's scores predicts (KVzap); needs `kvforge calibrate`"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("sinks", self.sinks, 0)

    def score(self, ctx: StepContext) -> torch.Tensor:
        assert ctx.calibration is not None
        view = ctx.view
        weights = ctx.calibration.kvzap[ctx.layer_idx].to(view.positions.device)  # (kv_heads, features)
        features = kvzap_features(view.keys.float(), view.values.float())  # (batch, kv_heads, slots, F)
        predicted = torch.einsum("bhsf,hf->bhs", features, weights)
        slot = torch.arange(predicted.shape[-1], device=predicted.device)
        return torch.where(slot < self.sinks, float("inf"), predicted)

    def select(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.head_budgets or ctx.decoding:
            return super().select(ctx)
        return spend_across_heads(self.score(ctx), ctx, floor=0.0)
