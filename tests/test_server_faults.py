"""Careless and hostile clients against a real server on a loopback port (tiny model): every bad
request is refused in OpenAI's error shape while good requests run unharmed, an error inside the
engine fails only its request, clients that hang up are cancelled, the queue and the body have
limits, and the API key and Host header are enforced."""

from __future__ import annotations

import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import httpx
import openai
import pytest
import torch

from kvforge.engine import Engine, Event, KVSettings, Request, SamplingParams
from kvforge.engine.engine import QueueFull
from kvforge.policies.base import StepContext
from kvforge.policies.knorm import KNorm
from kvforge.client.faults import catalogue, good_chat, problems, send
from kvforge.server.limits import ServerLimits, allowed_hosts
from test_server import PROMPTS, Served, expected, greedy

KEY = "test-key-123"
LIMITS = ServerLimits(api_key=KEY, max_body_bytes=64 * 2**10, allowed_hosts=allowed_hosts(None, "127.0.0.1"))


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    from kvforge.models import load_model

    return load_model(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def guarded(loaded):
    server = Served(loaded, limits=LIMITS)
    yield server
    server.close()


def good_request(served: Served, i: int, tokens: int) -> str:
    """Request i of 8 good ones: even ones streamed, odd ones not; every other one compressed."""
    extra = {"kv_policy": "knorm", "kv_ratio": 0.5} if i % 4 < 2 else {}
    messages = [{"role": "user", "content": PROMPTS[i]}]
    if i % 2 == 0:
        chunks = served.client.chat.completions.create(model="tiny", messages=messages, max_tokens=tokens, temperature=0, stream=True, extra_body=extra)
        return "".join(c.choices[0].delta.content or "" for c in chunks)
    reply = served.client.chat.completions.create(model="tiny", messages=messages, max_tokens=tokens, temperature=0, extra_body=extra)
    return reply.choices[0].message.content


def good_expected(loaded, i: int, tokens: int) -> str:
    return expected(loaded, PROMPTS[i], "knorm", 0.5, tokens) if i % 4 < 2 else expected(loaded, PROMPTS[i], "full", 0.0, tokens)


def test_every_fault_is_refused_while_8_good_requests_run(guarded, loaded):
    faults = catalogue(context_window=512, max_body_bytes=LIMITS.max_body_bytes)
    found: dict[str, list[str]] = {}
    rounds = 0
    with ThreadPoolExecutor(8) as pool, httpx.Client(timeout=30) as client:
        good = [pool.submit(good_request, guarded, i, 120) for i in range(8)]
        while rounds == 0 or not all(f.done() for f in good):  # every fault at least once, and again while they run
            for fault in faults:
                wrong = problems(send(client, guarded.url, fault, "tiny", KEY), fault)
                if wrong:
                    found[fault.name] = wrong
            rounds += 1
        answers = [f.result() for f in good]
    assert found == {}
    assert answers == [good_expected(loaded, i, 120) for i in range(8)]
    assert guarded.metric("requests_failed_total") == 0 and guarded.metric("running") == 0
    assert guarded.metric("kv_allocated_bytes") == 0


OPENAI_ERRORS = {400: openai.BadRequestError, 401: openai.AuthenticationError, 404: openai.NotFoundError, 405: openai.APIStatusError}


def test_the_official_client_reads_every_refusal_it_can_send(guarded):
    """Every fault with a JSON body, sent by the openai client: the exception class its status
    maps to, and the field and code it parses out of the body."""
    sent = 0
    for fault in catalogue(context_window=512, max_body_bytes=LIMITS.max_body_bytes):
        if isinstance(fault.body, bytes) or fault.status not in OPENAI_ERRORS:
            continue  # bytes no client would send: raw HTTP covers them in the test above
        client = guarded.client if fault.authorized else guarded.client.with_options(api_key="wrong-key")
        body = None if fault.body is None else {**good_chat("tiny"), **fault.body}
        with pytest.raises(OPENAI_ERRORS[fault.status]) as caught:
            if fault.method == "GET":
                client.get(fault.path.removeprefix("/v1"), cast_to=object)
            else:
                client.post(fault.path.removeprefix("/v1"), body=body, cast_to=object, options={"headers": fault.headers})
        assert caught.value.status_code == fault.status and caught.value.param == fault.param, fault.name
        sent += 1
    assert sent >= 30


def test_refusals_name_the_field_and_keep_details_out(guarded):
    with httpx.Client(timeout=30) as client:
        auth = {"authorization": f"Bearer {KEY}"}
        body = {"model": "tiny", "messages": [{"role": "user", "content": "w1"}], "max_tokens": 0}
        error = client.post(guarded.url + "/v1/chat/completions", json=body, headers=auth).json()["error"]
        assert error == {"message": "max_tokens=0 is outside the allowed range [1, the model's context window]; ask for at least one token",
                         "type": "invalid_request_error", "param": "max_tokens", "code": None}  # fmt: skip
        refused = client.get(guarded.url + "/v1/models", headers={"authorization": "Bearer wrong"})
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert client.get(guarded.url + "/health").status_code == 200  # open without the key
        assert client.get(guarded.url + "/metrics").status_code == 401
        assert client.get(guarded.url + "/v1/models", headers={**auth, "host": "localhost:1234"}).status_code == 200
        assert client.get(guarded.url + "/v1/models", headers={**auth, "host": "[::1]:80"}).status_code == 200
        rebound = client.get(guarded.url + "/health", headers={"host": "evil.example:80"})
        assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "host_not_allowed"
        # A body without a declared length is counted as it arrives.
        chunks = (b"x" * 1024 for _ in range(80))
        assert client.post(guarded.url + "/v1/completions", content=chunks, headers=auth).status_code == 413
    # A client waiting for "100 Continue" before sending too much is answered at once.
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as raw:
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " + KEY.encode()
                    + b"\r\nContent-Type: application/json\r\nContent-Length: 99999999\r\nExpect: 100-continue\r\n\r\n")  # fmt: skip
        assert raw.recv(64).startswith(b"HTTP/1.1 413")
    text = httpx.get(guarded.url + "/metrics", headers={"authorization": f"Bearer {KEY}"}).text
    assert 'kvforge_requests_refused_total{status="401"}' in text and 'kvforge_requests_refused_total{status="413"}' in text


