"""A store of compressed caches in a Redis server (redis-py), shared by several kvforge servers or
machines: an entry one of them writes is a hit for the others. The same entries as the local
store (`local.py`), in these Redis keys:

    kvforge:entry:<key>   the entry's bytes (they end with their SHA-256 digest)
    kvforge:info:<key>    hash: size, model, settings, tokens, created
    kvforge:used          sorted set: key -> last use (eviction takes the lowest)
    kvforge:bytes         the bytes of every entry, kept by the writers
    kvforge:blocks        hash: a full block's chained hash -> "<key> <tokens>" (`local.Blocks`)
    kvforge:blockset:<key>  set: the block hashes an entry put there, dropped with it (a hash a
                          later entry took over goes too: a miss, never a wrong entry)

A write is one MULTI/EXEC transaction (entry, info, last use, byte count), then the least recently
used entries go while the count is above `max_bytes`. The digest is checked on every read, so a
damaged entry is a miss, dropped and counted. A server that cannot be reached makes every
operation a miss (or a write not done) with one warning, so whoever uses the store goes on
without it; it is tried again at the next operation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kvforge.store.entry import intact
from kvforge.store.local import Blocks, EntryInfo, StoreStats

log = logging.getLogger(__name__)
T = TypeVar("T")
PREFIX = "kvforge:"


class RedisStore:
    name = "redis"  # the tier, in /metrics

    def __init__(self, url: str, max_bytes: int | None = None) -> None:
        try:
            import redis
        except ImportError:
            raise ValueError("--store redis://... needs redis-py: pip install 'kvforge[redis]'") from None
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"--store-size {max_bytes} must be at least 1 byte")
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        except ValueError as err:
            raise ValueError(f"--store {url!r} is not a Redis URL ({err}); write redis://HOST:PORT/DB") from None
        self.url, self.max_bytes, self.stats = url, max_bytes, StoreStats()
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self._warned = False

    def _safely(self, what: str, call: Callable[[], T], fallback: T) -> T:
        """`call()`, or `fallback` with one warning while the server cannot be reached."""
        try:
            result = call()
        except self._errors as err:
            if not self._warned:
                log.warning("the Redis store %s cannot be reached (%s): going on without it", self.url, err)
                self._warned = True
            log.debug("Redis store: %s skipped", what)
            return fallback
        self._warned = False
        return result

    def reachable(self) -> bool:
        """Whether the server answers now (the CLI's store commands refuse to go on without it)."""
        try:
            return bool(self.client.ping())
        except self._errors:
            return False

    # --- reading -------------------------------------------------------------------------------

    def contains(self, key: str) -> bool:
        return self._safely("contains", lambda: bool(self.client.exists(PREFIX + "entry:" + key)), False)

    def longest(self, keys: list[str]) -> int:
        """The largest i such that keys[i] is stored, or -1 (one round trip per 500 keys)."""

        def look() -> int:
            best = -1
            for start in range(0, len(keys), 500):
                pipe = self.client.pipeline(transaction=False)
                for key in keys[start : start + 500]:
                    pipe.exists(PREFIX + "entry:" + key)
                best = max([start + i for i, there in enumerate(pipe.execute()) if there], default=best)
            return best

        return self._safely("longest", look, -1)

    def deepest(self, hashes: list[str]) -> tuple[str, int] | None:
        """As `LocalStore.deepest`."""

        def look() -> tuple[str, int] | None:
            found = [v.decode().split() for v in self.client.hmget(PREFIX + "blocks", hashes) if v is not None] if hashes else []
            return max(((key, int(tokens)) for key, tokens in found), key=lambda kt: kt[1], default=None)

        return self._safely("deepest", look, None)

    def get(self, key: str) -> bytes | None:
        data = self._safely("get", lambda: self.client.get(PREFIX + "entry:" + key), None)
        if data is None:
            self.stats.misses += 1
            return None
        if not intact(data):
            log.warning("Redis store entry %s is damaged: dropped", key[:12])
            self.stats.corrupt += 1
            self.stats.misses += 1
            self.delete(key)
            return None
        self._safely("touch", lambda: self.client.zadd(PREFIX + "used", {key: time.time()}), None)
        self.stats.hits += 1
        self.stats.bytes_read += len(data)
        return data

    def entries(self) -> list[EntryInfo]:
        def read() -> list[EntryInfo]:
            used = self.client.zrevrange(PREFIX + "used", 0, -1, withscores=True)
            out = []
            for raw, last in used:
                key = raw.decode()
                info = {k.decode(): v.decode() for k, v in self.client.hgetall(PREFIX + "info:" + key).items()}
                if info:
                    out.append(EntryInfo(key, int(info["size"]), info["model"], info["settings"], int(info["tokens"]), float(info["created"]), last))
            return out

        return self._safely("entries", read, [])

    @property
    def nbytes(self) -> int:
        return self._safely("nbytes", lambda: int(self.client.get(PREFIX + "bytes") or 0), 0)

    # --- writing -------------------------------------------------------------------------------

    def put(self, key: str, data: bytes, model: str, settings: str, tokens: int, blocks: Blocks | None = None) -> bool:
        if self.max_bytes is not None and len(data) > self.max_bytes:
            log.warning("a store entry of %d bytes is larger than --store-size (%d): not stored", len(data), self.max_bytes)
            return False

        def write() -> bool:
            self._drop(key)  # a replaced entry's bytes leave the count first
            now = time.time()
            pipe = self.client.pipeline(transaction=True)
            pipe.set(PREFIX + "entry:" + key, data)
            pipe.hset(PREFIX + "info:" + key, mapping={"size": len(data), "model": model, "settings": settings, "tokens": tokens, "created": now})
            pipe.zadd(PREFIX + "used", {key: now})
            pipe.incrby(PREFIX + "bytes", len(data))
            if blocks:  # hash -> "key tokens", and the entry's hashes, to drop them with it
                pipe.hset(PREFIX + "blocks", mapping={h: f"{key} {n}" for h, n in blocks.items()})
                pipe.sadd(PREFIX + "blockset:" + key, *blocks)
            pipe.execute()
            self._evict(keep=key)
            return True

        done = self._safely("put", write, False)
        if done:
            self.stats.bytes_written += len(data)
        return done

    def _evict(self, keep: str) -> None:
        while self.max_bytes is not None and int(self.client.get(PREFIX + "bytes") or 0) > self.max_bytes:
            oldest = [k.decode() for k in self.client.zrange(PREFIX + "used", 0, 1)]
            victim = next((k for k in oldest if k != keep), None)
            if victim is None:
                return
            self._drop(victim)
            self.stats.evicted += 1

    def _drop(self, key: str) -> bool:
        size = self.client.hget(PREFIX + "info:" + key, "size")
        hashes = self.client.smembers(PREFIX + "blockset:" + key)
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(PREFIX + "entry:" + key, PREFIX + "info:" + key, PREFIX + "blockset:" + key)
        if hashes:
            pipe.hdel(PREFIX + "blocks", *hashes)
        pipe.zrem(PREFIX + "used", key)
        if size is not None:
            pipe.decrby(PREFIX + "bytes", int(size))
        return bool(pipe.execute()[0])

    def delete(self, key: str) -> bool:
        return self._safely("delete", lambda: self._drop(key), False)


def open_store(where: str, max_bytes: int | None = None, cpu_bytes: int | None = None) -> Any:
    """A Redis store for redis://... (rediss://, unix://), else a local directory store; with
    `cpu_bytes`, behind a tier in this process's memory of that size (`tiered.py`)."""
    from kvforge.store.local import LocalStore
    from kvforge.store.memory import MemoryStore
    from kvforge.store.tiered import TieredStore

    store = RedisStore(where, max_bytes) if where.startswith(("redis://", "rediss://", "unix://")) else LocalStore(where, max_bytes)
    return store if cpu_bytes is None else TieredStore(MemoryStore(cpu_bytes), store)
