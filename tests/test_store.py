"""The persistent store of compressed caches: an entry decodes to exactly the cache it was made
from (every codec, both layouts of rows), a damaged or foreign entry is a miss, the local
directory is written atomically and evicts the least recently used entries beyond its size."""

from __future__ import annotations

import hashlib

import pytest
import torch

from conftest import left_padded
from kvforge import KVSpec
from kvforge.memory.kvmemory import KVMemory
from kvforge.store import LocalStore, MemoryStore, RedisStore, TieredStore, entry_key, find, keep
from kvforge.store.entry import DamagedEntry, block_keys, check, sealed
from kvforge.storage import QuantSpec
from test_policy_matrix import decode

TOKENS = 40


def prefilled(model, spec: KVSpec, memory: KVMemory):  # type: ignore[no-untyped-def]
    """A paged cache of one 40-token prompt prefilled (and compressed) with `spec`; its logits."""
    from kvforge import KVCache
    from kvforge.generate import prefill

    ids = left_padded([TOKENS])[0][0].tolist()
    cache = KVCache(model, spec.build(), layout="paged", quant=spec.quant, memory=memory)
    logits = prefill(model, cache, ids, chunk=16)[None]
    return cache, logits, ids


def backend(kind: str, tmp_path, request):  # type: ignore[no-untyped-def]
    """A store of `kind`: local (a directory) or redis (a real redis-server of the test's own)."""
    if kind == "local":
        return LocalStore(tmp_path)
    return RedisStore(request.getfixturevalue("redis_server")[0])


ROWS = [("local", policy, ratio, mode) for policy, ratio in (("full", 0.0), ("knorm", 0.5), ("adakv:snapkv", 0.5)) for mode in ("none", "int8", "int4", "int2", "fp8", "mixed")]
# The Redis backend moves the same bytes: three rows are enough.
ROWS += [("redis", "full", 0.0, "none"), ("redis", "knorm", 0.5, "int4"), ("redis", "adakv:snapkv", 0.5, "mixed")]


