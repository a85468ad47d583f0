"""Measure `kvforge serve` under careless and hostile clients (issue 19's aims), on a model the
server loads itself (default: the embedded SmolLM2), and print three tables:

1. every fault of `kvforge.client.faults` sent while 8 good requests run: status, param, the
   message, and whether the 8 answered exactly as in a run without faults;
2. 32 good clients while one bad client sends a fault every 100 ms for at least a minute: failed
   good requests and answers against a run without the bad client;
3. the inter-token gaps of 8 streams alone, and while one large body arrives (a 5 MB prompt, a
   600 kB prompt that is tokenized, 100k messages): p50, p99 and the largest;
4. under --kv-memory 150MiB, a non-streamed client that hangs up 1 s into a 2500-token answer:
   how soon it is cancelled, the K/V bytes then held, and the next request's latency.

    .venv/bin/python scripts/hostile.py [--model default] [--seconds 60] [--json out.json]

Run it with nothing else on the machine: the gaps are timings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from kvforge.client.faults import catalogue, good_chat, problems, send
from kvforge.client.loadtest import QUESTIONS, kvforge_metric, percentile

KEY = "hostile-bench-key"
console = Console()


class Server:
    def __init__(self, model: str, *flags: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "kvforge"), "serve", "--model", model, "--port", str(self.port), "--api-key", KEY, *flags],
            stdout=subprocess.DEVNULL, stderr=open(os.devnull, "w"),
        )  # fmt: skip
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise SystemExit("the server did not start")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def prompts(count: int) -> list[str]:
    words = "the engine keeps every request apart so one bad client cannot hurt the others".split()
    return [" ".join(words[(i + j) % len(words)] for j in range(40)) + f"\n\n{QUESTIONS[i % len(QUESTIONS)]}" for i in range(count)]


async def answer(client: httpx.AsyncClient, url: str, text: str, max_tokens: int, times: list[float] | None = None) -> str | None:
    """One good streamed chat request; its text (None: it failed). `times`: when each of its
    tokens arrived is appended."""
    body = {**good_chat("default", text, max_tokens), "stream": True}
    pieces = []
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return None
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    if times is not None:
                        times.append(time.perf_counter())
                    pieces.append(delta)
    except httpx.HTTPError:
        return None
    return "".join(pieces)


def headers() -> dict[str, str]:
    return {"authorization": f"Bearer {KEY}"}


async def good_batch(
    url: str, texts: list[str], clients: int, max_tokens: int, times: list[list[float]] | None = None
) -> list[str | None]:  # fmt: skip
    """`texts` as good requests, `clients` at a time; `times[i]`: when request i's tokens arrived."""
    gate = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(timeout=600, headers=headers(), limits=httpx.Limits(max_connections=clients + 4)) as client:

        async def one(i: int, text: str) -> str | None:
            async with gate:
                return await answer(client, url, text, max_tokens, None if times is None else times[i])

        return list(await asyncio.gather(*(one(i, t) for i, t in enumerate(texts))))


def in_thread(work) -> tuple[threading.Thread, list]:  # type: ignore[no-untyped-def]
    out: list = []
    thread = threading.Thread(target=lambda: out.append(work()), daemon=True)
    thread.start()
    return thread, out


def fault_table(server: Server, window: int) -> dict:
    texts = prompts(8)
    reference = asyncio.run(good_batch(server.url, texts, 8, 32))
    faults = catalogue(context_window=window, max_body_bytes=8 * 2**20)
    thread, out = in_thread(lambda: asyncio.run(good_batch(server.url, texts, 8, 32)))
    rows = []
    with httpx.Client(timeout=120) as client:
        for fault in faults:
            start = time.perf_counter()
            response = send(client, server.url, fault, "default", KEY)
            seconds = time.perf_counter() - start
            wrong = problems(response, fault)
            error = response.json().get("error", {}) if "json" in response.headers.get("content-type", "") else {}
            rows.append({"case": fault.name, "status": response.status_code, "param": error.get("param"),
                         "message": error.get("message", response.text[:80]), "seconds": seconds, "problems": wrong})  # fmt: skip
    overlapped = thread.is_alive()  # the good requests were still running when the last fault was answered
    thread.join()
    good_equal = out[0] == reference
    table = Table(title=f"every fault while 8 good requests run (still running after the last fault: {overlapped}; "
                  f"the 8 answers equal to a run without faults: {good_equal})")  # fmt: skip
    for col in ("case", "status", "param", "s", "message", "ok"):
        table.add_column(col, overflow="fold", max_width=70 if col == "message" else None)
    for r in rows:
        table.add_row(r["case"], str(r["status"]), str(r["param"]), f"{r['seconds']:.2f}", r["message"][:140], "yes" if not r["problems"] else "; ".join(r["problems"]))
    console.print(table)
    return {"faults": rows, "good_equal": good_equal, "overlapped": overlapped}


