"""Keep what the newest token attends to, evicting as generation goes.

Oren et al., "Transformers are Multi-State RNNs" (TOVA), 2024: at every step drop the entry the
current token attends to least, averaged over heads. Here the score is the attention of the
chunk's last query (the last prompt token at prefill, the new token while decoding), averaged
over the query heads of each KV head's group, and the budget holds while decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvforge.policies.base import Policy, StepContext
from kvforge.policies.registry import register


@register
@dataclass
class TOVA(Policy):
    name: ClassVar[str] = "tova"
    description: ClassVar[str] = "keep what the newest token attends to; holds the budget while decoding (TOVA)"
    holds_budget_while_decoding: ClassVar[bool] = True

    def score(self, ctx: StepContext) -> torch.Tensor:
        return ctx.attention(last=1)  # (batch, kv_heads, slots)
