"""Compression policies, one per file; see `all_policies()` for the list."""

from kvforge.policies.base import Policy, StepContext
from kvforge.policies.registry import all_policies, check_policy_name, make_policy, methods, register

__all__ = ["Policy", "StepContext", "all_policies", "check_policy_name", "make_policy", "methods", "register"]