def storm(server: Server, window: int, seconds: float) -> dict:
    """32 good clients, and one bad client sending a fault every 100 ms for at least `seconds`."""
    texts = prompts(64) * 3  # about a minute of work alone on two cores
    start = time.perf_counter()
    reference = asyncio.run(good_batch(server.url, texts, 32, 16))
    alone = time.perf_counter() - start
    faults = [f for f in catalogue(context_window=window, max_body_bytes=8 * 2**20) if len(str(f.body)) < 10**5]
    sent, wrong = 0, []
    stop = threading.Event()

    def bad_client() -> None:
        nonlocal sent
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                fault = faults[sent % len(faults)]
                wrong.extend(problems(send(client, server.url, fault, "default", KEY), fault))
                sent += 1
                time.sleep(0.1)

    bad = threading.Thread(target=bad_client, daemon=True)
    begun = time.perf_counter()
    bad.start()
    answers = asyncio.run(good_batch(server.url, texts, 32, 16))
    while time.perf_counter() - begun < seconds:
        time.sleep(0.1)
    stop.set()
    bad.join()
    failed = sum(a is None for a in answers)
    differ = sum(a != r for a, r in zip(answers, reference))
    table = Table(title=f"32 good clients, {len(texts)} requests, and a bad request every 100 ms")
    for col in ("run", "s", "good failed", "answers unequal to the run alone", "bad requests sent", "bad answered wrongly"):
        table.add_column(col, justify="right")
    table.add_row("alone", f"{alone:.1f}", str(sum(r is None for r in reference)), "-", "0", "-")
    table.add_row("with the bad client", f"{time.perf_counter() - begun:.1f}", str(failed), str(differ), str(sent), str(len(wrong)))
    console.print(table)
    return {"requests": len(texts), "alone_seconds": alone, "good_failed": failed, "unequal": differ, "bad_sent": sent, "bad_wrong": wrong[:5]}


def gaps_table(server: Server, tokens: int = 96) -> dict:
    """The inter-token gaps of 8 streams once all of them decode (their prefills, which pause
    every stream, are over), alone and with each large body sent 0.3 s into that phase."""
    big = {
        "5 MB prompt": good_chat("default", "word " * (5 * 2**20 // 5)),
        "600 kB prompt (tokenized)": good_chat("default", "word " * (600_000 // 5)),
        "100k messages": {**good_chat("default"), "messages": [{"role": "user", "content": "hi"}] * 100_000},
    }
    texts = prompts(8)
    rows, results = [], {}
    for name, body in [("8 streams alone", None), *big.items()]:
        times: list[list[float]] = [[] for _ in texts]
        thread, _ = in_thread(lambda: asyncio.run(good_batch(server.url, texts, 8, tokens, times)))
        while not all(times):  # every stream has its first token: all decode from here on
            time.sleep(0.005)
        decoding = max(t[0] for t in times)
        status, took = None, None
        time.sleep(0.3)
        if body is not None:
            payload = json.dumps(body).encode()
            start = time.perf_counter()
            response = httpx.post(server.url + "/v1/chat/completions", content=payload, headers={**headers(), "content-type": "application/json"}, timeout=120)
            status, took = response.status_code, time.perf_counter() - start
        thread.join()
        gaps = [b - a for t in times for a, b in zip(t, t[1:]) if a >= decoding]
        p50, p99 = percentile(gaps, 0.5), percentile(gaps, 0.99)
        results[name] = {"p50": p50, "p99": p99, "max": max(gaps), "gaps": len(gaps), "status": status, "body_seconds": took}
        rows.append((name, status, took, len(gaps), p50, p99, max(gaps)))
    base = results["8 streams alone"]["p99"]
    table = Table(title=f"inter-token gaps (ms) of 8 streams of {tokens} tokens while all decode, alone and while one large body arrives")
    for col in ("body", "its status", "its s", "gaps", "p50", "p99", "p99 rise", "max"):
        table.add_column(col, justify="right")
    for name, status, took, count, p50, p99, top in rows:
        table.add_row(name, "-" if status is None else str(status), "-" if took is None else f"{took:.2f}", str(count), f"{p50 * 1000:.0f}",
                      f"{p99 * 1000:.0f}", f"{(p99 - base) * 1000:+.0f}", f"{top * 1000:.0f}")  # fmt: skip
    console.print(table)
    return results


def metric(server: Server, name: str) -> float:
    value = kvforge_metric(server.url, name, KEY)
    assert value is not None, f"kvforge_{name} is not in /metrics"
    return value


def abandoned(model: str) -> dict:
    server = Server(model, "--kv-memory", "150MiB")
    try:
        body = good_chat("default", prompts(1)[0], 2500)
        with contextlib.suppress(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers(), timeout=1.0)
        gone = time.perf_counter()
        while metric(server, "requests_cancelled_total") < 1 and time.perf_counter() - gone < 600:
            time.sleep(0.01)
        cancelled_after = time.perf_counter() - gone
        held = metric(server, "kv_allocated_bytes") - metric(server, "prefix_cache_bytes")
        start = time.perf_counter()
        httpx.post(server.url + "/v1/chat/completions", json=good_chat("default", prompts(2)[1], 16), headers=headers(), timeout=600)
        next_seconds = time.perf_counter() - start
    finally:
        server.stop()
    table = Table(title="--kv-memory 150MiB: a non-streamed client hangs up 1 s into a 2500-token answer")
    for col in ("cancelled after (s)", "K/V MiB then held by requests", "next request's latency (s)"):
        table.add_column(col, justify="right")
    table.add_row(f"{cancelled_after:.2f}", f"{held / 2**20:.1f}", f"{next_seconds:.2f}")
    console.print(table)
    return {"cancelled_after": cancelled_after, "held_bytes": held, "next_seconds": next_seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--window", type=int, default=8192, help="the model's context window (tokens)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the bad client sends at least")
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", default="faults,storm,gaps,abandoned", help="which tables (comma list)")
    args = parser.parse_args()
    with console.status("starting kvforge serve ..."):
        server = Server(args.model)
    try:
        report: dict = {}
        parts = args.only.split(",")
        if "faults" in parts:
            report["faults"] = fault_table(server, args.window)
        if "storm" in parts:
            report["storm"] = storm(server, args.window, args.seconds)
        if "gaps" in parts:
            report["gaps"] = gaps_table(server)
        if "abandoned" in parts:
            report["abandoned"] = abandoned(args.model)
    finally:
        status = server.stop()
    console.print(f"server exit status after SIGTERM: {status}")
    report["exit_status"] = status
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
