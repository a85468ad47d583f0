"""A store tier in this process's memory: the entries most recently used, up to a byte limit.

`serve --cpu-memory SIZE` puts it in front of the directory or Redis store (`tiered.py`): a
prefix the engine keeps is there at once (before the slower tier has written it) and a prefix
asked again is read from host memory, not from disk or the network. It holds an entry's bytes as
the other tiers do (quantized codes stay codes), is lost at exit, and is safe to use from the
engine's thread and the store's writer thread together.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from kvforge.store.local import Blocks, EntryInfo, StoreStats


class MemoryStore:
    name = "cpu"

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"--cpu-memory {max_bytes} must be at least 1 byte (e.g. 8GiB)")
        self.max_bytes = max_bytes
        self.stats = StoreStats()
        self._entries: OrderedDict[str, tuple[bytes, EntryInfo]] = OrderedDict()  # least recently used first
        self._blocks: dict[str, tuple[str, int]] = {}  # block hash -> (key, tokens)
        self._nbytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            data, info = found
            info.last_used = time.time()
            self.stats.hits += 1
            self.stats.bytes_read += len(data)
            return data

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def longest(self, keys: list[str]) -> int:
        """The largest i such that keys[i] is held, or -1."""
        with self._lock:
            return max((i for i, key in enumerate(keys) if key in self._entries), default=-1)

    def deepest(self, hashes: list[str]) -> tuple[str, int] | None:
        """As `LocalStore.deepest`."""
        with self._lock:
            return max((self._blocks[h] for h in hashes if h in self._blocks), key=lambda kt: kt[1], default=None)

    def entries(self) -> list[EntryInfo]:
        """Every entry, most recently used first."""
        with self._lock:
            return [info for _, info in reversed(self._entries.values())]

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def put(self, key: str, data: bytes, model: str, settings: str, tokens: int, blocks: Blocks | None = None) -> bool:
        """Hold `data` under `key`, dropping the least recently used entries beyond the limit;
        False when it is larger than the whole limit (nothing held then)."""
        if len(data) > self.max_bytes:
            return False
        now = time.time()
        with self._lock:
            self._drop(key)
            self._entries[key] = (data, EntryInfo(key, len(data), model, settings, tokens, now, now))
            self._blocks.update({h: (key, n) for h, n in (blocks or {}).items()})
            self._nbytes += len(data)
            while self._nbytes > self.max_bytes:
                oldest = next(iter(self._entries))
                self._drop(oldest)
                self.stats.evicted += 1
            self.stats.bytes_written += len(data)
        return True

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._drop(key)

    def _drop(self, key: str) -> bool:
        found = self._entries.pop(key, None)
        if found is not None:
            self._nbytes -= len(found[0])
            for h in [h for h, (k, _) in self._blocks.items() if k == key]:
                del self._blocks[h]
        return found is not None
