"""A store of compressed caches in a local directory, shared safely by several processes.

    DIR/index.sqlite          key, size, model, settings, tokens, created, last use (WAL mode)
    DIR/entries/ab/<key>.kvf  one entry (`entry.py`): its bytes end with their SHA-256 digest

A put writes the entry to a temporary file in the same directory and fsyncs it; then, holding the
index's write lock, renames it into place (atomic: a reader sees the whole old file or the whole
new one) and records it, evicting the least recently used entries beyond `max_bytes` in the same
transaction. Every rename and removal of an entry's file happens under that lock, beside its
index row. A writer killed at any point leaves at worst a temporary file (never read) or, between
rename and commit, a whole file under an index row of its older size. A get checks the file's
digest before anyone decodes it; a file found missing, short or altered (read again under the lock,
so a concurrent replacement is not taken for damage) is dropped from the index and counted
(`stats.corrupt`), and the caller prefills as if nothing were stored.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvforge.store.entry import intact

log = logging.getLogger(__name__)

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS entries (
        key TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        model TEXT NOT NULL,
        settings TEXT NOT NULL,
        tokens INTEGER NOT NULL,
        created REAL NOT NULL,
        last_used REAL NOT NULL
    )""",
    # The full blocks an entry's first tokens make (`Blocks`): a prompt sharing only them finds it.
    "CREATE TABLE IF NOT EXISTS blocks (hash TEXT PRIMARY KEY, key TEXT NOT NULL, tokens INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS blocks_by_key ON blocks (key)",
]

Blocks = dict[str, int]  # the chained hash of each full block of an entry's tokens -> tokens up to its end


@dataclass
class EntryInfo:
    key: str
    size: int
    model: str
    settings: str
    tokens: int
    created: float
    last_used: float