@dataclass
class Poisoned(KNorm):
    """KNorm that breaks on one prompt: any prefill chunk with POISON tokens in a row raises (as
    a bug triggered by one request's data would); with `batched_decode`, any decoding step of
    more than one sequence raises."""

    name: ClassVar[str] = "knorm"
    batched_decode: bool = False
    POISON: ClassVar[int] = 13

    def score(self, ctx: StepContext) -> torch.Tensor:
        if ctx.decoding and self.batched_decode and ctx.query is not None and ctx.query.shape[0] > 1:
            raise RuntimeError("injected fault in a batched decoding step")
        if not ctx.decoding and bool((ctx.query_valid.sum(-1) == self.POISON).any()):
            raise RuntimeError("injected fault on a poisoned prompt")
        return super().score(ctx)


def run_engine(loaded, prompts: list[list[int]], policy: Poisoned, max_tokens: int) -> tuple[Engine, list[Event], list[str]]:
    """Submit every prompt before the engine starts (so their chunks share forwards), run them to
    the end; the engine, each request's last event and its text."""
    kv = KVSettings("knorm", 0.5)
    engine = Engine(loaded, kv, prefill_chunk=32, policies=lambda _: policy)
    events: list[list[Event]] = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def deliver(i: int):
        def take(event: Event) -> None:
            events[i].append(event)
            if event.finish_reason is not None:
                done.release()

        return take

    for i, prompt in enumerate(prompts):
        engine.submit(Request(prompt, SamplingParams(max_tokens, temperature=0), kv, deliver(i)))
    engine.start()
    try:
        for _ in prompts:
            assert done.acquire(timeout=120)
    finally:
        engine.stop()
    return engine, [e[-1] for e in events], ["".join(x.text for x in e) for e in events]


