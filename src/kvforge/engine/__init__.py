"""Serving: continuous batching over kvforge caches within a KV memory budget."""

from kvforge.engine.engine import Engine
from kvforge.engine.request import Event, KVSettings, Request
from kvforge.engine.sampling import SamplingParams

__all__ = ["Engine", "Event", "KVSettings", "Request", "SamplingParams"]
