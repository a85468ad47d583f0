"""Two store tiers as one: host memory (`memory.py`) in front of a directory or a Redis server.

Writes go to both, the memory tier first: an entry is found at once, and survives a restart once
the lower tier has it. Reads try the memory tier, then the lower one; an entry read from below is
brought up, so the next read of it is from memory. The lower tier checks every entry's digest on
read as it does alone; the memory tier holds only bytes that were checked or made here.

`stats` counts what callers saw (a hit in either tier is one hit); each tier keeps its own
(`tiers`), which /metrics reports per tier.
"""

from __future__ import annotations

from kvforge.store.local import Blocks, EntryInfo, LocalStore, StoreStats
from kvforge.store.memory import MemoryStore
from kvforge.store.shared import RedisStore


class TieredStore:
    def __init__(self, upper: MemoryStore, lower: LocalStore | RedisStore) -> None:
        self.upper, self.lower = upper, lower
        self.tiers: list[MemoryStore | LocalStore | RedisStore] = [upper, lower]
        self.stats = StoreStats()

    def get(self, key: str) -> bytes | None:
        data = self.upper.get(key)
        if data is None:
            data = self.lower.get(key)
            if data is not None:  # brought up; `entries` lists it with the lower tier's description
                self.upper.put(key, data, "", "", 0)
        if data is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.stats.bytes_read += len(data)
        return data

    def contains(self, key: str) -> bool:
        return self.upper.contains(key) or self.lower.contains(key)

    def longest(self, keys: list[str]) -> int:
        return max(self.upper.longest(keys), self.lower.longest(keys))

    def deepest(self, hashes: list[str]) -> tuple[str, int] | None:
        found = [f for f in (self.upper.deepest(hashes), self.lower.deepest(hashes)) if f is not None]
        return max(found, key=lambda kt: kt[1], default=None)

    def entries(self) -> list[EntryInfo]:
        """What the lower tier holds, and what only the memory tier holds (not written yet)."""
        below = self.lower.entries()
        known = {e.key for e in below}
        return [e for e in self.upper.entries() if e.key not in known] + below

    @property
    def nbytes(self) -> int:
        return self.lower.nbytes

    def put(self, key: str, data: bytes, model: str, settings: str, tokens: int, blocks: Blocks | None = None) -> bool:
        held = self.upper.put(key, data, model, settings, tokens, blocks)
        kept = self.lower.put(key, data, model, settings, tokens, blocks)
        if held or kept:
            self.stats.bytes_written += len(data)
        self.stats.evicted = sum(tier.stats.evicted for tier in self.tiers)
        return held or kept

    def delete(self, key: str) -> bool:
        return self.upper.delete(key) | self.lower.delete(key)