@pytest.mark.parametrize("kind, policy, ratio, mode", ROWS)
def test_a_stored_cache_decodes_exactly_as_the_one_it_was_made_from(tiny_model, tmp_path, request, kind, policy, ratio, mode):
    spec = KVSpec(policy, ratio, QuantSpec(mode, group=2, residual=0) if mode == "mixed" else QuantSpec(mode, group=4, residual=4))
    memory = KVMemory(16, torch.float32, "cpu")
    store = backend(kind, tmp_path, request)
    with torch.inference_mode():
        cache, logits, ids = prefilled(tiny_model, spec, memory)
        held = cache.nbytes
        assert keep(store, cache, spec, ids)
        entry = store.entries()[0]
        assert entry.tokens == TOKENS and entry.size <= 1.1 * held + 64 * 1024  # blocks as they are, plus a header
        found = find(store, tiny_model, spec.build(), spec, ids, None, memory)
        assert found is not None and found.nbytes == held
        want = decode(tiny_model, cache, logits, TOKENS, 4)
        got = decode(tiny_model, found, logits, TOKENS, 4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert store.stats.hits == 1 and store.stats.misses == 0


def test_other_tokens_settings_or_models_are_misses(tiny_model, tmp_path):
    spec = KVSpec("knorm", 0.5)
    memory = KVMemory(16, torch.float32, "cpu")
    store = LocalStore(tmp_path)
    with torch.inference_mode():
        cache, _, ids = prefilled(tiny_model, spec, memory)
        keep(store, cache, spec, ids)
        assert find(store, tiny_model, spec.build(), spec, ids[:-1], None, memory) is None
        other = KVSpec("knorm", 0.25)
        assert find(store, tiny_model, other.build(), other, ids, None, memory) is None
    assert entry_key("model-a", spec, ids) != entry_key("model-b", spec, ids)
    assert store.stats.misses == 2 and store.stats.corrupt == 0


@pytest.mark.parametrize("damage", ["truncate", "flip", "missing"])
def test_a_damaged_entry_is_a_miss_and_is_dropped(tiny_model, tmp_path, damage):
    spec = KVSpec("knorm", 0.5, QuantSpec("int4", group=4, residual=4))
    memory = KVMemory(16, torch.float32, "cpu")
    store = LocalStore(tmp_path)
    with torch.inference_mode():
        cache, _, ids = prefilled(tiny_model, spec, memory)
        keep(store, cache, spec, ids)
        path = next((tmp_path / "entries").rglob("*.kvf"))
        data = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(data[: len(data) // 2])
        elif damage == "flip":
            path.write_bytes(data[:1000] + bytes([data[1000] ^ 1]) + data[1001:])
        else:
            path.unlink()
        assert find(store, tiny_model, spec.build(), spec, ids, None, memory) is None
    assert store.stats.corrupt == 1 and store.entries() == []
    with pytest.raises(DamagedEntry, match="checksum"):
        check(data[:-1] + bytes([data[-1] ^ 1]))


def test_the_least_recently_used_entries_go_beyond_the_size(tmp_path):
    store = LocalStore(tmp_path, max_bytes=3000)
    keys = [f"{i:02x}" * 32 for i in range(4)]
    for key in keys[:3]:
        assert store.put(key, bytes(1000), "m", "s", 1)
    assert store.get(keys[0]) is None  # not an entry: its digest does not hold (and it is dropped)
    store.put(keys[1], bytes(900), "m", "s", 1)  # used again: newest
    assert store.put(keys[3], bytes(1500), "m", "s", 1)
    assert [e.key for e in store.entries()] == [keys[3], keys[1]]  # keys[2], the oldest, went
    assert store.nbytes <= 3000 and store.stats.evicted == 1
    assert not store.put("ff" * 32, bytes(4000), "m", "s", 1)  # larger than the whole store: refused
    assert not list(tmp_path.rglob(".tmp-*"))  # nothing half-written is left


def test_the_cpu_tier_keeps_the_most_recently_used_entries_up_to_its_size():
    tier = MemoryStore(max_bytes=3000)
    keys = [f"{i:02x}" * 32 for i in range(4)]
    for key in keys[:3]:
        assert tier.put(key, bytes(1000), "m", "s", 1)
    assert tier.get(keys[0]) == bytes(1000)  # used again: newest
    assert tier.put(keys[3], bytes(1000), "m", "s", 1)
    assert [e.key for e in tier.entries()] == [keys[3], keys[0], keys[2]]  # keys[1], the oldest, went
    assert tier.nbytes == 3000 and tier.stats.evicted == 1 and tier.longest(keys) == 3
    assert not tier.put("ff" * 32, bytes(3001), "m", "s", 1) and tier.get("ff" * 32) is None
    assert tier.stats.hits == 1 and tier.stats.misses == 1
    with pytest.raises(ValueError, match="--cpu-memory 0 must be at least 1 byte"):
        MemoryStore(0)


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_the_cpu_tier_answers_first_and_brings_up_what_the_lower_tier_holds(tiny_model, tmp_path, request, kind):
    spec = KVSpec("knorm", 0.5, QuantSpec("int4", group=4, residual=4))
    memory = KVMemory(16, torch.float32, "cpu")
    lower = backend(kind, tmp_path, request)
    with torch.inference_mode():
        cache, logits, ids = prefilled(tiny_model, spec, memory)
        assert keep(TieredStore(MemoryStore(2**30), lower), cache, spec, ids)  # written through to both
        restarted = TieredStore(MemoryStore(2**30), lower)  # a new process: its memory tier is empty
        for _ in range(2):
            found = find(restarted, tiny_model, spec.build(), spec, ids, None, memory)
            assert found is not None and found.nbytes == cache.nbytes
        for a, b in zip(decode(tiny_model, found, logits, TOKENS, 4), decode(tiny_model, cache, logits, TOKENS, 4)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    cpu, below = restarted.tiers
    assert (cpu.stats.misses, cpu.stats.hits, below.stats.hits) == (1, 1, 1)  # read below once, then from memory
    assert restarted.stats.hits == 2 and restarted.stats.bytes_read == 2 * cpu.stats.bytes_read
    assert [e.key for e in restarted.entries()] == [e.key for e in lower.entries()]
    assert restarted.delete(entry_key(cache.model_fingerprint, spec, ids)) and restarted.entries() == []


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_a_prompt_sharing_only_the_first_blocks_of_a_stored_prefix_starts_from_them(tiny_model, tmp_path, request, kind):
    from kvforge import KVCache
    from kvforge.calibration import fingerprint
    from kvforge.engine.stored import StoreTier
    from kvforge.generate import prefill

    spec = KVSpec()  # full precision, uncompressed: a prefix of the cache is the prefix's cache
    memory = KVMemory(16, torch.float32, "cpu", block_size=16)
    store = backend(kind, tmp_path, request)
    tier = StoreTier(store, fingerprint(tiny_model), torch.float32, 16)
    with torch.inference_mode():
        cache, _, ids = prefilled(tiny_model, spec, memory)  # 40 tokens, chunks of 16
        tier.keep(spec, ids, cache)
        tier.close()  # written
        other = ids[:35] + [7, 8, 9]  # shares 35 tokens: two full blocks of 16
        empty = KVCache(tiny_model, spec.build(), layout="paged", memory=memory)
        assert tier.find(spec, other, empty) == 32
        alone = KVCache(tiny_model, spec.build(), layout="paged", memory=memory)
        prefill(tiny_model, alone, ids[:32], chunk=16)
        for got, want in zip(empty.layers, alone.layers):
            assert got.seen == want.seen == 32 and got.tokens.tolist() == [32]
            torch.testing.assert_close(got.storage.view().keys, want.storage.view().keys, rtol=0, atol=0)
            torch.testing.assert_close(got.storage.view().values, want.storage.view().values, rtol=0, atol=0)
        # Settings that are not prefix-stable are found whole or not at all.
        assert tier.find(KVSpec("knorm", 0.5), other, KVCache(tiny_model, KVSpec("knorm", 0.5).build(), layout="paged", memory=memory)) == 0
    assert store.stats.hits == 1
    key = entry_key(fingerprint(tiny_model), spec, ids, tier.variant)
    assert store.delete(key) and store.deepest(block_keys(fingerprint(tiny_model), spec, other, 16, tier.variant)) is None  # its blocks went with it


WRITER = """
import hashlib, random, sys
from kvforge.store import LocalStore
from kvforge.store.entry import intact, sealed
store, seed, count = LocalStore(sys.argv[1], max_bytes=int(sys.argv[4])), int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
for i in range(count):
    payload = rng.randbytes(rng.randint(1000, 200_000))
    key = hashlib.blake2b(f"{seed}-{i % 7}".encode(), digest_size=32).hexdigest()  # writers overwrite their own keys too
    store.put(key, sealed(payload), "m", "s", 1)
    other = hashlib.blake2b(f"{(seed + 1) % 4}-{i % 7}".encode(), digest_size=32).hexdigest()
    got = store.get(other)  # another writer's entry: whole and intact, or a miss
    assert got is None or intact(got)
print(store.stats.corrupt)
"""


def consistent(root) -> None:  # type: ignore[no-untyped-def]
    """Every entry the index names reads back whole, and then the recorded sizes are the files'
    (a writer killed between its rename and its commit leaves the older size until a read)."""
    store = LocalStore(root)
    sizes = {e.key: len(data) for e in store.entries() if (data := store.get(e.key)) is not None}
    entries = store.entries()
    assert store.stats.corrupt == 0 and len(sizes) == len(entries)
    assert {e.key: e.size for e in entries} == sizes and store.nbytes == sum(sizes.values())


def test_writers_in_several_processes_share_one_directory(tmp_path):
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(seed), "30", str(2_000_000)], stdout=subprocess.PIPE, text=True) for seed in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and [o.strip() for o in outs] == ["0"] * 4
    consistent(tmp_path)
    assert 0 < LocalStore(tmp_path).nbytes <= 2_000_000
    assert not list(tmp_path.rglob(".tmp-*"))


def test_a_writer_killed_mid_put_leaves_the_store_consistent(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    watch = LocalStore(tmp_path)
    for delay in (0.0, 0.013, 0.031):
        written = len(watch.entries())
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), "0", "100000", str(50_000_000)], stdout=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and len(watch.entries()) <= written:
            time.sleep(0.005)  # until it is writing
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        consistent(tmp_path)  # a temporary file may be left; it is never read
    assert LocalStore(tmp_path).entries()


def test_the_redis_store_evicts_by_size_drops_damage_and_goes_on_without_its_server(redis_server, caplog):
    import redis

    url, proc = redis_server
    store = RedisStore(url, max_bytes=3000)

    def entry(size: int, seed: int) -> bytes:
        payload = bytes([seed]) * size
        return sealed(payload)

    keys = [f"{i:02x}" * 32 for i in range(4)]
    for i, key in enumerate(keys[:3]):
        assert store.put(key, entry(900, i), "m", "s", 1)
    assert store.get(keys[0]) is not None  # used again: newest
    assert store.put(keys[3], entry(1400, 3), "m", "s", 1)
    assert {e.key for e in store.entries()} == {keys[0], keys[3]} and store.nbytes <= 3000
    redis.Redis.from_url(url).set("kvforge:entry:" + keys[0], b"not an entry at all, not even its digest")
    assert store.get(keys[0]) is None and store.stats.corrupt == 1 and not store.contains(keys[0])
    proc.terminate()
    proc.wait()
    assert store.get(keys[3]) is None and not store.put(keys[1], entry(10, 1), "m", "s", 1)  # no server: misses
    assert store.longest(keys) == -1 and store.entries() == []
    assert sum("cannot be reached" in r.message for r in caplog.records) == 1  # one warning, not one per call