def ids(length: int, seed: int) -> list[int]:
    return torch.randint(5, 128, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_an_error_inside_the_engine_fails_only_its_request(loaded):
    # Chunks of 32: a 45-token prompt has a 13-token last chunk, the poison; the others never do.
    lengths = [33, 36, 38, 40, 45, 42, 49, 51, 54]
    prompts = [ids(n, seed=n) for n in lengths]
    engine, ends, texts = run_engine(loaded, prompts, Poisoned(ratio=0.5), max_tokens=12)
    culprit = lengths.index(45)
    assert ends[culprit].finish_reason == "error" and "injected fault" in ends[culprit].error
    others = [i for i in range(len(prompts)) if i != culprit]
    assert [ends[i].finish_reason for i in others] == ["length"] * 8
    assert [texts[i] for i in others] == [greedy(loaded, prompts[i], "knorm", 0.5, 12) for i in others]
    assert engine.stats.failed == 1 and engine.stats.completed == 8
    assert engine.stats.isolated == 4  # the culprit's batch of PREFILL_BATCH prompts, recomputed alone


def test_a_failed_batched_decoding_step_recomputes_each_request_alone(loaded):
    prompts = [ids(n, seed=100 + n) for n in (20, 24, 28)]
    engine, ends, texts = run_engine(loaded, prompts, Poisoned(ratio=0.5, batched_decode=True, decode_budget=8, evict_every=1), max_tokens=10)
    assert [e.finish_reason for e in ends] == ["length"] * 3 and all(e.completion_tokens == 10 for e in ends)
    assert engine.stats.isolated == 3 and engine.stats.failed == 0
    assert all(len(t) > 0 for t in texts)


@dataclass
class Unbuildable(KNorm):
    """KNorm whose cache cannot be built (as when the device has no memory left): the engine's
    check at submit reads `needs_calibration` once; building the cache reads it again and fails."""

    name: ClassVar[str] = "knorm"
    reads: int = 0

    @property  # type: ignore[override]
    def needs_calibration(self) -> bool:
        self.reads += 1
        if self.reads > 1:
            raise RuntimeError("injected: no memory for the cache")
        return False


def test_a_request_that_cannot_start_fails_alone_and_the_engine_goes_on(loaded):
    broken = KVSettings("knorm", 0.5)
    engine = Engine(loaded, KVSettings(), prefill_chunk=32, policies=lambda kv: Unbuildable(ratio=0.5) if kv == broken else KNorm())
    got: dict[str, list[Event]] = {"bad": [], "good": []}
    engine.submit(Request(ids(30, 1), SamplingParams(4, temperature=0), broken, got["bad"].append))
    engine.submit(Request(ids(30, 2), SamplingParams(4, temperature=0), KVSettings(), got["good"].append))
    engine.start()
    deadline = time.time() + 60
    while time.time() < deadline and not (got["good"] and got["good"][-1].finish_reason):
        time.sleep(0.01)
    alive = engine.thread is not None and engine.thread.is_alive()
    engine.stop()
    assert got["bad"][-1].finish_reason == "error" and "no memory" in got["bad"][-1].error
    assert got["good"][-1].finish_reason == "length" and alive
    assert engine.live == {} and engine.memory.pool.num_used * engine.memory.block_nbytes == engine.prefixes.nbytes  # nothing held for them


def test_a_consumer_that_raises_fails_only_its_own_request(loaded):
    kv = KVSettings()
    engine = Engine(loaded, kv, prefill_chunk=32)
    got: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("consumer bug")

    engine.submit(Request(ids(30, 1), SamplingParams(6, temperature=0), kv, broken))
    engine.submit(Request(ids(30, 2), SamplingParams(6, temperature=0), kv, got.append))
    engine.start()
    deadline = time.time() + 60
    while time.time() < deadline and not (got and got[-1].finish_reason):
        time.sleep(0.01)
    engine.stop()
    assert got[-1].finish_reason == "length" and "".join(e.text for e in got) == greedy(loaded, ids(30, 2), "full", 0.0, 6)
    assert engine.stats.failed == 1


def test_the_engine_refuses_what_it_cannot_run_and_bounds_its_queue(loaded):
    engine = Engine(loaded, KVSettings(), prefill_chunk=32, max_waiting=2)
    for prompt, text in (([], "prompt is empty"), ([5, 500], "token id 500 is outside the model's vocabulary [0, 127]")):
        with pytest.raises(ValueError, match=re.escape(text)):
            engine.submit(Request(prompt, SamplingParams(4), KVSettings(), lambda _: None))
    first, second = (Request(ids(10, seed), SamplingParams(4), KVSettings(), lambda _: None) for seed in range(2))
    engine.submit(first)
    engine.submit(second)
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        engine.submit(Request(ids(10, 3), SamplingParams(4), KVSettings(), lambda _: None))
    engine.cancel(first)  # a client that hung up holds no place in the queue
    engine.submit(Request(ids(10, 4), SamplingParams(4), KVSettings(), lambda _: None))
    assert engine.queued() == 2
    for ratio in range(100):  # the policies built for settings clients send are bounded
        engine.policy(KVSettings("knorm", ratio / 100))
    assert len(engine.policies) == 32


def test_bodies_being_read_count_against_the_queue(loaded):
    server = Served(loaded, limits=ServerLimits(max_queued=1))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
            slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"model\": ")  # fmt: skip
            deadline = time.time() + 10
            while time.time() < deadline and server.app_state().reading == 0:
                time.sleep(0.01)
            refused = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "w1", "max_tokens": 1})
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        deadline = time.time() + 10  # the slow client gone, its place is free again
        while time.time() < deadline and server.app_state().reading:
            time.sleep(0.01)
        assert httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "w1", "max_tokens": 1}).status_code == 200
    finally:
        server.close()


