"""The engine's store tier: kept prefixes also go to a persistent store of compressed caches
(`kvforge.store`), and a request whose prompt starts with a stored prefix starts from it, after a
restart or on another server sharing the directory.

Writing happens off the engine thread: the engine only copies the prefix's blocks out (an entry's
bytes), one worker thread writes them. Reading happens on the engine thread when a request
starts: the longest stored prefix of its prompt is found in one index query, read, checked and
decoded into the engine's memory. Any failure (a damaged entry, a memory too full to take it,
an unreadable directory) is a miss: the request is prefilled as if nothing were stored.

A request that marks documents in its prompt (`Request.documents`) is blended instead
(`kvforge.blend`): each document is found in the store as prefilled alone, wherever it sits in
the prompt, and spliced; the engine prefills what follows the last one.
"""

from __future__ import annotations

import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from kvforge.blend import blend
from kvforge.cache import KVCache
from kvforge.engine.request import KVSettings
from kvforge.memory import OutOfBlocks
from kvforge.models import LoadedModel
from kvforge.store import LocalStore, RedisStore
from kvforge.store.documents import load, settings_label
from kvforge.store.entry import block_keys, blocks_of, encode, entry_key, prefix_keys, variant

log = logging.getLogger(__name__)


@dataclass
class BlendStats:
    """Requests whose documents were blended from the store (/metrics)."""

    requests: int = 0
    documents_stored: int = 0  # documents found in the store (the others were prefilled alone and stored)
    refreshed_tokens: int = 0


class StoreTier:
    def __init__(self, store: LocalStore | RedisStore, model: str, dtype: torch.dtype, chunk: int) -> None:
        self.store, self.model = store, model
        self.variant = variant(chunk, dtype)  # as `kvforge prefill --prefill-chunk` keys it
        self.chunk = chunk
        self.blended = BlendStats()
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="kvforge-store")

    def keep(self, kv: KVSettings, tokens: list[int], cache: KVCache) -> None:
        """Store a kept prefix unless it is there already (its bytes copied now, written later)."""
        key = entry_key(self.model, kv, tokens, self.variant)
        try:
            if self.store.contains(key):
                return
            data = encode(cache, kv, tokens, self.variant)
        except Exception:  # the store is an optimisation: fail no one for it
            log.exception("copying a prefix for the store failed")
            return
        self.writer.submit(self._put, key, data, settings_label(kv), len(tokens), blocks_of(cache, kv, tokens, self.variant))

    def _put(self, key: str, data: bytes, settings: str, tokens: int, blocks: dict[str, int]) -> None:
        try:
            self.store.put(key, data, self.model, settings, tokens, blocks)
        except Exception:
            log.exception("writing a prefix to the store failed")

    def find(self, kv: KVSettings, tokens: list[int], empty: KVCache) -> int:
        """Fill `empty` (a new cache of `kv` over the engine's memory) from the longest stored
        prefix of tokens[:-1] (one token at least is left to prefill); the tokens it holds, 0 on
        a miss (then `empty` holds nothing)."""
        try:
            keys = prefix_keys(self.model, kv, tokens[:-1], self.variant)
            n = self.store.longest(keys) + 1
            if kv.prefix_stable:  # also the first blocks of a longer entry (a partial-document hit)
                hashes = block_keys(self.model, kv, tokens[:-1], empty.memory.block_size, self.variant)  # type: ignore[union-attr]
                deepest = self.store.deepest(hashes)
                if deepest is not None and deepest[1] > n:
                    key, part = deepest
                    return part if load(self.store, key, empty, kv, part, self.variant) else 0
            if n == 0:
                self.store.stats.misses += 1
                return 0
            return n if load(self.store, keys[n - 1], empty, kv, tokens[:n], self.variant) else 0
        except (OutOfBlocks, OSError, sqlite3.Error) as err:
            log.warning("a stored prefix could not be used (%s): prefilling instead", err)
            empty.reset()  # whatever was brought in goes back to the pool
            return 0

    def blend(self, loaded: LoadedModel, kv: KVSettings, tokens: list[int], documents: list[tuple[int, int]], empty: KVCache, share: float) -> int:
        """Fill `empty` with `tokens` up to the end of their last document (`documents`: ascending
        (start, end) spans), the documents reused from the store wherever they sit
        (`kvforge.blend`; one missing is prefilled alone and stored first); the tokens it holds,
        0 when blending failed (then `empty` holds nothing and the request is prefilled)."""
        if documents[-1][1] >= len(tokens):  # the engine prefills one token at least
            return 0
        segments: list[list[int]] = []
        kinds: list[bool] = []
        at = 0
        for start, end in documents:
            if start > at:
                segments.append(tokens[at:start])
                kinds.append(False)
            segments.append(tokens[start:end])
            kinds.append(True)
            at = end
        try:
            stored, refreshed = blend(loaded, kv, empty, segments, kinds, self.store, share, self.chunk)
        except (OutOfBlocks, OSError, sqlite3.Error) as err:
            log.warning("stored documents could not be blended (%s): prefilling instead", err)
            empty.reset()  # whatever was brought in goes back to the pool
            return 0
        self.blended.requests += 1
        self.blended.documents_stored += stored
        self.blended.refreshed_tokens += refreshed
        return at

    def close(self) -> None:
        self.writer.shutdown(wait=True)
