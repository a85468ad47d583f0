"""kvforge: a KV cache that really holds fewer bytes, with quality measured next to memory.

Importing kvforge changes nothing in transformers; `enable(model)` (or `load_model`) switches
one model to kvforge attention explicitly.
"""

from kvforge.attention import enable
from kvforge.cache import KVCache
from kvforge.calibration.measure import calibrate
from kvforge.generate import prefill
from kvforge.models import load_model
from kvforge.policies import Policy, all_policies, make_policy
from kvforge.spec import KVSpec
from kvforge.storage import QuantSpec

__all__ = ["KVCache", "KVSpec", "Policy", "QuantSpec", "calibrate", "enable", "load_model", "all_policies", "make_policy", "prefill"]
__version__ = "0.1.0"
