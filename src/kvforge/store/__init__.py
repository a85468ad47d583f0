"""A persistent store of compressed caches: a document prefilled and compressed once is found
again by its tokens, its KV settings and the model (`entry.entry_key`), and only what follows it
is prefilled. `local.py` keeps entries in a directory, `shared.py` in a Redis server several
kvforge servers share, `memory.py` in this process's memory in front of either (`tiered.py`);
`entry.py` turns a cache into bytes and back."""

from kvforge.store.documents import find, keep
from kvforge.store.entry import DamagedEntry, entry_key
from kvforge.store.local import EntryInfo, LocalStore, StoreStats
from kvforge.store.memory import MemoryStore
from kvforge.store.shared import RedisStore, open_store
from kvforge.store.tiered import TieredStore

__all__ = [
    "DamagedEntry", "EntryInfo", "LocalStore", "MemoryStore", "RedisStore", "StoreStats", "TieredStore", "entry_key", "find", "keep", "open_store",
]  # fmt: skip
