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

    def given_params(self) -> tuple[tuple[str, object], ...]:
        own = tuple(p for p in super().given_params() if p[0] != "inner")
        return own + tuple(p for p in self.wrapped.given_params() if p[0] not in dict(own))

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

    def layer_budgets(self, contexts: list[StepContext | None]) -> list[torch.Tensor | None]:
        return self.wrapped.layer_budgets(contexts)

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

