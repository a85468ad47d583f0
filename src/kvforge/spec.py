"""One description of a KV setting: what a cache keeps and how it holds it.

A `KVSpec` names a policy (and its parameters), how much it keeps (a ratio evicted, or a budget of
entries per sequence and KV head) and how entries are stored (a quantization). The CLI, eval, the
engine and the server pass this around; it is validated when made, and `build()` is the one place
a policy is built from it. Specs are frozen and hashable: the engine batches requests of equal
specs together, and eval keys its rows by `key`.

A policy with parameters is written `smooth:kvzap[kernel=5,pool=max]` wherever a command takes a
policy name (`parse_name`); reports name it the same way, parameters in name order (`KVSpec.name`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kvforge.policies.base import Policy
from kvforge.policies.names import Params, name_of, parse_name
from kvforge.policies.registry import make_policy, parameter_defaults
from kvforge.storage.codec import QuantSpec

FULL = "full"


@dataclass(frozen=True)
class KVSpec:
    policy: str = FULL
    ratio: float = 0.0  # fraction of the prompt's entries evicted, in [0, 1)
    quant: QuantSpec = field(default_factory=QuantSpec)
    budget: int | None = None  # instead of a ratio: entries kept per sequence and KV head
    params: Params = ()  # the policy's own parameters, (name, value): kept in name order, defaults left out

    def __post_init__(self) -> None:
        if not isinstance(self.policy, str) or not self.policy:
            raise ValueError(f"policy {self.policy!r} must be a policy name, e.g. knorm or adakv:snapkv")
        if "[" in self.policy:
            raise ValueError(f"policy {self.policy!r}: give its parameters as `params` (KVSpec.named reads {self.policy!r})")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float) or not math.isfinite(self.ratio) or not 0 <= self.ratio < 1:
            raise ValueError(f"ratio {self.ratio!r} is outside the allowed range [0, 1): the fraction of entries evicted")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1):
            raise ValueError(f"budget {self.budget!r} must be a whole number of entries >= 1")
        if self.budget is not None and self.ratio:
            raise ValueError(f"give either a ratio ({self.ratio}) or a budget ({self.budget}), not both")
        sizing = [k for k, _ in self.params if k in ("ratio", "budget")]
        if sizing:
            raise ValueError(f"policy {self.name!r}: give its {sizing[0]} as the setting's own (--ratios, --ratio, --budget), not a parameter")
        if self.params:  # one setting, one spec: parameters in name order, those at their default left out
            defaults = parameter_defaults(self.policy)
            held = ((k, tuple(v) if isinstance(v, list) else v) for k, v in self.params)  # specs are hashed
            given = sorted((k, v) for k, v in held if k not in defaults or defaults[k] != v)
            object.__setattr__(self, "params", tuple(given))
        if not isinstance(self.quant, QuantSpec):
            object.__setattr__(self, "quant", QuantSpec.parse(str(self.quant)))
        object.__setattr__(self, "ratio", float(self.ratio))

    @classmethod
    def named(cls, text: str, ratio: float = 0.0, quant: QuantSpec | None = None) -> KVSpec:
        """The setting a written name gives (`parse_name`: parameters in brackets) at `ratio`."""
        policy, params = parse_name(text)
        return cls(policy, ratio, quant if quant is not None else QuantSpec(), params=params)

    @property
    def name(self) -> str:
        """The policy as eval's rows and reports name it: `smooth:kvzap[kernel=5]` (see `parse_name`)."""
        return name_of(self.policy, self.params)

    @property
    def prefix_stable(self) -> bool:
        """Whether a prompt's first tokens' entries do not depend on the tokens after them (the
        `full` policy at full precision): then the first n tokens of such a cache are the cache
        of those n tokens, and blocks of it can be shared or stored by their tokens alone."""
        return self.policy == FULL and not self.quant.enabled

    @property
    def key(self) -> tuple[str, float, str]:
        """(policy name with its parameters, ratio, quantization label): how eval's rows name a setting."""
        return self.name, self.ratio, self.quant.label

    def build(self) -> Policy:
        """The policy this spec names (ValueError naming what is wrong: an unknown policy, a
        parameter it does not take, a value outside its range)."""
        kwargs = dict(self.params)
        if self.budget is not None:
            kwargs["budget"], kwargs["ratio"] = self.budget, 0.0
        elif self.policy != FULL or self.ratio:  # `full` refuses any ratio but 0 itself
            kwargs["ratio"] = self.ratio
        return make_policy(self.policy, **kwargs)
