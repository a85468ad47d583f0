"""Compressed prompt prefixes kept for reuse by later requests (the same document, another
question): copy-on-write forks of a request's cache taken at a prefill chunk boundary.

A prefix is kept at the last chunk boundary at least MARGIN tokens before its prompt's end: a
document followed by a question of up to that length (chat template included) is found again
whatever the question, and at least one token is left to prefill (its logits give the first new
token). Keys are the KV settings and the prefix's
token ids; entries are dropped oldest-unused first when memory is needed (`evict_one`).
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

from kvforge.cache import KVCache
from kvforge.engine.request import KVSettings

MAX_ENTRIES = 8  # prefixes kept at most (each holds a compressed document)
MARGIN = 64  # prompt tokens after a kept prefix at the least: room for a question
DEFAULT_SHARE = 8  # without a limit given, kept prefixes hold at most 1/8 of the memory available at start


def available_memory(device: torch.device) -> int:
    """Bytes the device has available now: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_limit(device: torch.device) -> int:
    """The kept prefixes' memory limit when no one sets it: a share of what is available."""
    return available_memory(device) // DEFAULT_SHARE


class PrefixCache:
    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.entries: OrderedDict[tuple[KVSettings, tuple[int, ...]], KVCache] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def boundary(self, prompt_tokens: int) -> int:
        """Where a prompt of this length is kept (0: too short to be worth keeping)."""
        return max(prompt_tokens - 1 - MARGIN, 0) // self.chunk * self.chunk

    def keep(self, kv: KVSettings, tokens: list[int], cache: KVCache) -> None:
        key = (kv, tuple(tokens))
        if key in self.entries or not tokens:
            return
        self.entries[key] = cache.fork()
        while len(self.entries) > MAX_ENTRIES:
            self.entries.popitem(last=False)

    def lookup(self, kv: KVSettings, prompt: list[int]) -> tuple[KVCache, int] | None:
        """A fork of the longest kept prefix of `prompt` (at least one token left after it), and
        its length; None when none is kept."""
        for end in range((len(prompt) - 1) // self.chunk * self.chunk, 0, -self.chunk):
            key = (kv, tuple(prompt[:end]))
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key].fork(), end
        return None

    def evict_one(self) -> bool:
        if not self.entries:
            return False
        self.entries.popitem(last=False)
        return True

    def caches(self) -> list[KVCache]:
        return list(self.entries.values())

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.entries.values())
