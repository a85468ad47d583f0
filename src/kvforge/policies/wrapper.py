"""Policies that wrap another: `adakv:snapkv` spends snapkv's scores under Ada-KV's budgets.

A wrapper changes *how much* each row keeps, or *what unit* is kept, and asks the policy it wraps
for the scores. It delegates everything about observing (per-entry state, attention state,
minimum budget) to the wrapped policy, so any scorer can be wrapped, wrappers included.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from kvforge.policies.base import BUDGET_FIELDS, Policy, Reconstruction, StepContext


@dataclass
class Wrapper(Policy):
    inner: Policy | None = None  # the wrapped policy, given by the name after the colon

    wraps: ClassVar[bool] = True
    example: ClassVar[str] = "snapkv"  # the policy it wraps when run as a registered method

    def __post_init__(self) -> None:
        if self.inner is None:
            raise ValueError(f"policy {self.name!r} wraps another policy: name it {self.name}:<policy>, e.g. {self.name}:snapkv")
        super().__post_init__()

    @property
    def full_name(self) -> str:
        return f"{self.name}:{self.wrapped.full_name}"

    @property
    def wrapped(self) -> Policy:
        assert self.inner is not None
        return self.inner

    # What is observed is the wrapped policy's business.
    @property
    def aux_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.wrapped.aux_names

    @property
    def attention_state(self) -> str | None:  # type: ignore[override]
        return self.wrapped.attention_state

    @property
    def holds_budget_while_decoding(self) -> bool:  # type: ignore[override]
        return self.wrapped.holds_budget_while_decoding

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.wrapped.needs_calibration

    @property
    def defers(self) -> bool:  # type: ignore[override]
        return self.wrapped.defers

    def reconstruction(self) -> Reconstruction | None:
        return self.wrapped.reconstruction()

    def layer_budgets(
        self, targets: list[torch.Tensor | None], states: list[dict[str, torch.Tensor]]
    ) -> list[torch.Tensor | None]:
        return self.wrapped.layer_budgets(targets, states)

    def min_budget(self) -> int:
        return self.wrapped.min_budget() if self.inner is not None else 1

    def min_budget_reason(self) -> str:
        return self.wrapped.min_budget_reason()

    def observe(self, ctx: StepContext) -> None:
        self.wrapped.observe(ctx)

    def score(self, ctx: StepContext) -> torch.Tensor:
        return self.wrapped.score(ctx)

    def state_key(self) -> tuple:
        own = tuple((f.name, getattr(self, f.name)) for f in fields(self) if f.name not in (*BUDGET_FIELDS, "inner"))
        return (type(self), own, self.wrapped.state_key())

    @classmethod
    def parameters(cls) -> list[tuple[str, str, object]]:
        return [p for p in super().parameters() if p[0] != "inner"]


def rows_from_chosen(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, kv_heads, slots) bool of slots to keep -> (index, mask), each (batch, kv_heads, K),
    K the most any row keeps: what `Policy.select` returns."""
    counts = chosen.sum(-1)  # (batch, kv_heads)
    k = max(int(counts.max()), 1)
    index = chosen.float().topk(k, dim=-1).indices
    mask = torch.arange(k, device=chosen.device) < counts[..., None]
    return index, mask


def lexsort_desc(keys: torch.Tensor) -> torch.Tensor:
    """(batch, n, 2) -> (batch, n) indices sorting by key 0, then key 1, both descending."""
    by_second = keys[..., 1].argsort(dim=-1, descending=True, stable=True)
    first = keys[..., 0].gather(1, by_second)
    return by_second.gather(1, first.argsort(dim=-1, descending=True, stable=True))


def spend_across_heads(scores: torch.Tensor, ctx: StepContext, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Select with one budget per layer (Ada-KV): each head first keeps its best `floor` fraction
    of its own budget, then the layer's remaining budget goes to the highest scores of any head.

    scores: (batch, kv_heads, slots). The layer's budget is what ctx.target asks of all heads,
    at most what they hold. Returns (index, mask) as `Policy.select` does."""
    assert ctx.budget is not None
    valid = ctx.view.valid  # (batch, kv_heads, slots)
    scores = scores.float().masked_fill(~valid, float("-inf"))
    batch, heads, slots = scores.shape
    floor_n = torch.ceil(ctx.budget.double() * floor).long().minimum(ctx.budget)  # (batch, kv_heads)
    rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = the head's best
    protected = (rank < floor_n[..., None]) & valid
    # Protected first, then by score; a flat top-k over the layer's heads spends the rest.
    order = torch.stack([protected.float(), scores], -1).view(batch, heads * slots, 2)
    target = ctx.target if ctx.target is not None else ctx.budget
    total = target.sum(-1).minimum(ctx.view.lengths.sum(-1))  # (batch,)
    flat = lexsort_desc(order)[:, : int(total.max())]  # (batch, k)
    chosen = torch.zeros(batch, heads * slots, dtype=torch.bool, device=scores.device)
    chosen.scatter_(1, flat, torch.arange(flat.shape[1], device=scores.device) < total[:, None])
    return rows_from_chosen(chosen.view(batch, heads, slots) & valid)
