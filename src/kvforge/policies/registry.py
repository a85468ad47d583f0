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
        if info.name not in ("base", "registry"):
            importlib.import_module(f"kvforge.policies.{info.name}")


def all_policies() -> dict[str, type[Policy]]:
    """Every registered policy by name, in name order."""
    if not _REGISTRY:
        _load_all()
    return dict(sorted(_REGISTRY.items()))


def make_policy(name: str, **params: Any) -> Policy:
    """Build policy `name` with hyperparameters `params`; errors name the known choices."""
    known = all_policies()
    if name not in known:
        raise ValueError(f"unknown policy {name!r}; known policies: {', '.join(known)}")
    cls = known[name]
    allowed = {p[0] for p in cls.parameters()}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"policy {name!r} has no parameter {unknown[0]!r}; its parameters: {', '.join(sorted(allowed))}")
    return cls(**params)
