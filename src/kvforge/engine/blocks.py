"""Prefix sharing at block granularity, as vLLM's prefix cache does: full blocks of uncompressed,
full-precision rows are marked in the pool with a hash chained over the tokens they stand for
(plus the model and the KV settings, plus the layer and KV head of the row), and a later request
whose prompt starts with the same tokens takes those blocks instead of computing them again,
however little of the prompt it shares (one block: `KVMemory.block_size` tokens).

Only settings whose blocks do not depend on later tokens qualify: the `full` policy at full
precision (`reusable`). A compressing policy decides what a block holds from tokens after it, and
a quantized cache's codes depend on how its prompt was chunked; those reuse whole compressed
prefixes at chunk boundaries instead (`prefixes.py`). A block stays findable after its last row lets it go, until
the pool hands it out again (oldest freed first).
"""

from __future__ import annotations

from kvforge.cache import KVCache
from kvforge.engine.request import KVSettings
from kvforge.memory.hashing import block_hashes, row_block_hash
from kvforge.memory.kvmemory import KVMemory
from kvforge.storage.paged import PagedKV


def reusable(kv: KVSettings) -> bool:
    """Whether a block's entries depend only on the tokens up to its end under these settings."""
    return kv.prefix_stable


class BlockIndex:
    def __init__(self, memory: KVMemory, model: str) -> None:
        self.memory, self.model = memory, model

    def _hashes(self, kv: KVSettings, tokens: list[int]) -> list[int]:
        key = f"{self.model}|{kv.policy}|{kv.ratio}|{kv.quant}".encode()
        return block_hashes(tokens, self.memory.block_size, key)

    def mark(self, kv: KVSettings, tokens: list[int], cache: KVCache, since: int = 0) -> None:
        """Mark the full blocks of `cache` (one sequence, `tokens` prefilled) from token `since` on
        (earlier ones were marked after earlier chunks)."""
        hashes = self._hashes(kv, tokens)
        first = since // self.memory.block_size
        for layer in cache.layers:
            storage = layer.storage
            if not isinstance(storage, PagedKV) or storage.memory is not self.memory:
                return
            for head, row in enumerate(storage.rows):
                full = min(len(hashes), row.length // self.memory.block_size)
                for i in range(first, full):
                    self.memory.pool.mark(row.blocks[i], row_block_hash(hashes[i], layer.layer_idx, head))

    def find(self, kv: KVSettings, tokens: list[int], layers: int, kv_heads: int) -> tuple[list[list[list[int]]], int] | None:
        """Blocks holding the longest run of `tokens`' full blocks that every row of every layer
        has, leaving at least one token to prefill: per layer, per KV head, the block ids (one
        reference taken on each), and the tokens they hold. None when not even one is found."""
        block_size = self.memory.block_size
        hashes = self._hashes(kv, tokens[: (len(tokens) - 1) // block_size * block_size])
        pool = self.memory.pool
        found = 0
        for i, block_hash in enumerate(hashes):
            keys = [row_block_hash(block_hash, layer, head) for layer in range(layers) for head in range(kv_heads)]
            if any(key not in pool.hash_to_block for key in keys):
                break
            found = i + 1
        if found == 0:
            return None
        tables = [
            [[pool.lookup(row_block_hash(hashes[i], layer, head)) for i in range(found)] for head in range(kv_heads)]  # type: ignore[misc]
            for layer in range(layers)
        ]
        return tables, found * block_size
