"""`kvforge serve` as a real process (tiny model): SIGTERM drains requests in flight, cancels
what is left after --shutdown-timeout and exits 0; a second signal exits at once."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from test_server import PROMPTS


class Process:
    def __init__(self, checkpoint, *flags: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        command = "from kvforge.cli import main; raise SystemExit(main())"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", command, "serve", "--model", str(checkpoint), "--port", str(self.port), "--prefill-chunk", "32", *flags],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.proc.kill()
        raise AssertionError("the server did not start: " + self.proc.stderr.read())

    def stream(self, tokens: int, first: threading.Event, reasons: list) -> threading.Thread:
        """A streamed request in a thread: sets `first` at its first token, appends its finish
        reason (None: the stream was cut) to `reasons`."""
        body = {"model": "default", "messages": [{"role": "user", "content": PROMPTS[4]}], "max_tokens": tokens, "temperature": 0, "stream": True}

        def run() -> None:
            reason = None
            try:
                with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=60) as response:
                    for line in response.iter_lines():
                        if line.startswith("data: {"):
                            first.set()
                            reason = json.loads(line[6:])["choices"][0]["finish_reason"] or reason
            except httpx.HTTPError:
                pass
            reasons.append(reason)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def exit_after(self, *signals: signal.Signals, gap: float = 0.2) -> tuple[int, float]:
        """Send the signals `gap` seconds apart; the exit status and seconds from the first to the exit."""
        start = time.time()
        for i, sig in enumerate(signals):
            if i:
                time.sleep(gap)
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=60), time.time() - start
        finally:
            self.proc.kill()


def started(server: Process, count: int, tokens: int) -> tuple[list[threading.Thread], list]:
    """`count` streamed requests, each in flight (its first token received): a request still
    connecting when the signal comes is refused, not drained, and would say nothing of draining."""
    firsts, reasons = [threading.Event() for _ in range(count)], []
    threads = [server.stream(tokens, first, reasons) for first in firsts]
    assert all(first.wait(60) for first in firsts)
    return threads, reasons


@pytest.mark.parametrize("timeout, tokens, finish", [("30", 150, True), ("0", 450, False)])
def test_sigterm_drains_for_at_most_the_timeout_then_exits_0(tiny_checkpoint, timeout, tokens, finish):
    """With time enough, the requests in flight finish; past the timeout they are cut."""
    server = Process(tiny_checkpoint, "--shutdown-timeout", timeout)
    threads, reasons = started(server, 2, tokens)
    status, seconds = server.exit_after(signal.SIGTERM)
    for thread in threads:
        thread.join(10)
    assert status == 0 and seconds < 15 and len(reasons) == 2
    assert all(reason is not None for reason in reasons) if finish else reasons == [None, None]


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_exits_at_once(tiny_checkpoint, second):
    server = Process(tiny_checkpoint, "--shutdown-timeout", "30")
    started(server, 4, 450)
    status, seconds = server.exit_after(signal.SIGTERM, second)
    assert status == 1 and seconds < 5