def test_a_full_queue_answers_429_with_retry_after(loaded):
    server = Served(loaded, limits=ServerLimits(max_queued=1), start=False)  # nothing leaves the queue yet
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(lambda: server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=4, temperature=0))
            deadline = time.time() + 10
            while time.time() < deadline and not server.engine.waiting:
                time.sleep(0.01)
            refused = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "w1 w2", "max_tokens": 2})
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "rate_limit_error"
            server.engine.start()
            assert first.result(timeout=60).choices[0].message.content == expected(loaded, PROMPTS[0], "full", 0.0, 4)
    finally:
        server.close()


@pytest.mark.parametrize("streamed", [False, True])
def test_a_client_that_hangs_up_is_cancelled_within_a_second(guarded, streamed):
    cancelled = guarded.metric("requests_cancelled_total")
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[4]}], "max_tokens": 450, "temperature": 0, "stream": streamed}
    auth = {"authorization": f"Bearer {KEY}"}
    if streamed:
        with httpx.stream("POST", guarded.url + "/v1/chat/completions", json=body, headers=auth) as response:
            next(line for line in response.iter_lines() if '"content": "w' in line)  # a token arrived: hang up
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(guarded.url + "/v1/chat/completions", json=body, headers=auth, timeout=0.3)
    gone = time.time()
    while time.time() < gone + 5 and guarded.metric("requests_cancelled_total") == cancelled:
        time.sleep(0.02)
    assert time.time() - gone < 1.0
    assert guarded.metric("running") == 0 and guarded.metric("kv_allocated_bytes") == 0
    assert guarded.metric("generated_tokens_total") > 0


def test_kept_prefixes_stay_within_their_limit(loaded):
    document = " ".join(f"w{(7 * i) % 120 + 5}" for i in range(150))
    engine = Engine(loaded, KVSettings(), prefill_chunk=32, prefix_memory=1)  # not even one fits
    got: list[Event] = []
    prompt = loaded.tokenizer(document)["input_ids"]
    engine.submit(Request(prompt, SamplingParams(2, temperature=0), KVSettings(), got.append))
    engine.start()
    deadline = time.time() + 60
    while time.time() < deadline and not (got and got[-1].finish_reason):
        time.sleep(0.01)
    engine.stop()
    assert got[-1].finish_reason == "length" and len(engine.prefixes) == 0
