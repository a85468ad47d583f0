"""The store's restart aim (issue 21) on the engine `kvforge serve` runs, in process, with the
default model: a ~2k-token document asked once by a server with `--store`, the server restarted
(a new engine over the same directory), then a new question:

- time to first token of the new question after the restart, against a cold request with the same
  settings on a server without a store (which pays the prefill and kvzip's passes);
- whether its answer equals the one a server that kept the compressed prefix in memory gives.

    .venv/bin/python scripts/store_serve_aims.py [--model default] [--policy kvzip --ratio 0.5 --quant int4]

Figures are wall seconds of one run each, nothing else running.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time

from rich.console import Console
from rich.table import Table

from kvforge.client.loadtest import QUESTIONS
from kvforge.engine import Engine, KVSettings, Request, SamplingParams
from kvforge.eval import corpus
from kvforge.models import DEFAULT_MODEL, load_model
from kvforge.storage import QuantSpec
from kvforge.store import LocalStore

console = Console()


def ask(engine: Engine, ids: list[int], kv: KVSettings) -> tuple[float, str]:
    """Seconds to the first token and the whole answer (greedy, 32 tokens)."""
    first: list[float] = []
    text: list[str] = []
    done = threading.Event()

    def deliver(event) -> None:  # type: ignore[no-untyped-def]
        if event.text and not first:
            first.append(time.perf_counter())
        text.append(event.text)
        if event.finish_reason:
            done.set()

    start = time.perf_counter()
    engine.submit(Request(ids, SamplingParams(32, temperature=0.0), kv, deliver))
    done.wait()
    return (first[0] if first else time.perf_counter()) - start, "".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--policy", default="kvzip")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--quant", default="int4")
    args = parser.parse_args()
    loaded = load_model(args.model)
    kv = KVSettings(args.policy, args.ratio, QuantSpec(args.quant))
    words = " ".join(corpus.paragraphs()).split()
    document = " ".join((words * 3)[:1500])

    def chat(question: str) -> list[int]:
        messages = [{"role": "user", "content": f"{document}\n\n{question}"}]
        return list(loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))

    first, second = chat(QUESTIONS[0]), chat(QUESTIONS[1])
    rows: dict[str, str] = {"document tokens": str(len(first))}
    with tempfile.TemporaryDirectory() as tmp:
        for label, engine_store in (("server with --store", LocalStore(tmp)), ("restarted server, same --store", LocalStore(tmp))):
            engine = Engine(loaded, kv, store=engine_store)
            engine.start()
            try:
                seconds, answer = ask(engine, first if label.startswith("server") else second, kv)
            finally:
                engine.stop()
            rows[f"{label}: time to first token s"] = f"{seconds:.3f}"
            rows[f"{label}: store hits"] = str(engine_store.stats.hits)
            if label.startswith("restarted"):
                warm, warm_answer = seconds, answer
        rows["store MiB"] = f"{LocalStore(tmp).nbytes / 2**20:.2f}"
    cold_engine = Engine(loaded, kv)
    cold_engine.start()
    try:
        cold, _ = ask(cold_engine, second, kv)
    finally:
        cold_engine.stop()
    memory_engine = Engine(loaded, kv)
    memory_engine.start()
    try:
        ask(memory_engine, first, kv)
        _, memory_answer = ask(memory_engine, second, kv)  # from the compressed prefix kept in memory
    finally:
        memory_engine.stop()
    rows["cold request (no store): time to first token s"] = f"{cold:.3f}"
    rows["restarted / cold"] = f"{warm / cold:.3f}"
    rows["answer equal to the in-memory prefix's"] = "yes" if warm_answer == memory_answer else "no"
    table = Table(title=f"store restart aim (issue 21): {kv.policy} {kv.ratio} {kv.quant.mode}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in rows.items():
        table.add_row(name, value)
    console.print(table)


if __name__ == "__main__":
    main()
