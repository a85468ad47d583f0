"""A persistent store of compressed caches: a document prefilled and compressed once is found
again by its tokens, its KV settings and the model (`entry.entry_key`), and only what follows it
is prefilled. `local.py` keeps entries in a directory; `entry.py` turns a cache into bytes and back."""

from kvforge.store.documents import find, keep
from kvforge.store.entry import DamagedEntry, entry_key
from kvforge.store.local import EntryInfo, LocalStore, StoreStats

__all__ = ["DamagedEntry", "EntryInfo", "LocalStore", "StoreStats", "entry_key", "find", "keep"]
