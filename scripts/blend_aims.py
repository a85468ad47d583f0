"""Measure CacheBlend's aim (issue 21) with the default model and print one table: three stored
documents of ~700 tokens in a new order, a needle in the second or third, asked after them.

For each case the documents are prefilled alone and stored first (not timed: they are the stored
documents); then the prompt is answered twice, by a full prefill of the whole prompt and by
blending the stored documents (`kvforge.blend`) with a share of their tokens refreshed. Reported:
needle accuracy of each, how many answers equal the full prefill's, and the time to first token
(prefill to the first token's logits; the blend's includes reading the store), mean over cases.

    .venv/bin/python scripts/blend_aims.py [--cases 12] [--shares 0.15,0] [--settings full] [--json out.json]

Timed parts ran alone on the machine they report; figures are wall seconds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from kvforge import KVSpec
from kvforge.blend import BlendPrompt, blend_prefill, build_blend_prompt
from kvforge.cache import KVCache
from kvforge.eval.tasks import magic_key, magic_value, needle, plant, prose_words, sentence_units, single_question
from kvforge.generate import prefill, greedy, stop_ids
from kvforge.models import DEFAULT_MODEL, load_model
from kvforge.storage import QuantSpec
from kvforge.store import LocalStore
from kvforge.store.documents import cached_prefill

console = Console()
SETTINGS = {"full": KVSpec("full"), "kvzip 0.5 + int4": KVSpec("kvzip", 0.5, QuantSpec("int4"))}


def case(rng: random.Random, words: int) -> tuple[list[str], str, str, str]:
    """Three documents (each with its own keyed needle), in the prompt's order, the question
    about the needle of the second or third, its answer prefix and the answer."""
    keys = [magic_key(rng) for _ in range(3)]
    values = [magic_value(rng) for _ in range(3)]
    docs = [plant(sentence_units(prose_words(rng, words)), [needle(k, v)], [rng.random()]) for k, v in zip(keys, values)]
    asked = rng.choice([1, 2])
    question, prefix = single_question(keys[asked])
    return docs, question, prefix, values[asked]


def generate(loaded, cache: KVCache, logits: torch.Tensor, length: int) -> str:  # type: ignore[no-untyped-def]
    new = greedy(loaded.model, cache, logits, torch.tensor([length]), 12, stop_ids(loaded.tokenizer))[0]
    return loaded.tokenizer.decode(new, skip_special_tokens=True)


def full_prefill(loaded, prompt: BlendPrompt) -> tuple[float, str]:  # type: ignore[no-untyped-def]
    cache = KVCache(loaded.model, KVSpec().build(), tokenizer=loaded.tokenizer)
    start = time.perf_counter()
    logits = prefill(loaded.model, cache, prompt.ids)[None]
    seconds = time.perf_counter() - start
    return seconds, generate(loaded, cache, logits, len(prompt.ids))


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--words", type=int, default=520, help="words of prose per document (~700 tokens)")
    parser.add_argument("--shares", default="0.15,0.3,0")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"of: {', '.join(SETTINGS)}")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    loaded = load_model(args.model)
    shares = [float(s) for s in args.shares.split(",")]
    settings = {name: SETTINGS[name] for name in args.settings.split(",")}
    rng = random.Random(0)
    cases = [case(rng, args.words) for _ in range(args.cases)]
    rows: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as directory:
        store = LocalStore(directory)
        for docs, question, prefix, value in cases:
            prompt = build_blend_prompt(loaded.tokenizer, docs, question, chat=True, answer_prefix=prefix)
            for spec in settings.values():  # the stored documents
                for segment, is_doc in zip(prompt.segments, prompt.documents):
                    if is_doc:
                        cached_prefill(store, loaded, spec.build(), spec, segment, None)
            seconds, reference = full_prefill(loaded, prompt)
            row = rows.setdefault("full prefill", {"ttft": [], "correct": [], "equal": [], "refreshed": [], "tokens": []})
            row["ttft"].append(seconds), row["correct"].append(value in reference), row["equal"].append(True)
            row["refreshed"].append(0), row["tokens"].append(len(prompt.ids))
            for name, spec in settings.items():
                for share in shares:
                    start = time.perf_counter()
                    blended = blend_prefill(loaded, spec.build(), spec, prompt, store, share)
                    seconds = time.perf_counter() - start
                    text = generate(loaded, blended.cache, blended.logits, len(prompt.ids))
                    row = rows.setdefault(f"blend {name}, share {share:g}", {"ttft": [], "correct": [], "equal": [], "refreshed": [], "tokens": []})
                    row["ttft"].append(seconds), row["correct"].append(value in text), row["equal"].append(text == reference)
                    row["refreshed"].append(blended.refreshed), row["tokens"].append(len(prompt.ids))
                    assert blended.stored == 3, "every document was stored before"
    base = statistics.mean(rows["full prefill"]["ttft"])
    table = Table(title=f"CacheBlend: 3 stored documents in a new order, {args.cases} cases, {statistics.mean(rows['full prefill']['tokens']):.0f} prompt tokens")
    for col in ("how", "needle found", "answers = full prefill's", "tokens refreshed", "TTFT s", "TTFT / full"):
        table.add_column(col, justify="left" if col == "how" else "right")
    summary = {}
    for how, row in rows.items():
        ttft = statistics.mean(row["ttft"])
        summary[how] = {"correct": sum(row["correct"]), "equal": sum(row["equal"]), "cases": len(row["ttft"]), "ttft": ttft, "ratio": ttft / base, "refreshed": statistics.mean(row["refreshed"])}
        table.add_row(how, f"{sum(row['correct'])}/{len(row['ttft'])}", f"{sum(row['equal'])}/{len(row['ttft'])}", f"{statistics.mean(row['refreshed']):.0f}", f"{ttft:.2f}", f"{ttft / base:.2f}x")
    console.print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
