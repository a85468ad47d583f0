"""`kvforge serve --replicas 2`: two engine replicas on a local Ray cluster of this test's own
(Ray Serve), behind one front, driven by the official openai client (tiny model, a shared store)."""

from __future__ import annotations

import functools
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import ray
import uvicorn
from fastapi import FastAPI
from ray import serve

from kvforge.cli import build_parser
from kvforge.cli.serve import serve_engine, serve_limits
from kvforge.models import load_text_side
from kvforge.server.app import create_app
from kvforge.server.replicas.launch import Replicas, start_front

DOCUMENT = " ".join(f"w{i % 40}" for i in range(300))  # one long shared prefix (word-level tokens)


class Running:
    """`app` served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, app: FastAPI) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, by its name and labels as written."""
        text = httpx.get(self.url + "/metrics").text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("kvforge_")}


def per_replica(metrics: dict[str, float], name: str) -> dict[str, float]:
    found = {}
    for key, value in metrics.items():
        match = re.fullmatch(rf'kvforge_{name}\{{replica="([^"]+)"\}}', key)
        if match:
            found[match.group(1)] = value
    return found


def serve_args(checkpoint, store) -> object:  # type: ignore[no-untyped-def]
    return build_parser().parse_args(["serve", "--model", str(checkpoint), "--store", str(store), "--prefill-chunk", "32"])


@pytest.fixture(scope="module")
def cluster():  # type: ignore[no-untyped-def]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def front(cluster, tiny_checkpoint, tmp_path_factory):  # type: ignore[no-untyped-def]
    args = serve_args(tiny_checkpoint, tmp_path_factory.mktemp("store"))
    limits = serve_limits(args)
    app, stop = start_front(Replicas(2, None, 1, "kvforge-test"), functools.partial(serve_engine, args), load_text_side(str(tiny_checkpoint)), 0.5, limits)
    running = Running(app)
    yield running
    running.close()
    stop()


@pytest.fixture(scope="module")
def single(tiny_checkpoint, tmp_path_factory):  # type: ignore[no-untyped-def]
    """One server in this process on the same model: what the replicas must answer."""
    engine = serve_engine(serve_args(tiny_checkpoint, tmp_path_factory.mktemp("single-store")))
    engine.start()
    running = Running(create_app(engine, engine.loaded.name))
    yield running
    running.close()
    engine.stop()


def settled(front: Running, name: str, total: float) -> dict[str, float]:
    """The per-replica values of `name` once they add up to `total` (replicas push their metrics
    as requests end, and every second)."""
    deadline = time.time() + 10
    while True:
        got = per_replica(front.metrics(), name)
        if sum(got.values()) == total or time.time() > deadline:
            return got
        time.sleep(0.2)


def ask(server: Running, text: str, **kw) -> str:  # type: ignore[no-untyped-def]
    reply = server.client.chat.completions.create(model="default", messages=[{"role": "user", "content": text}], max_tokens=8, temperature=0, **kw)
    return reply.choices[0].message.content


def test_two_replicas_answer_as_one_server_does(front, single):
    for text in ("w1 w2 w3", "w7 w7 w9 w10", DOCUMENT + " w3"):
        assert ask(front, text) == ask(single, text)
    streamed = front.client.completions.create(model="default", prompt="w4 w5 w6", max_tokens=6, temperature=0, stream=True)
    plain = single.client.completions.create(model="default", prompt="w4 w5 w6", max_tokens=6, temperature=0)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_prompts_sharing_a_document_go_to_the_replica_that_holds_it(front):
    before = front.metrics()
    completed = before["kvforge_requests_completed_total"]
    questions = [f"w{i} w{i + 1}" for i in range(6)]
    for q in questions:
        ask(front, DOCUMENT + " " + q)
    after = settled(front, "requests_completed_total", completed + len(questions))
    got = {r: after[r] - per_replica(before, "requests_completed_total").get(r, 0) for r in after}
    assert sorted(got.values()) == [0, len(questions)]  # every one on the replica that took the first
    holder = max(got, key=got.__getitem__)
    hits = per_replica(front.metrics(), "prefix_hits_total")
    assert hits[holder] - per_replica(before, "prefix_hits_total").get(holder, 0) >= len(questions) - 1


def test_totals_are_the_sum_of_the_replicas(front):
    ask(front, "w1 w2")
    metrics = front.metrics()
    assert metrics["kvforge_replicas"] == 2
    for name in ("requests_completed_total", "prompt_tokens_total", "generated_tokens_total", "kv_pool_capacity_bytes"):
        replicas = per_replica(metrics, name)
        assert len(replicas) == 2 and metrics[f"kvforge_{name}"] == sum(replicas.values())
    health = httpx.get(front.url + "/health").json()
    assert health["status"] == "ok" and health["replicas"] == 2


def test_errors_are_one_servers_errors(front, single):
    bad = [
        {"model": "nope", "messages": [{"role": "user", "content": "w1"}]},  # refused at the front
        {"model": "default", "messages": [{"role": "user", "content": "w1"}], "kv_policy": "nonesuch"},  # in a replica
        {"model": "default", "messages": [{"role": "user", "content": "w1"}], "max_tokens": 100000},
    ]
    for body in bad:
        ours, theirs = httpx.post(front.url + "/v1/chat/completions", json=body), httpx.post(single.url + "/v1/chat/completions", json=body)
        assert (ours.status_code, ours.json()) == (theirs.status_code, theirs.json()) and ours.status_code in (400, 404)
    assert httpx.post(front.url + "/v1/chat/completions", content=b"{").status_code == 400
    assert front.metrics()['kvforge_requests_refused_total{status="400"}'] >= 3


def replica_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "ServeReplica:kvforge-test"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def test_a_replica_killed_mid_request_gives_an_error_and_is_replaced(front):
    # (last in the module: it takes the replicas down)
    stream = front.client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": DOCUMENT}], max_tokens=200, temperature=0, stream=True
    )  # fmt: skip
    chunks = iter(stream)
    next(chunks)  # the role, from the front
    next(chunks)  # the first token: the request is running in a replica
    started = time.time()
    for pid in replica_pids():
        subprocess.run(["kill", "-9", str(pid)])
    with pytest.raises(openai.APIError, match="replica"):
        for _ in chunks:
            pass
    assert time.time() - started < 30  # an error, not a hang
    deadline, answered = time.time() + 120, None
    while answered is None and time.time() < deadline:  # Ray starts new replicas
        try:
            answered = ask(front, "w1 w2 w3")
        except openai.APIError:
            time.sleep(1)
    assert answered is not None


def test_without_ray_serve_replicas_are_refused_in_one_line(tmp_path):
    # A Python where `import ray` fails, running the command.
    code = "import sys; sys.modules['ray'] = None; from kvforge.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "serve", "--model", "random:tiny", "--replicas", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "kvforge: error: --replicas runs on Ray Serve, which is not installed (ray is missing): pip install 'kvforge[distributed]'"
