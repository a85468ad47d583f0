"""Fold what is evicted into what is kept, instead of dropping it.

Zhang et al., "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML 2024, and Wan et
al., "D2O: Dynamic Discriminative Operations for Efficient Generative Inference of Large
Language Models", 2024: an evicted entry still carries information; merging its value into the
kept entry whose key is most like its own keeps part of it at no extra memory. Here the wrapped
policy chooses what is kept; each evicted entry whose key's cosine similarity to its nearest kept
key (same sequence and head) is at least `threshold` (D2O merges only close pairs) adds its value
to that entry's, weighted by the similarity: v <- (v + sum w_e v_e) / (1 + sum w_e). Keys stay
as they are, so attention still finds the kept entry by its own key. Evicted entries with no
close kept key are dropped, as without merging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvforge.policies.base import StepContext, check_range
from kvforge.policies.registry import register
from kvforge.policies.wrapper import Wrapper


def merged_values(
    keys: torch.Tensor,  # (batch, heads, slots, dim)
    values: torch.Tensor,  # (batch, heads, slots, dim)
    kept: torch.Tensor,  # (batch, heads, slots) bool
    evicted: torch.Tensor,  # (batch, heads, slots) bool
    threshold: float,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new values, changed): each evicted entry's value folded into its nearest kept entry's."""
    unit = F.normalize(keys.float(), dim=-1)
    total = values.float().clone()  # kept entries accumulate v + sum w v_e
    weight = torch.ones(values.shape[:3], device=values.device)
    slots = keys.shape[2]
    for start in range(0, slots, chunk):
        stop = min(start + chunk, slots)
        part = evicted[:, :, start:stop]
        if not bool(part.any()):
            continue
        sim = torch.einsum("bhed,bhkd->bhek", unit[:, :, start:stop], unit)  # (batch, heads, c, slots)
        sim = sim.masked_fill(~kept[:, :, None], float("-inf"))
        best, target = sim.max(-1)  # (batch, heads, c)
        w = torch.where(part & (best >= threshold), best, 0.0)
        total.scatter_add_(2, target[..., None].expand(-1, -1, -1, values.shape[-1]), w[..., None] * values[:, :, start:stop].float())
        weight.scatter_add_(2, target, w)
    changed = kept & (weight > 1)
    return total / weight[..., None], changed


@register
@dataclass
class Merge(Wrapper):
    threshold: float = 0.5

    name: ClassVar[str] = "merge"
    description: ClassVar[str] = "evicted values folded into the most similar kept entry (CaM / D2O)"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("threshold", self.threshold, -1.0, 1.0)

    def state_key(self) -> tuple:
        return self.wrapped.state_key()  # merging changes values kept, not what was observed

    def select(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        index, mask = self.wrapped.select(ctx)
        view = ctx.view
        kept = torch.zeros_like(view.valid).scatter_(-1, index, mask) & view.valid
        values, changed = merged_values(view.keys, view.values, kept, view.valid & ~kept, self.threshold)
        ctx.storage.set_values(view, values, changed)
        return index, mask
