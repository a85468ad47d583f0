"""Measure the block pool's serving aims (issue 20) on the engine `kvforge serve` runs, in process,
with the default model, and print one table:

1. one ~2k-token document: a first request alone, then 8 questions on it at once (prefix hits):
   the peak K/V bytes of each phase and their ratio;
2. 16 clients with prompts of 256..3000 tokens, 96 new tokens each, greedy, once without a memory
   limit and then with `kv_memory` set to a third and to a sixth of what their reservations add
   up to: the peak bytes against the limit, the preemptions, and whether every answer equals the
   unlimited run's.

    .venv/bin/python scripts/pool_aims.py [--model default] [--policy full --ratio 0 --quant none] [--json out.json]

`--policy`, `--ratio` and `--quant` pick the KV setting every request runs with (quantized caches
hold their codes and tails in the same pool).

Peaks are the engine's `kv_peak_bytes` (the bytes of the blocks and buffers held, shared ones
counted once, read after every engine step). The figures do not depend on timing.
"""

from __future__ import annotations

import argparse
import json
import threading

from rich.console import Console
from rich.table import Table

from kvforge.client.loadtest import QUESTIONS
from kvforge.engine import Engine, KVSettings, Request, SamplingParams
from kvforge.eval import corpus
from kvforge.models import DEFAULT_MODEL, load_model
from kvforge.storage import QuantSpec

console = Console()
MIB = 2**20
NEW_TOKENS = 96  # per client in the preemption run: enough decoding to outgrow what admission saw


def words(count: int, offset: int = 0) -> str:
    text = " ".join(corpus.paragraphs()).split()
    return " ".join((text * (1 + count // len(text) + 1))[offset : offset + count])


def chat_ids(loaded, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def run(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Submit every prompt at once (greedy) with the engine's KV setting; wait for all; their
    generated token ids."""
    done = threading.Semaphore(0)
    requests = []
    for ids in prompts:
        request = Request(ids, SamplingParams(max_tokens, temperature=0.0), engine.defaults, lambda event: done.release() if event.finish_reason else None)
        engine.submit(request)
        requests.append(request)
    for _ in requests:
        done.acquire()
    return [r.generated for r in requests]


def prefix_sharing(loaded, kv: KVSettings) -> dict[str, float]:  # type: ignore[no-untyped-def]
    engine = Engine(loaded, kv, prefill_chunk=256)
    engine.start()
    try:
        document = words(1500)
        first = chat_ids(loaded, f"{document}\n\nSummarise the text above in one sentence.")
        run(engine, [first], 32)
        single = engine.stats.peak_bytes
        engine.stats.peak_bytes = 0
        hits = engine.stats.prefix_hits
        # Eight questions other than the first request's (the list has eight: the first comes back numbered).
        asked = [*QUESTIONS[1:], f"{QUESTIONS[0]} Number it 1."]
        questions = [chat_ids(loaded, f"{document}\n\n{q}") for q in asked]
        run(engine, questions, 32)
        return {
            "document_tokens": len(first),
            "single_peak_bytes": single,
            "eight_peak_bytes": engine.stats.peak_bytes,
            "ratio": engine.stats.peak_bytes / single,
            "prefix_hits": engine.stats.prefix_hits - hits,
        }
    finally:
        engine.stop()


def preemption(loaded, kv: KVSettings) -> dict[str, float]:  # type: ignore[no-untyped-def]
    lengths = [256 + (3000 - 256) * i // 15 for i in range(16)]
    prompts = [chat_ids(loaded, f"{words(int(n * 0.7), 131 * i)}\n\n{QUESTIONS[i % len(QUESTIONS)]}")[-n:] for i, n in enumerate(lengths)]
    free = Engine(loaded, kv, prefill_chunk=256)
    need = sum(free.reservation(Request(p, SamplingParams(NEW_TOKENS), kv, lambda _: None)) for p in prompts)
    free.start()
    try:
        reference = run(free, prompts, NEW_TOKENS)
        free_peak = free.stats.peak_bytes
    finally:
        free.stop()
    out: dict[str, float] = {"reservations_bytes": need, "unlimited_peak_bytes": free_peak}
    for share in (3, 6):  # the aim's third, and a sixth: tight enough that decoding must preempt
        limited = Engine(loaded, kv, kv_memory=need // share, prefill_chunk=256)
        limited.start()
        try:
            answers = run(limited, prompts, NEW_TOKENS)
        finally:
            limited.stop()
        out |= {
            f"1/{share}: limit_bytes": need // share,
            f"1/{share}: peak_bytes": limited.stats.peak_bytes,
            f"1/{share}: pool_capacity_bytes": limited.memory.capacity_nbytes,
            f"1/{share}: preempted": limited.stats.preempted,
            f"1/{share}: answered": sum(1 for a in answers if a),
            f"1/{share}: equal_answers": sum(1 for a, b in zip(answers, reference) if a == b),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--policy", default="full")
    parser.add_argument("--ratio", type=float, default=0.0)
    parser.add_argument("--quant", default="none")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    kv = KVSettings(args.policy, args.ratio, QuantSpec(args.quant))
    loaded = load_model(args.model)
    results = {"prefix_sharing": prefix_sharing(loaded, kv), "preemption": preemption(loaded, kv)}
    table = Table(title=f"block pool aims (issue 20): {kv.policy} {kv.ratio} {kv.quant.mode}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for group, values in results.items():
        for name, value in values.items():
            shown = f"{value / MIB:.1f} MiB" if name.endswith("bytes") else (f"{value:.2f}" if isinstance(value, float) else str(value))
            table.add_row(f"{group}: {name}", shown)
    console.print(table)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