@dataclass
class StoreStats:
    """What this process saw of the store (the server's /metrics reads it)."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evicted: int = 0


LOCK_TIMEOUT = 30.0  # seconds an operation waits for another process's lock on the index


def _use_wal(db: sqlite3.Connection) -> None:
    """Put the index in WAL mode (it stays so: the mode is kept in the file). Switching takes the
    database alone, and SQLite answers "database is locked" at once, without waiting, when another
    process has it open meanwhile (several processes opening a new directory together): retried
    until LOCK_TIMEOUT. Once the file is in WAL mode nothing is switched."""
    deadline = time.monotonic() + LOCK_TIMEOUT
    while True:
        try:
            # fetchall: the statement is finished, so this connection holds no lock while switching.
            if db.execute("PRAGMA journal_mode").fetchall()[0][0].lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class LocalStore:
    name = "disk"  # the tier, in /metrics

    def __init__(self, root: str | Path, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"--store-size {max_bytes} must be at least 1 byte")
        self.root, self.max_bytes = Path(root), max_bytes
        try:
            (self.root / "entries").mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"--store {str(root)!r} cannot be used as a store directory: {err}") from err
        self.stats = StoreStats()
        db = self._connect()
        try:
            _use_wal(db)  # once: the mode is the file's, every later connection reads in it
        finally:
            db.close()
        with self._index() as db:
            for statement in SCHEMA:
                db.execute(statement)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.root / "index.sqlite", timeout=LOCK_TIMEOUT, isolation_level=None)
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _index(self, write: bool = True) -> sqlite3.Connection:
        """A connection for one operation (used as a context manager: one transaction). Reads
        take no lock (WAL mode, set when the store was opened: they see the last commit, and never
        wait for a writer)."""
        return _Transaction(self._connect(), write)  # type: ignore[return-value]

    def _path(self, key: str) -> Path:
        if len(key) < 3 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"store key {key!r} is not a hex digest")
        return self.root / "entries" / key[:2] / f"{key}.kvf"

    # --- reading -------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """The entry's bytes, digest checked, or None (a miss; a damaged entry is dropped)."""
        with self._index(write=False) as db:
            known = db.execute("SELECT 1 FROM entries WHERE key = ?", (key,)).fetchone() is not None
        data = self._read(key) if known else None
        if known and data is None:
            # Read again holding the write lock: a writer may have replaced the file meanwhile
            # (renames happen under the lock), which is not damage.
            with self._index() as db:
                if db.execute("SELECT 1 FROM entries WHERE key = ?", (key,)).fetchone() is not None:
                    data = self._read(key)
                    if data is None:
                        log.warning("store entry %s is damaged: dropped", key[:12])
                        self.stats.corrupt += 1
                        _forget(db, key)
                        self._path(key).unlink(missing_ok=True)
        if data is None:
            self.stats.misses += 1
            return None
        with self._index() as db:
            # The size too: a writer killed between its rename and its commit left the older one.
            db.execute("UPDATE entries SET last_used = ?, size = ? WHERE key = ?", (time.time(), len(data), key))
        self.stats.hits += 1
        self.stats.bytes_read += len(data)
        return data

    def _read(self, key: str) -> bytes | None:
        """The file's bytes when its digest holds, else None (missing, short, altered)."""
        try:
            data = self._path(key).read_bytes()
        except OSError:
            return None
        if not intact(data):
            return None
        return data

    def contains(self, key: str) -> bool:
        """Whether the index names `key` (its file is checked when it is read)."""
        with self._index(write=False) as db:
            return db.execute("SELECT 1 FROM entries WHERE key = ?", (key,)).fetchone() is not None

    def longest(self, keys: list[str]) -> int:
        """The largest i such that keys[i] is stored, or -1 (one index query per 500 keys)."""
        found = {key for (key,) in self._rows_in("SELECT key FROM entries WHERE key", keys)}
        return max((i for i, key in enumerate(keys) if key in found), default=-1)

    def deepest(self, hashes: list[str]) -> tuple[str, int] | None:
        """The entry holding the longest run of these chained block hashes (a prompt's, in
        order), and the tokens that run covers; None when not even the first block is held."""
        found = self._rows_in("SELECT key, tokens FROM blocks WHERE hash", hashes)
        return max(found, key=lambda row: row[1], default=None)

    def _rows_in(self, select: str, values: list[str]) -> list[tuple]:
        """The rows of `select` ("... WHERE column") IN `values`, 500 values a query."""
        rows: list[tuple] = []
        with self._index(write=False) as db:
            for start in range(0, len(values), 500):
                batch = values[start : start + 500]
                rows += db.execute(f"{select} IN ({','.join('?' * len(batch))})", batch).fetchall()
        return rows

    def entries(self) -> list[EntryInfo]:
        """Every entry, most recently used first."""
        with self._index(write=False) as db:
            rows = db.execute("SELECT key, size, model, settings, tokens, created, last_used FROM entries ORDER BY last_used DESC").fetchall()
        return [EntryInfo(*row) for row in rows]

    @property
    def nbytes(self) -> int:
        with self._index(write=False) as db:
            return int(db.execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()[0])

    # --- writing -------------------------------------------------------------------------------

    def put(self, key: str, data: bytes, model: str, settings: str, tokens: int, blocks: Blocks | None = None) -> bool:
        """Store `data` under `key` (replacing what was there), findable also by its `blocks`.
        False when it is larger than the whole store may hold (nothing is written then)."""
        if self.max_bytes is not None and len(data) > self.max_bytes:
            log.warning("a store entry of %d bytes is larger than --store-size (%d): not stored", len(data), self.max_bytes)
            return False
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            now = time.time()
            with self._index() as db:  # the rename and its index row under the write lock, together
                os.replace(tmp, path)
                _fsync_dir(path.parent)
                db.execute(
                    "INSERT OR REPLACE INTO entries (key, size, model, settings, tokens, created, last_used) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (key, len(data), model, settings, tokens, now, now),
                )
                db.executemany("INSERT OR REPLACE INTO blocks (hash, key, tokens) VALUES (?, ?, ?)", [(h, key, n) for h, n in (blocks or {}).items()])
                for old in self._evict(db, keep=key):
                    self._path(old).unlink(missing_ok=True)
        finally:
            Path(tmp).unlink(missing_ok=True)  # gone already unless something failed
        self.stats.bytes_written += len(data)
        return True

    def _evict(self, db: sqlite3.Connection, keep: str) -> list[str]:
        """Drop the least recently used entries (never `keep`) until the store fits max_bytes;
        the keys dropped (their files go once the transaction is done)."""
        if self.max_bytes is None:
            return []
        total = int(db.execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()[0])
        dropped = []
        for key, size in db.execute("SELECT key, size FROM entries WHERE key != ? ORDER BY last_used ASC", (keep,)).fetchall():
            if total <= self.max_bytes:
                break
            _forget(db, key)
            total -= size
            dropped.append(key)
        self.stats.evicted += len(dropped)
        return dropped

    def delete(self, key: str) -> bool:
        """Forget `key` and remove its file; whether it was there."""
        with self._index() as db:
            gone = _forget(db, key)
            self._path(key).unlink(missing_ok=True)
        return gone


class _Transaction:
    """`with` a connection: BEGIN IMMEDIATE for a writer (one at a time, others wait) or a plain
    BEGIN for a reader, COMMIT or ROLLBACK, then close."""

    def __init__(self, db: sqlite3.Connection, write: bool) -> None:
        self.db, self.write = db, write

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE" if self.write else "BEGIN")
        return self.db

    def __exit__(self, kind: object, *_: object) -> None:
        try:
            self.db.execute("ROLLBACK" if kind is not None else "COMMIT")
        finally:
            self.db.close()


def _forget(db: sqlite3.Connection, key: str) -> bool:
    """Drop `key`'s index row and its blocks (its file is the caller's); whether it was there."""
    db.execute("DELETE FROM blocks WHERE key = ?", (key,))
    return db.execute("DELETE FROM entries WHERE key = ?", (key,)).rowcount > 0


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (where the platform allows directories to be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
