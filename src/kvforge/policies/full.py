"""No compression: the reference every other policy is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvforge.policies.base import Policy, check_range
from kvforge.policies.registry import register


@register
@dataclass
class Full(Policy):
    ratio: float = 0.0

    name: ClassVar[str] = "full"
    description: ClassVar[str] = "keep every token (no compression); the reference"

    def __post_init__(self) -> None:
        check_range("ratio", self.ratio, 0.0, 0.0)
        for name in ("budget", "decode_budget"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}={getattr(self, name)} does not apply to policy 'full', which keeps every token")
