"""Keep a uniformly random subset: the floor every method must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvforge.policies.base import Policy, StepContext, check_range
from kvforge.policies.registry import register


@register
@dataclass
class Random(Policy):
    seed: int = 0

    name: ClassVar[str] = "random"
    description: ClassVar[str] = "keep a random subset of tokens per head (the floor to beat)"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("seed", self.seed, 0)

    def score(self, ctx: StepContext) -> torch.Tensor:
        # Seeded per layer so a run is reproducible and layers do not share one pattern; drawn
        # per sequence at its own length so a sequence keeps the same tokens alone or in a batch.
        batch, heads, slots = ctx.view.valid.shape
        scores = torch.zeros(batch, heads, slots)
        for b, n in enumerate(ctx.view.lengths.max(dim=1).values.tolist()):
            generator = torch.Generator().manual_seed(self.seed * 100_003 + ctx.layer_idx)
            scores[b, :, :n] = torch.rand(heads, n, generator=generator)
        return scores.to(ctx.view.keys.device)
