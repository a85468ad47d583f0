"""The serving aim of issue 22: one server against `kvforge serve --replicas 2` on the default
model, 16 clients sending 32 requests that ask questions about one ~2k-token document (`kvforge
loadtest --document`): throughput, time to first token, and each replica's prefix hits.

    .venv/bin/python scripts/replicas_aims.py [--requests 32 --clients 16 --max-tokens 32] [--json out.json]

Each server is started as `kvforge serve` would be (a subprocess; with --replicas, a local Ray
cluster of its own), with a fresh --store; one run each, nothing else running. One server uses
every core (two torch threads here); each replica one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from kvforge.client.loadtest import loadtest, synthetic_prompts
from kvforge.eval import corpus

console = Console(width=200)  # the table's numbers whole, printed to a file too
PORT = 8431
KVFORGE = str(Path(sys.executable).with_name("kvforge"))


def started(flags: list[str], log: Path) -> subprocess.Popen:
    server = subprocess.Popen([KVFORGE, "serve", "--port", str(PORT), *flags], stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}); see {log}")
        time.sleep(1)
    raise RuntimeError(f"the server did not answer in 600 s; see {log}")


def stopped(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(120)
    except subprocess.TimeoutExpired:
        server.kill()


def by_replica(name: str) -> dict[str, float]:
    """`kvforge_<name>` per replica (one server: under "-")."""
    text = httpx.get(f"http://127.0.0.1:{PORT}/metrics").text
    labelled = dict(re.findall(rf'^kvforge_{name}\{{replica="([^"]+)"\}} (\S+)$', text, re.M))
    if labelled:
        return {k: float(v) for k, v in labelled.items()}
    total = re.search(rf"^kvforge_{name} (\S+)$", text, re.M)
    return {"-": float(total.group(1)) if total else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--words", type=int, default=1500, help="words of the document (1500: about 2k tokens)")
    parser.add_argument("--asked-before", action="store_true",
                        help="ask the document once before the clients start (then it is in one replica's memory and in the store)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    words = " ".join(corpus.paragraphs()).split()
    document = " ".join((words * 3)[: args.words])
    prompts = synthetic_prompts(args.requests, 0, document)
    runs = {"one server (2 threads)": [], "--replicas 2 (1 thread each)": ["--replicas", "2"]}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, flags) in enumerate(runs.items()):
            console.print(f"[bold]{label}[/bold]: starting ...")
            server = started([*flags, "--store", f"{tmp}/store{i}"], Path(tmp) / f"server{i}.log")
            try:
                loadtest(f"http://127.0.0.1:{PORT}", "default", ["Say hello."] * 2, 2, 1)  # warm-up: not counted, not the document
                if args.asked_before:
                    loadtest(f"http://127.0.0.1:{PORT}", "default", synthetic_prompts(1, 0, document + " "), 1, 1)  # another question
                    time.sleep(3)  # its prefix written to the store
                base = {m: by_replica(m) for m in ("requests_completed_total", "prefix_hits_total", "store_hits_total")}
                report = loadtest(f"http://127.0.0.1:{PORT}", "default", prompts, args.clients, args.max_tokens)
                time.sleep(2.5)  # replicas push their metrics every second
                counts = {m: {r: v - base[m].get(r, 0) for r, v in by_replica(m).items()} for m in base}
            finally:
                stopped(server)
            results[label] = {"report": report.to_dict(), "per_replica": counts}
            console.print(label, json.dumps(report.to_dict()), json.dumps(counts))
    table = Table(title=f"{args.requests} requests, {args.clients} clients, one ~{args.words}-word document, {args.max_tokens} new tokens each")
    for col in ("run", "s", "req/s", "tok/s", "TTFT first", "TTFT p50", "TTFT p90", "errors", "requests / replica", "prefix hits / replica", "store hits / replica"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for label, got in results.items():
        r, per = got["report"], got["per_replica"]

        def split(metric: str) -> str:
            return " + ".join(f"{v:.0f}" for v in per[metric].values())

        table.add_row(
            label, f"{r['seconds']:.1f}", f"{r['requests_per_second']:.2f}", f"{r['tokens_per_second']:.1f}", f"{r['ttft_first']:.2f}",
            f"{r['ttft_p50']:.2f}", f"{r['ttft_p90']:.2f}", str(r["errors"]),
            split("requests_completed_total"), split("prefix_hits_total"), split("store_hits_total"),
        )  # fmt: skip
    console.print(table)
    console.print(f"machine: {os.cpu_count()} CPUs; ratio of throughput: {list(results.values())[1]['report']['requests_per_second'] / list(results.values())[0]['report']['requests_per_second']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
