"""Budgets by coverage: each head keeps the fewest entries holding a share of its score mass.

A ratio gives every head the same number of entries, but heads differ: one attends to a handful
of entries, another spreads its attention over the whole context. `coverage:kvzip` keeps, per
(sequence, KV head) row, the fewest entries whose scores hold `mass` of the row's score mass
(default: 1 - ratio, so at ratio 0.05 the entries holding 95% of it), so easy heads give back
memory and hard ones keep what they need; how many bytes that is follows from the content, and
reports say what they were. With a ratio or a budget, no row keeps more than they allow.

The scores must be shares of attention (`Policy.mass_scores`): kvzip's are the most attention a
reconstruction query paid an entry; kvzap's predict the logarithm of those, so their mass is
their exponential. Entries the wrapped policy always keeps (sinks, entries no pass has scored:
an infinite score) are kept on top and do not count in the mass. Compression waits until the
chunk has passed every layer (and the wrapped policy's passes have run), like kvzip's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvforge.policies.base import StepContext, check_range, top_slots
from kvforge.policies.registry import register
from kvforge.policies.wrapper import Wrapper


def covering_counts(mass: torch.Tensor, share: float) -> torch.Tensor:
    """(batch, heads, slots) non-negative mass of each entry (0 where there is none) -> (batch,
    heads) the fewest entries of each row whose mass adds up to at least `share` of the row's."""
    ranked = mass.sort(dim=-1, descending=True).values
    total = ranked.sum(-1, keepdim=True)
    short = ranked.cumsum(-1) < share * total * (1 - 1e-6)  # entries before the share is reached
    return (short.sum(-1) + 1).where(total[..., 0] > 0, 0).minimum((ranked > 0).sum(-1))


def score_mass(scores: torch.Tensor, kind: str) -> torch.Tensor:
    """Scores -> mass: as they are ("linear") or their exponential ("log"), relative to the row's
    largest so exp cannot overflow; infinite and padding scores carry none."""
    finite = torch.isfinite(scores)
    if kind == "log":
        top = scores.masked_fill(~finite, float("-inf")).amax(-1, keepdim=True).clamp(min=-1e30)
        mass = (scores - top).exp()
    else:
        mass = scores.clamp(min=0)
    return mass.masked_fill(~finite, 0.0)


@register
@dataclass
class Coverage(Wrapper):
    mass: float | None = None  # share of each row's score mass kept; None: 1 - ratio

    name: ClassVar[str] = "coverage"
    description: ClassVar[str] = "each head keeps the fewest entries holding a share of its score mass (kvzip, kvzap scores)"
    example: ClassVar[str] = "kvzip"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mass is not None:
            check_range("mass", self.mass, 0.0, 1.0)
            if self.mass == 0:
                raise ValueError("mass=0 keeps nothing but the sinks; give a share in (0, 1], e.g. --coverage 0.95")
        if self.wrapped.mass_scores is None:
            raise ValueError(
                f"coverage:{self.wrapped.full_name} needs scores that are shares of attention; "
                f"{self.wrapped.full_name}'s scores are not: wrap kvzip or kvzap"
            )

    @property
    def share(self) -> float:
        return self.mass if self.mass is not None else 1.0 - self.ratio

    @property
    def compresses_prompt(self) -> bool:  # type: ignore[override]
        return super().compresses_prompt or self.mass is not None

    @property
    def defers(self) -> bool:  # type: ignore[override]
        return True  # a row's count needs the whole chunk's scores, after every pass

    @property
    def setting(self) -> str:
        capped = self.budget is not None or (self.ratio > 0 and self.mass is not None)
        return f"coverage {self.share:g}" + (f", {super().setting}" if capped else "")

    def prefill_budget(self, tokens: torch.Tensor, held: torch.Tensor) -> torch.Tensor | None:
        cap = super().prefill_budget(tokens, held)
        return held if cap is None and self.mass is not None else cap  # no cap: what each row holds

    def state_key(self) -> tuple:
        return self.wrapped.state_key()  # what is observed is the wrapped policy's, whatever the share

    def layer_budgets(self, contexts: list[StepContext | None]) -> list[torch.Tensor | None]:
        return [None if c is None or c.target is None else self.counts(c) for c in contexts]

    def counts(self, ctx: StepContext) -> torch.Tensor:
        """(batch, kv_heads) entries each row keeps: those always kept, then the fewest covering
        the share of the others' mass; at most the row's target, at least one."""
        assert ctx.target is not None and self.wrapped.mass_scores is not None
        scores = self.score(ctx).float().masked_fill(~ctx.view.valid, float("-inf"))
        forced = (scores == float("inf")).sum(-1)
        covering = covering_counts(score_mass(scores, self.wrapped.mass_scores), self.share)
        return (forced + covering).minimum(ctx.target).clamp(min=1)

    def select(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        if ctx.decoding:
            return self.wrapped.select(ctx)
        assert ctx.budget is not None
        return top_slots(self.score(ctx), ctx.budget, ctx.view.valid)
