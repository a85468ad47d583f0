"""Keep the keys least like the others.

Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments", 2025: keys pointing away from the average key draw
attention; a key's score is minus its cosine similarity to the mean of the row's keys. No
attention and no query is needed, so it works with any attention kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvforge.policies.base import Policy, StepContext
from kvforge.policies.registry import register


@register
@dataclass
class KeyDiff(Policy):
    name: ClassVar[str] = "keydiff"
    description: ClassVar[str] = "keep keys least similar to the row's mean key (KeyDiff)"

    def score(self, ctx: StepContext) -> torch.Tensor:
        keys = ctx.view.keys.float()  # (batch, kv_heads, slots, head_dim)
        valid = ctx.view.valid[..., None]
        anchor = (keys * valid).sum(2, keepdim=True) / valid.sum(2, keepdim=True).clamp_min(1)
        return -F.cosine_similarity(keys, anchor, dim=-1)  # (batch, kv_heads, slots)
