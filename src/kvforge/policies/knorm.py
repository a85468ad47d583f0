"""Keep the tokens whose keys have the smallest L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
EMNLP 2024: low key norm correlates with high attention received.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvforge.policies.base import Policy, StepContext
from kvforge.policies.registry import register


@register
@dataclass
class KNorm(Policy):
    name: ClassVar[str] = "knorm"
    description: ClassVar[str] = "keep tokens with the lowest key L2 norm (Devoto et al. 2024)"

    def score(self, ctx: StepContext) -> torch.Tensor:
        return -ctx.view.keys.float().norm(dim=-1)  # (batch, kv_heads, slots)
