"""A compressed cache as bytes, and back: what a store keeps for one prefilled document.

An entry is a safetensors file whose metadata holds a JSON header, followed by a 32-byte SHA-256
digest of everything before it (SHA-256: hardware-accelerated where CPUs have SHA extensions,
twice blake2b's speed on this project's machines, and every entry is hashed on every read):

    header   format version, the model's fingerprint, the KV settings, the tokens it stands for,
             and per layer: its state (tokens seen, chunks) and how its storage's rows stand on
             its blocks (`PagedKV` / `PagedQuantKV` swapped out: row tables over block indices)
    tensors  l<i>.blocks  (blocks, block bytes) uint8: the pool blocks as they were (codes stay
             codes); positions, policy state and the layer's own tensors beside them

Only paged caches are stored (their blocks are what moves); a cache is stored from a fork, so the
cache itself goes on. Anything that does not match (a truncated or altered entry, another model,
another format, settings or block shape) raises `DamagedEntry`: a store treats it as a miss.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from kvforge.cache import KVCache
from kvforge.memory import Row, Swapped
from kvforge.memory.hashing import block_hashes
from kvforge.memory.kvmemory import KVMemory
from kvforge.spec import KVSpec
from kvforge.storage.codec import QuantSpec
from kvforge.storage.paged import PagedKV, SwappedPaged
from kvforge.storage.pagedquant import PagedQuantKV, SwappedQuant
from kvforge.storage.pooled import CodeRow
from kvforge.storage.segments import Segments

FORMAT = 2  # bump when what an entry holds changes: older entries become misses (1: blake2b digests)
DIGEST = 32  # bytes of the SHA-256 digest closing an entry


class DamagedEntry(ValueError):
    """An entry that cannot be trusted: truncated, altered, or made for something else."""


def _settings_digest(model: str, spec: KVSpec, variant: str) -> Any:
    q = spec.quant
    settings = json.dumps([FORMAT, model, variant, spec.policy, spec.ratio, spec.budget, [list(p) for p in spec.params], q.mode, q.group, q.residual, q.split, q.prompt_residual, q.rank])
    return hashlib.blake2b(settings.encode(), digest_size=32)


def variant(chunk: int | None, dtype: torch.dtype) -> str:
    """What else an entry's key names: how its prompt was chunked (None: one shot) and the dtype.
    The CLI and the server key alike, so a document one stores the other finds."""
    return f"chunk={chunk or 0} dtype={dtype}"


def entry_key(model: str, spec: KVSpec, tokens: list[int], variant: str = "") -> str:
    """The key of the cache of `tokens` prefilled by `model` (its fingerprint) with `spec`;
    `variant`: whatever else changes what the cache holds (the prefill's chunking, the dtype)."""
    digest = _settings_digest(model, spec, variant)
    digest.update(torch.tensor(tokens, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


def prefix_keys(model: str, spec: KVSpec, tokens: list[int], variant: str = "") -> list[str]:
    """entry_key of tokens[:n] for n = 1 .. len(tokens), hashed once over the tokens."""
    digest = _settings_digest(model, spec, variant)
    raw = torch.tensor(tokens, dtype=torch.int64).numpy().tobytes()
    keys = []
    for n in range(len(tokens)):
        digest.update(raw[8 * n : 8 * n + 8])
        keys.append(digest.copy().hexdigest())
    return keys


def block_keys(model: str, spec: KVSpec, tokens: list[int], block_size: int, variant: str = "") -> list[str]:
    """The chained hash of each full block of `tokens` (`memory.hashing`, as the pool marks its
    blocks), keyed by what entry keys name besides tokens: an entry of `spec.prefix_stable`
    settings is found by the prompts that share only its first blocks."""
    return [f"{h:032x}" for h in block_hashes(tokens, block_size, _settings_digest(model, spec, variant).digest())]


def blocks_of(cache: KVCache, spec: KVSpec, tokens: list[int], variant: str = "") -> dict[str, int]:
    """{block hash: tokens up to its end} of a cache a store keeps (none unless its settings
    are prefix-stable: only then is a prefix of it the cache of that prefix)."""
    if not spec.prefix_stable or cache.memory is None:
        return {}
    size = cache.memory.block_size
    return {h: (i + 1) * size for i, h in enumerate(block_keys(cache.model_fingerprint, spec, tokens, size, variant))}


def encode(cache: KVCache, spec: KVSpec, tokens: list[int], variant: str = "") -> bytes:
    """The entry of `cache` (paged, having seen exactly `tokens`): this cache is left as it was."""
    copy = cache.fork()  # what moves out is the fork's: the cache keeps its blocks
    states = [layer.state() for layer in copy.layers]
    swapped = copy.swap_out("cpu")
    tensors: dict[str, torch.Tensor] = {}
    layers: list[dict[str, Any]] = []
    for i, (part, (seen, chunks, toks, budget, policy_state)) in enumerate(zip(swapped, states)):
        head: dict[str, Any] = {"seen": seen, "chunks": chunks, "budget": budget is not None, "state": sorted(policy_state)}
        tensors[f"l{i}.tokens"] = toks.cpu()
        if budget is not None:
            tensors[f"l{i}.budget"] = budget.cpu()
        tensors.update({f"l{i}.state.{k}": v.cpu() for k, v in policy_state.items()})
        if isinstance(part, SwappedPaged):
            head |= {"kind": "paged", "batch": part.batch, "kv_heads": part.kv_heads, "aux": list(part.aux_names), "lengths": part.lengths, "blocks": part.blocks}
            tensors[f"l{i}.blocks"] = part.data.blocks
            tensors[f"l{i}.pos"] = part.pos
            tensors.update({f"l{i}.aux.{n}": t for n, t in part.aux.items()})
        else:
            held = []
            for j, (rows, data, meta) in enumerate(part.held):
                tables = [[r.blocks, r.length] if isinstance(r, Row) else [r.groups, r.counts] for r in rows]
                held.append({"rows": tables, "lengths": meta.counts.tolist(), "fields": sorted(meta.fields)})
                tensors[f"l{i}.h{j}.blocks"] = data.blocks
                tensors.update({f"l{i}.h{j}.meta.{n}": t for n, t in meta.fields.items()})
            head |= {"kind": "quant", "batch": part.batch, "kv_heads": part.kv_heads, "aux": list(part.aux_names), "held": held}
        layers.append(head)
    header = {
        "format": FORMAT, "model": cache.model_fingerprint, "key": entry_key(cache.model_fingerprint, spec, tokens, variant),
        "tokens": len(tokens), "layers": layers,
    }  # fmt: skip
    payload = save_tensors({k: v.contiguous() for k, v in tensors.items()}, metadata={"kvforge": json.dumps(header)})
    return sealed(payload)


def sealed(payload: bytes) -> bytes:
    """`payload` closed by its digest: what a store keeps."""
    return payload + hashlib.sha256(payload).digest()


def intact(data: bytes) -> bool:
    """Whether `data` ends with the digest of what comes before it (a store checks every read)."""
    return len(data) > DIGEST and hashlib.sha256(memoryview(data)[:-DIGEST]).digest() == data[-DIGEST:]


def check(data: bytes, verified: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The header and tensors of an entry whose digest holds (DamagedEntry otherwise);
    `verified`: the digest was checked already (a store's `get` returns only such entries)."""
    if len(data) <= DIGEST + 8:
        raise DamagedEntry(f"an entry of {len(data)} bytes is truncated")
    if not verified and not intact(data):
        raise DamagedEntry("the entry's checksum does not match its bytes (truncated or altered)")
    payload = data[:-DIGEST]
    size = int.from_bytes(payload[:8], "little")
    try:
        meta = json.loads(payload[8 : 8 + size])["__metadata__"]
        header = json.loads(meta["kvforge"])
        tensors = load_tensors(payload)
    except (ValueError, KeyError, TypeError) as err:
        raise DamagedEntry(f"the entry cannot be read: {err}") from err
    if header.get("format") != FORMAT:
        raise DamagedEntry(f"entry format {header.get('format')!r}, this kvforge reads {FORMAT}")
    return header, tensors


def decode(
    data: bytes, cache: KVCache, spec: KVSpec, tokens: list[int] | str, variant: str = "", verified: bool = False
) -> None:  # fmt: skip
    """Fill `cache` (new, paged over a memory of its own: `KVCache(..., layout="paged",
    memory=...)`, built with `spec`'s policy and quantization) with what the entry holds.
    DamagedEntry when it is not the entry of these tokens (or of this key, for an entry found by
    its blocks, whose later tokens are not known), settings and model."""
    header, tensors = check(data, verified)
    if header["model"] != cache.model_fingerprint:
        raise DamagedEntry(f"the entry was made by model {header['model'][:12]}, not {cache.model_fingerprint[:12]}")
    if isinstance(tokens, str):
        matches = header["key"] == tokens
    else:
        matches = header["key"] == entry_key(cache.model_fingerprint, spec, tokens, variant) and header["tokens"] == len(tokens)
    if not matches:
        raise DamagedEntry("the entry stands for other tokens or settings")
    if cache.memory is None:
        raise ValueError("decode() fills a cache made with memory=: give it the KVMemory its blocks go to")
    if len(header["layers"]) != len(cache.layers):
        raise DamagedEntry(f"the entry has {len(header['layers'])} layers, the model {len(cache.layers)}")
    device = cache.memory.store.device
    # Every block the entry brings, made free at once (one growth of an unbounded memory).
    cache.memory.reserve(sum(t.shape[0] for name, t in tensors.items() if name.endswith(".blocks")))
    try:
        for i, (layer, head) in enumerate(zip(cache.layers, header["layers"])):
            storage = _storage(i, head, tensors, cache, spec.quant, device)
            budget = tensors[f"l{i}.budget"].to(device) if head["budget"] else None
            state = {k: tensors[f"l{i}.state.{k}"].to(device) for k in head["state"]}
            layer.restore(storage, head["seen"], head["chunks"], tensors[f"l{i}.tokens"].to(device), budget, state)
    except (KeyError, IndexError, TypeError, RuntimeError) as err:
        raise DamagedEntry(f"the entry's layers do not fit this cache: {err}") from err


def _swapped(blocks: torch.Tensor, memory: KVMemory) -> Swapped:
    if blocks.dim() != 2 or blocks.shape[1] != memory.block_nbytes:
        raise DamagedEntry(f"blocks of {tuple(blocks.shape)} bytes do not fit a memory of blocks of {memory.block_nbytes} bytes")
    return Swapped(blocks, memory.layout)


def _storage(i: int, head: dict[str, Any], tensors: dict[str, torch.Tensor], cache: KVCache, quant: QuantSpec, device: torch.device) -> PagedKV | PagedQuantKV:
    memory = cache.memory
    assert memory is not None
    aux = tuple(head["aux"])
    if head["kind"] == "paged":
        if quant.enabled:
            raise DamagedEntry("a full-precision entry for a quantized setting")
        data = SwappedPaged(
            head["batch"], head["kv_heads"], aux, head["lengths"], head["blocks"], _swapped(tensors[f"l{i}.blocks"], memory),
            tensors[f"l{i}.pos"], {n: tensors[f"l{i}.aux.{n}"] for n in aux},
        )  # fmt: skip
        return PagedKV.swap_in(data, memory, device)
    held = []
    for j, part in enumerate(head["held"]):
        kind = Row if j == len(head["held"]) - 1 else CodeRow  # the parts' code rows, then the tail's
        rows = [kind(list(a), b if kind is Row else list(b)) for a, b in part["rows"]]
        counts = torch.tensor(part["lengths"], dtype=torch.int64)
        meta = Segments({n: tensors[f"l{i}.h{j}.meta.{n}"] for n in part["fields"]}, counts, counts)
        held.append((rows, _swapped(tensors[f"l{i}.h{j}.blocks"], memory), meta))
    swapped = SwappedQuant(head["batch"], head["kv_heads"], memory.store.head_dim, memory.store.keys.dtype, aux, quant, held)
    return PagedQuantKV.swap_in(swapped, memory, device)
