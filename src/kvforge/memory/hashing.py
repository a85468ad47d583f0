"""Hashes of full blocks for prefix sharing: each block's hash is chained over every token up to
its end plus a key for what makes entries differ besides tokens (the model, the KV settings), so
two prompts share exactly the blocks of their common full-block prefix, and nothing across models
or settings. blake2b, not Python's hash(): stable across processes, so a persistent store can use
the same keys."""

from __future__ import annotations

import hashlib
import struct


def block_hashes(tokens: list[int], block_size: int, key: bytes) -> list[int]:
    """The hash of each full block of `tokens` (a partial last block has none)."""
    hashes, previous = [], hashlib.blake2b(key, digest_size=16).digest()
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = struct.pack(f"<{block_size}q", *tokens[start : start + block_size])
        previous = hashlib.blake2b(previous + block, digest_size=16).digest()
        hashes.append(int.from_bytes(previous, "little"))
    return hashes


def row_block_hash(block_hash: int, layer: int, head: int) -> int:
    """The hash of one row's block: a block of `block_hashes` as one layer's KV head holds it."""
    digest = hashlib.blake2b(block_hash.to_bytes(16, "little") + struct.pack("<ii", layer, head), digest_size=16).digest()
    return int.from_bytes(digest, "little")
