"""Keep the keys that point where the head's queries point.

Godey et al., "Q-Filters: Leveraging QK Geometry for Efficient KV Cache Compression", 2025: the
queries of a head are spread mostly along one direction u, so a query's dot product with a key
is, in expectation, proportional to the key's projection on u. The score of an entry is k . u,
with u the head's main query direction measured once per model by `kvforge calibrate` (first
right singular vector of its queries, signed so queries project positively on it). No attention
is computed, so it works with any attention kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvforge.policies.base import Policy, StepContext
from kvforge.policies.registry import register


@register
@dataclass
class QFilters(Policy):
    name: ClassVar[str] = "qfilters"
    description: ClassVar[str] = "keep keys along each head's main query direction (Q-Filters); needs `kvforge calibrate`"
    needs_calibration: ClassVar[bool] = True

    def score(self, ctx: StepContext) -> torch.Tensor:
        assert ctx.calibration is not None
        direction = ctx.calibration.query_direction[ctx.layer_idx].to(ctx.view.keys.device)  # (kv_heads, head_dim)
        return torch.einsum("bhsd,hd->bhs", ctx.view.keys.float(), direction)
