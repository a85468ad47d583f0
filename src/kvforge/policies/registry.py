"""The one place policies are keyed by name; CLI names and the test matrix come from here."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, TypeVar

from kvforge.policies.base import Policy

P = TypeVar("P", bound=type[Policy])

_REGISTRY: dict[str, type[Policy]] = {}


def register(cls: P) -> P:
    """Class decorator: make a policy available under its `name`."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"policy {cls.__name__} needs a unique, non-empty name (got {cls.name!r})")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    """Import every module of this package once, so each policy file registers itself."""
    package = importlib.import_module("kvforge.policies")

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in ("base", "registry", "wrapper", "budgets", "names"):
            importlib.import_module(f"kvforge.policies.{info.name}")


def all_policies() -> dict[str, type[Policy]]:
    """Every registered policy by name, in name order."""
    _load_all()  # idempotent: importing a module twice registers nothing twice
    return dict(sorted(_REGISTRY.items()))


def methods() -> list[str]:
    """Every registered method by name, `full` first: each wrapper once, around its `example`
    policy (what `eval`, `bench` and the demo run when no policy is named)."""
    names = [f"{n}:{c.example}" if c.wraps else n for n, c in all_policies().items()]
    return sorted(names, key=lambda n: (n != "full", n))


def _split(name: str) -> tuple[type[Policy], str]:
    """The class of a name's head and the wrapped name after the first colon ('' if none)."""
    known = all_policies()
    head, _, rest = name.partition(":")
    if head not in known:
        where = f" in {name!r}" if head != name else ""
        raise ValueError(f"unknown policy {head!r}{where}; known policies: {', '.join(known)}")
    cls = known[head]
    if cls.wraps and not rest:
        raise ValueError(f"policy {head!r} wraps another policy: name it {head}:<policy>, e.g. {head}:snapkv")
    if rest and not cls.wraps:
        wrappers = ", ".join(n for n, c in known.items() if c.wraps)
        raise ValueError(f"policy {head!r} does not wrap another policy (in {name!r}); wrappers are: {wrappers}")
    return cls, rest


def check_policy_name(name: str) -> None:
    """Raise a ValueError naming what is wrong with a (possibly composed) policy name."""
    _, rest = _split(name)
    if rest:
        check_policy_name(rest)


def parameter_names(name: str) -> list[str]:
    """Every hyperparameter a (possibly composed) policy name accepts."""
    cls, rest = _split(name)
    own = [p[0] for p in cls.parameters()]
    return own + [p for p in parameter_names(rest) if p not in own] if rest else own


def parameter_defaults(name: str) -> dict[str, Any]:
    """Each hyperparameter a (possibly composed) policy name accepts, with the default of the
    outermost policy that has it (the one `make_policy` gives it to)."""
    cls, rest = _split(name)
    return {**(parameter_defaults(rest) if rest else {}), **{p[0]: p[2] for p in cls.parameters()}}


def check_parameters(name: str, given: list[str], written: str | None = None) -> None:
    """Raise a ValueError naming the first of `given` that policy `name` does not take (`written`:
    how the user wrote the policy, for the message)."""
    allowed = parameter_names(name)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"policy {written or name!r} has no parameter {unknown[0]!r}; its parameters: {', '.join(sorted(allowed))}")


def make_policy(name: str, **params: Any) -> Policy:
    """Build policy `name` with hyperparameters `params`; errors name the known choices.

    A composed name (`adakv:chunk:snapkv`) builds each wrapper around the policy named after it.
    Budget fields (ratio, budget, ...) belong to the outermost policy, which is the one that
    evicts; any other parameter goes to the outermost policy that has it."""
    cls, rest = _split(name)
    check_parameters(name, list(params))
    if not rest:
        return cls(**params)
    own_names = {p[0] for p in cls.parameters()}
    own = {k: v for k, v in params.items() if k in own_names}
    inner = make_policy(rest, **{k: v for k, v in params.items() if k not in own_names})
    return cls(inner=inner, **own)
