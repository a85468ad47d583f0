"""Measure the store's aims (issue 21) with the default model and print one table:

1. a ~2k-token document under full, int4, kvzip 0.5 and kvzip 0.5 + int4: the bytes of its entry
   against the bytes its cache held in the pool and the dense float32 bytes;
2. time to first token of a new question: cold (prefill, compression, question) against a store
   opened afresh (as after a restart: the entry read from disk, checked, decoded into blocks, then
   the question), and whether the answers are equal;
3. 200 entries of realistic sizes in one directory: lookups (hit and miss) and whole reads, p50 and
   p99.

    .venv/bin/python scripts/store_aims.py [--model default] [--dir DIR] [--json out.json]

Timed parts ran alone on the machine they report; figures are wall seconds of one run each.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kvforge import KVSpec
from kvforge.eval import corpus
from kvforge.generate import build_prompt, feed, greedy, stop_ids
from kvforge.models import DEFAULT_MODEL, load_model
from kvforge.storage import QuantSpec
from kvforge.store import LocalStore
from kvforge.store.documents import cached_prefill
from kvforge.store.entry import sealed

console = Console()
MIB = 2**20
SETTINGS = {
    "full": KVSpec("full"),
    "int4": KVSpec("full", quant=QuantSpec("int4")),
    "kvzip 0.5": KVSpec("kvzip", 0.5),
    "kvzip 0.5 + int4": KVSpec("kvzip", 0.5, QuantSpec("int4")),
}


def document(words: int = 1500) -> str:
    text = " ".join(corpus.paragraphs()).split()
    return " ".join((text * (1 + words // len(text)))[:words])


def first_token(loaded, cache, prompt) -> tuple[float, list[int]]:  # type: ignore[no-untyped-def]
    """Feed the question, then greedy: seconds to the first token's logits, and 16 tokens."""
    start = time.perf_counter()
    logits, positions = feed(loaded.model, cache, [prompt.rest_ids], torch.tensor([len(prompt.context_ids)]))
    seconds = time.perf_counter() - start
    return seconds, greedy(loaded.model, cache, logits, positions, 16, stop_ids(loaded.tokenizer))[0]


def reuse(loaded, root: Path) -> dict[str, dict[str, float]]:  # type: ignore[no-untyped-def]
    doc = document()
    prompt = build_prompt(loaded.tokenizer, doc, "Which two places does the text mention first?", True)
    out = {}
    for name, spec in SETTINGS.items():
        policy = spec.build()
        store = LocalStore(root / name.replace(" ", "_"))
        with torch.inference_mode():
            start = time.perf_counter()
            cold, found = cached_prefill(store, loaded, policy, spec, prompt.context_ids, None)
            prefill_seconds = time.perf_counter() - start
            question_seconds, cold_answer = first_token(loaded, cold, prompt)
            held = cold.nbytes
            dense = cold.dense_nbytes
            del cold
            reopened = LocalStore(store.root)  # a new process would open the directory like this
            start = time.perf_counter()
            warm, found = cached_prefill(reopened, loaded, policy, spec, prompt.context_ids, None)
            load_seconds = time.perf_counter() - start
            warm_question, warm_answer = first_token(loaded, warm, prompt)
        entry = reopened.entries()[0].size
        out[name] = {
            "tokens": len(prompt.context_ids),
            "dense_bytes": dense,
            "pool_bytes": held,
            "entry_bytes": entry,
            "entry_over_pool": entry / held,
            "cold_ttft_s": prefill_seconds + question_seconds,
            "warm_ttft_s": load_seconds + warm_question,
            "ttft_ratio": (load_seconds + warm_question) / (prefill_seconds + question_seconds),
            "found": float(found),
            "answers_equal": float(cold_answer == warm_answer),
        }
    return out


def lookups(root: Path, count: int = 200) -> dict[str, float]:
    """Entries of 1-4k tokens' worth of kvzip 0.5 + int4 bytes (about 3.2 MiB per 1k tokens),
    random bytes closed by their digest: what the store sees."""
    store = LocalStore(root / "lookups")
    rng = random.Random(0)
    keys = []
    for i in range(count):
        payload = rng.randbytes(int(rng.uniform(1, 4) * 3.2 * MIB))
        key = hashlib.blake2b(str(i).encode(), digest_size=32).hexdigest()
        store.put(key, sealed(payload), "m", "kvzip 0.5 int4", 1000)
        keys.append(key)
    missing = [hashlib.blake2b(f"miss{i}".encode(), digest_size=32).hexdigest() for i in range(count)]
    hit_ms, miss_ms, read_ms = [], [], []
    for key, other in zip(keys, missing):
        start = time.perf_counter()
        assert store.contains(key)
        hit_ms.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        assert not store.contains(other)
        miss_ms.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        assert store.get(key) is not None
        read_ms.append((time.perf_counter() - start) * 1e3)

    def p99(values: list[float]) -> float:
        return sorted(values)[int(0.99 * (len(values) - 1))]

    return {
        "entries": count, "store_bytes": store.nbytes,
        "lookup_hit_p50_ms": statistics.median(hit_ms), "lookup_hit_p99_ms": p99(hit_ms),
        "lookup_miss_p50_ms": statistics.median(miss_ms), "lookup_miss_p99_ms": p99(miss_ms),
        "read_p50_ms": statistics.median(read_ms), "read_p99_ms": p99(read_ms),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dir", default=None, help="where the stores go (default: a temporary directory, removed after)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    loaded = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir or tmp)
        results = {"reuse": reuse(loaded, root), "lookups": lookups(root)}
    table = Table(title="store aims (issue 21)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for group, values in results["reuse"].items():
        for name, value in values.items():
            table.add_row(f"{group}: {name}", f"{value / MIB:.2f} MiB" if name.endswith("bytes") else f"{value:.3f}")
    for name, value in results["lookups"].items():
        table.add_row(f"lookups: {name}", f"{value / MIB:.1f} MiB" if name.endswith("bytes") else f"{value:.3f}")
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
