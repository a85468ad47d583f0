"""Keeping a prefilled document's cache in a store, and finding it again."""

from __future__ import annotations

import logging

import torch

from kvforge.cache import KVCache, head_dim
from kvforge.memory.kvmemory import KVMemory, shared_memory
from kvforge.models import LoadedModel
from kvforge.policies.base import Policy
from kvforge.spec import KVSpec
from kvforge.store.entry import DamagedEntry, blocks_of, decode, encode, entry_key, variant
from kvforge.store.local import LocalStore
from kvforge.store.shared import RedisStore

log = logging.getLogger(__name__)


def settings_label(spec: KVSpec) -> str:
    """How `kvforge store ls` names an entry's settings."""
    ratio = f" budget {spec.budget}" if spec.budget is not None else f" {spec.ratio:g}"
    return f"{spec.policy}{ratio} {spec.quant.mode}"


def keep(store: LocalStore | RedisStore, cache: KVCache, spec: KVSpec, tokens: list[int], variant: str = "") -> bool:
    """Store `cache` (paged, having seen exactly `tokens`) under its key; the cache goes on as it
    was. False when the store would not take it (larger than the whole store)."""
    key = entry_key(cache.model_fingerprint, spec, tokens, variant)
    data = encode(cache, spec, tokens, variant)
    return store.put(key, data, cache.model_fingerprint, settings_label(spec), len(tokens), blocks_of(cache, spec, tokens, variant))


def load(store: LocalStore | RedisStore, key: str, cache: KVCache, spec: KVSpec, tokens: list[int] | int, variant: str = "") -> bool:
    """Fill `cache` (new, paged, with a memory) from the entry `key` of `tokens`, or (a count)
    with the first `tokens` tokens of it (an entry found by its blocks); False on a miss. An
    entry that reads whole but does not decode into this cache is dropped and counted as
    damaged (a miss, not a hit), and `cache` is left holding nothing."""
    data = store.get(key)
    if data is None:
        return False
    try:
        decode(data, cache, spec, key if isinstance(tokens, int) else tokens, variant, verified=True)  # get() checked the digest
        if isinstance(tokens, int):
            cut(cache, tokens)
    except DamagedEntry as err:
        log.warning("store entry %s cannot be used (%s): dropped, prefilling instead", key[:12], err)
        store.stats.corrupt += 1
        store.stats.hits -= 1
        store.stats.misses += 1
        store.delete(key)
        cache.reset()  # whatever was brought in goes back to the pool
        return False
    return True


def cut(cache: KVCache, tokens: int) -> None:
    """Keep only the first `tokens` tokens of a one-sequence cache of prefix-stable settings
    (what prefilling them leaves; DamagedEntry when it holds fewer)."""
    for layer in cache.layers:
        storage = layer.storage
        if storage is None or layer.seen < tokens:
            raise DamagedEntry(f"the entry holds {layer.seen} tokens, not the {tokens} its blocks said")
        view = storage.view()
        kept = view.valid & (view.positions < tokens)
        storage.keep(view, torch.arange(kept.shape[-1], device=kept.device).expand_as(kept).contiguous(), kept)
        layer.seen, layer.tokens = tokens, torch.tensor([tokens])
        layer.held.update(layer.layer_idx, storage.allocated_nbytes)


def find(store: LocalStore | RedisStore, model, policy: Policy, spec: KVSpec, tokens: list[int], tokenizer, memory: KVMemory, variant: str = "") -> KVCache | None:  # type: ignore[no-untyped-def]
    """A cache holding what prefilling `tokens` with `spec` left, from the store, in blocks of
    `memory`; None when nothing usable is stored."""
    cache = KVCache(model, policy, tokenizer=tokenizer, layout="paged", quant=spec.quant, memory=memory)
    return cache if load(store, entry_key(cache.model_fingerprint, spec, tokens, variant), cache, spec, tokens, variant) else None


def cached_prefill(
    store: LocalStore | RedisStore, loaded: LoadedModel, policy: Policy, spec: KVSpec, tokens: list[int], chunk: int | None,
    memory: KVMemory | None = None,
) -> tuple[KVCache, bool]:  # fmt: skip
    """The cache of `tokens` prefilled and compressed with `spec` (`chunk` tokens at a time): found
    in the store (True), or prefilled now and stored (False). Paged, over `memory` (default: the
    process's)."""
    from kvforge.generate import prefill

    model = loaded.model
    memory = memory if memory is not None else shared_memory(model.device, model.dtype, head_dim(model))
    key_variant = variant(chunk, model.dtype)
    found = find(store, model, policy, spec, tokens, loaded.tokenizer, memory, key_variant)
    if found is not None:
        return found, True
    cache = KVCache(model, policy, tokenizer=loaded.tokenizer, layout="paged", quant=spec.quant, memory=memory)
    prefill(model, cache, tokens, chunk)
    keep(store, cache, spec, tokens, key_variant)
    return cache, False
