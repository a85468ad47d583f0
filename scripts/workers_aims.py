"""Measure `kvforge eval --workers` (issue 22) with the default model and print one table: a sweep
run in-process (torch on every core), on one Ray worker (every core) and on two workers (a core
each), rows per second of each and whether their rows are identical (scores, answers, bytes).

    .venv/bin/python scripts/workers_aims.py [--samples 20] [--length 1024] [--quick]

Each run starts from an empty --out; the Ray runs start a local cluster of the machine's CPUs
(its start and the actors' model loads are inside the timed run). Timed runs ran alone.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray
from rich.console import Console
from rich.table import Table

from kvforge.cli.common import ensure_calibration
from kvforge.eval.runner import EvalConfig, Workers, run_eval
from kvforge.policies import make_policy
from kvforge.models import DEFAULT_MODEL, load_model

FIELDS = ("prompt_hash", "answer", "score", "cache_bytes", "dense_bytes", "generated_tokens", "bits_per_element")
QUICK = dict(tasks=["niah_single", "niah_multikey", "vt"], ratios=[0.5, 0.75], length=1024, samples=3, settings=[False, True],
             policies=["full", "kvzip", "kvzap", "razor", "keydiff", "knorm", "streaming", "snapkv"])  # as `kvforge eval --quick`


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="the `kvforge eval --quick` preset instead")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        cfg = EvalConfig(model=args.model, **QUICK)  # type: ignore[arg-type]
    else:
        cfg = EvalConfig(model=args.model, tasks=["niah_single"], policies=["full", "knorm", "snapkv", "streaming"],
                         ratios=[0.5], length=args.length, samples=args.samples)  # fmt: skip
    loaded = load_model(args.model)
    ensure_calibration(loaded, [make_policy(p) for p in cfg.policies])  # measured once, found by every worker here
    results = {}
    for name, workers in (("in-process", None), ("1 worker", Workers(1)), ("2 workers", Workers(2))):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            rows, _ = run_eval(loaded, cfg, Path(out), workers=workers)
            seconds = time.perf_counter() - start
        if ray.is_initialized():
            ray.shutdown()  # each Ray run starts its own cluster: its start-up is in its time
        results[name] = (len(rows), seconds, {r.key: tuple(getattr(r, f) for f in FIELDS) for r in rows})
    base = results["in-process"]
    table = Table(title=f"eval sweep: {'--quick' if args.quick else f'{args.samples} samples x 4 methods, {args.length} tokens'}")
    for column in ("run", "rows", "seconds", "rows/s", "vs in-process", "rows identical"):
        table.add_column(column, justify="left" if column == "run" else "right")
    summary = {}
    for name, (count, seconds, by_key) in results.items():
        summary[name] = {"rows": count, "seconds": seconds, "rows_per_s": count / seconds, "identical": by_key == base[2]}
        table.add_row(name, str(count), f"{seconds:.1f}", f"{count / seconds:.3f}", f"{base[1] / seconds:.2f}x", "yes" if by_key == base[2] else "no")
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
