"""A real server on a free loopback port, driven by the official openai client (tiny model)."""

from __future__ import annotations

import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn

from kvforge.engine import Engine, KVSettings, Request, SamplingParams
from kvforge.generate import DECODE, feed, prefill, stop_ids
from kvforge.models import load_model
from kvforge.spec import KVSpec
from kvforge.storage import QuantSpec
from kvforge.server.app import create_app
from kvforge.server.limits import ServerLimits
from kvforge import KVCache

PROMPTS = [f"w{i} w{i + 3} w{i + 7} w{2 * i + 1} " * 6 for i in range(10)]


class Served:
    def __init__(
        self, loaded, kv_memory: int | None = None, limits: ServerLimits | None = None, start: bool = True,
        defaults: KVSettings | None = None, **engine_options,
    ) -> None:  # fmt: skip
        self.loaded, self.limits = loaded, limits or ServerLimits()
        self.engine = Engine(loaded, defaults or KVSettings(), kv_memory, prefill_chunk=32, **engine_options)
        if start:
            self.engine.start()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = create_app(self.engine, "tiny", limits=self.limits)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = self.limits.api_key or "none"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key, max_retries=0)

    def app_state(self):
        return self.app.state.kv

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.engine.stop()

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics", headers={"authorization": f"Bearer {self.api_key}"}).text.splitlines():
            if line.startswith(f"kvforge_{name} "):
                return float(line.split()[1])
        raise KeyError(name)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_model(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def served(loaded):
    server = Served(loaded)
    yield server
    server.close()


def template(loaded, text: str) -> list[int]:
    """The token ids of the chat prompt of `text`."""
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def expected(loaded, text: str, policy: str, ratio: float, max_tokens: int, quant: str | None = None) -> str:
    """What greedy decoding with kvforge's own loop gives for the chat prompt of `text`."""
    return greedy(loaded, template(loaded, text), policy, ratio, max_tokens, quant)


def greedy(
    loaded, ids: list[int], policy: str, ratio: float, max_tokens: int, quant: str | None = None, layout: str = "inplace"
) -> str:
    """What greedy decoding with kvforge's own loop gives for the prompt `ids` (chunks of 32)."""
    tok = loaded.tokenizer
    made = KVSpec.named(policy, 0.0 if policy == "full" else ratio).build()
    with torch.inference_mode():
        cache = KVCache(loaded.model, made, tokenizer=tok, quant=quant, layout=layout)
        logits = prefill(loaded.model, cache, list(ids), chunk=32)[None]
        positions, out, stops = torch.tensor([len(ids)]), [], stop_ids(tok)
        for _ in range(max_tokens):
            token = int(logits[0].argmax())
            if token in stops:
                break
            out.append(token)
            logits, positions = feed(loaded.model, cache, [[token]], positions, DECODE)
    return tok.decode(out, skip_special_tokens=True)


def chat(served: Served, text: str, **kw):
    kw = {"temperature": 0, "max_tokens": 8, **kw}
    return served.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], **kw)


def test_chat_greedy_equals_kvforge_generation(served, loaded):
    reply = chat(served, PROMPTS[0], extra_body={"kv_policy": "knorm", "kv_ratio": 0.5})
    assert reply.choices[0].message.content == expected(loaded, PROMPTS[0], "knorm", 0.5, 8)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 8
    assert reply.usage.prompt_tokens > 20
    full = chat(served, PROMPTS[0])
    assert full.choices[0].message.content == expected(loaded, PROMPTS[0], "full", 0.0, 8)
    # A policy's parameters in brackets, as every command writes them.
    windowed = chat(served, PROMPTS[0], extra_body={"kv_policy": "snapkv[window=4]", "kv_ratio": 0.5})
    assert windowed.choices[0].message.content == expected(loaded, PROMPTS[0], "snapkv[window=4]", 0.5, 8)


def test_requests_without_a_policy_keep_the_servers_parameters(loaded):
    server = Served(loaded, defaults=KVSettings("snapkv", 0.5, params=(("window", 4),)))
    try:
        plain = chat(server, PROMPTS[2])
        assert plain.choices[0].message.content == expected(loaded, PROMPTS[2], "snapkv[window=4]", 0.5, 8)
        rated = chat(server, PROMPTS[2], extra_body={"kv_ratio": 0.75})  # only the ratio changes
        assert rated.choices[0].message.content == expected(loaded, PROMPTS[2], "snapkv[window=4]", 0.75, 8)
    finally:
        server.close()


def test_streaming_and_completions(served, loaded):
    whole = chat(served, PROMPTS[1]).choices[0].message.content
    pieces, reasons = [], []
    for chunk in chat(served, PROMPTS[1], stream=True):
        pieces.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == whole and reasons[-1] == "length"
    done = served.client.completions.create(model="tiny", prompt=PROMPTS[2], temperature=0, max_tokens=5)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 5
    streamed = served.client.completions.create(model="tiny", prompt=PROMPTS[2], temperature=0, max_tokens=5, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text


def test_concurrent_requests_are_all_answered_correctly(served, loaded):
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda t: chat(served, t, extra_body={"kv_policy": "streaming", "kv_ratio": 0.5}), PROMPTS[:8]))
    for text, reply in zip(PROMPTS, replies):
        assert reply.choices[0].message.content == expected(loaded, text, "streaming", 0.5, 8)
    assert served.metric("generated_tokens_total") >= 64
    assert served.metric("peak_running") >= 2  # they were decoded together
    assert served.metric("running") == 0 and served.metric("kv_allocated_bytes") == 0


def test_bad_requests_get_4xx_and_the_server_goes_on(served, loaded):
    cases = [
        (dict(model="gpt-4"), openai.NotFoundError, "not served here"),
        (dict(extra_body={"kv_policy": "nope"}), openai.BadRequestError, "unknown policy 'nope'"),
        (dict(extra_body={"kv_policy": "snapkv[windw=4]"}), openai.BadRequestError, "has no parameter 'windw'"),
        (dict(extra_body={"kv_policy": "knorm", "kv_ratio": 1.5}), openai.BadRequestError, "ratio"),
        (dict(extra_body={"kv_quant": "int3"}), openai.BadRequestError, "--quant"),
        (dict(extra_body={"kv_quant": "int4/r8"}), openai.BadRequestError, "takes a mode and a group here"),
        (dict(max_tokens=500), openai.BadRequestError, "context window of 512"),
        (dict(temperature=3.0), openai.BadRequestError, "temperature"),
        (dict(n=2), openai.BadRequestError, "n=2"),
    ]
    for kwargs, error, text in cases:
        model = kwargs.pop("model", "tiny")
        with pytest.raises(error) as caught:
            served.client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": PROMPTS[3]}], max_tokens=kwargs.pop("max_tokens", 4), **kwargs
            )
        assert text in caught.value.body["message"]  # type: ignore[index]
    broken = httpx.post(served.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "error" in broken.json()
    assert chat(served, PROMPTS[3]).choices[0].message.content == expected(loaded, PROMPTS[3], "full", 0.0, 8)


def test_a_disconnected_client_frees_its_memory(served):
    with httpx.stream(
        "POST", served.url + "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[4]}], "max_tokens": 400, "stream": True, "temperature": 0},
    ) as response:  # fmt: skip
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content": "w' in line:
                break  # a token arrived: hang up
    deadline = time.time() + 10
    while time.time() < deadline and (served.metric("running") or served.metric("kv_allocated_bytes")):
        time.sleep(0.05)
    assert served.metric("running") == 0 and served.metric("kv_allocated_bytes") == 0
    assert served.metric("requests_cancelled_total") >= 1


def test_the_memory_budget_is_never_exceeded_while_requests_queue(served, loaded):
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[5]}], add_generation_prompt=True, tokenize=True, return_dict=False)
    one = served.engine.reservation(Request(list(ids), SamplingParams(8), KVSettings(), lambda _: None))
    budget = int(1.5 * one)  # room for one request at a time: the others wait
    limited = Served(loaded, kv_memory=budget)
    try:
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda t: chat(limited, t), PROMPTS[5:9]))
        assert [r.choices[0].message.content for r in replies] == [expected(loaded, t, "full", 0.0, 8) for t in PROMPTS[5:9]]
        assert 0 < limited.metric("kv_peak_bytes") <= budget
        assert limited.metric("kv_budget_bytes") == budget
    finally:
        limited.close()


def test_a_document_asked_again_reuses_its_compressed_prefix(served, loaded):
    document = " ".join(f"w{(7 * i) % 120 + 5}" for i in range(90))  # about three 32-token chunks
    settings = {"kv_policy": "knorm", "kv_ratio": 0.5}
    hits = served.metric("prefix_hits_total")
    first = chat(served, document + " w9 w10", extra_body=settings)
    again = chat(served, document + " w11 w12", extra_body=settings)
    assert served.metric("prefix_hits_total") == hits + 1 and served.metric("prefix_reused_tokens_total") >= 32
    assert served.metric("prefix_cache_entries") >= 1 and served.metric("prefix_cache_bytes") > 0
    # Exactly what prefilling the whole prompt again gives, chunk by chunk.
    assert first.choices[0].message.content == expected(loaded, document + " w9 w10", "knorm", 0.5, 8)
    assert again.choices[0].message.content == expected(loaded, document + " w11 w12", "knorm", 0.5, 8)


@pytest.mark.parametrize("settings", [{"kv_policy": "knorm", "kv_ratio": 0.5}, {"kv_policy": "knorm", "kv_ratio": 0.5, "kv_quant": "int4"}])
def test_a_restarted_server_starts_from_the_prefixes_it_stored(loaded, tmp_path, settings):
    from kvforge.store import LocalStore

    document = " ".join(f"w{(7 * i) % 120 + 5}" for i in range(90))  # about three 32-token chunks
    quant = QuantSpec(settings.get("kv_quant", "none"), group=8, residual=4)
    first = Served(loaded, store=LocalStore(tmp_path), defaults=KVSettings(quant=quant))
    try:
        answer = chat(first, document + " w9 w10", extra_body=settings)
    finally:
        first.close()  # the store's writer finishes first
    assert LocalStore(tmp_path).entries()
    second = Served(loaded, store=LocalStore(tmp_path), defaults=KVSettings(quant=quant))  # a new process would do the same
    try:
        again = chat(second, document + " w9 w10", extra_body=settings)
        other = chat(second, document + " w11 w12", extra_body=settings)
        # read once: the second question starts from what the first read, kept in memory
        assert second.metric("store_hits_total") == 1 and second.metric("store_corrupt_total") == 0
        assert second.metric("prefix_hits_total") == 2 and second.metric("store_read_bytes_total") > 0
    finally:
        second.close()
    kv_quant = quant if "kv_quant" in settings else None
    # Exactly what prefilling the whole prompt gives, chunk by chunk.
    assert again.choices[0].message.content == answer.choices[0].message.content
    assert other.choices[0].message.content == expected(loaded, document + " w11 w12", "knorm", 0.5, 8, kv_quant)


@pytest.mark.parametrize("kv", [KVSettings(), KVSettings("knorm", 0.5)], ids=["full", "knorm"])
def test_requests_admitted_together_read_a_stored_prefix_once(loaded, tmp_path, kv):
    from kvforge.store import LocalStore

    document = [5 + (7 * i) % 120 for i in range(100)]
    first = Engine(loaded, kv, prefill_chunk=32, store=LocalStore(tmp_path))
    first.start()
    done = threading.Event()
    first.submit(Request(document + [9, 10], SamplingParams(2), kv, deliver=lambda e: e.finish_reason and done.set()))
    done.wait(60)
    first.stop()  # its store writer finishes first
    second = Engine(loaded, kv, prefill_chunk=32, store=LocalStore(tmp_path))  # a restart
    finished: list[str] = []
    for question in ([11, 12], [13, 14], [15, 16]):  # queued before the engine starts: admitted in one turn
        second.submit(Request(document + question, SamplingParams(2), kv, deliver=lambda e: e.finish_reason and finished.append(e.finish_reason)))
    second.start()
    deadline = time.monotonic() + 60
    while len(finished) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    second.stop()
    assert finished == ["length"] * 3
    assert second.stored.store.stats.hits == 1 and second.stats.prefix_hits == 3  # the others share what it read


def test_shared_tokens_counts_the_common_beginning():
    from kvforge.engine.engine import shared_tokens

    a = list(range(100))
    assert shared_tokens(a, a[:70] + [-1] * 30, 32) == 70
    assert shared_tokens(a, a, 32) == 100 and shared_tokens(a, a[:5], 32) == 5
    assert shared_tokens(a, [-1] + a[1:], 32) == 0


@pytest.mark.parametrize("kv", [KVSettings(), KVSettings("knorm", 0.5)], ids=["full", "knorm"])
def test_questions_arriving_together_on_a_new_document_prefill_it_once(loaded, kv):
    document = [5 + (11 * i) % 120 for i in range(100)]  # three whole 32-token chunks and a bit
    questions = ([11, 12], [13, 14], [15, 16])
    engine = Engine(loaded, kv, prefill_chunk=32)
    answers: dict[int, list[str]] = {i: [] for i in range(3)}
    for i, question in enumerate(questions):  # queued before the engine starts: all waiting at once
        engine.submit(Request(document + question, SamplingParams(4, temperature=0.0), kv, deliver=lambda e, i=i: answers[i].append(e.text) if e.text else None))
    engine.start()
    deadline = time.monotonic() + 60
    while engine.stats.completed < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    engine.stop()
    # the first computes the document; the others start from what it computed (its three chunks'
    # blocks, or the prefix it kept at its boundary) and prefill only the rest
    reused = 96 if kv.prefix_stable else engine.prefixes.boundary(len(document) + 2)
    assert (engine.stats.prefix_hits, engine.stats.prefix_reused_tokens) == (2, 2 * reused)
    for i, question in enumerate(questions):
        assert "".join(answers[i]) == greedy(loaded, document + question, kv.policy, kv.ratio, 4)


def test_the_server_counts_store_reads_and_writes_per_tier(loaded, tmp_path):
    from kvforge.store import LocalStore, MemoryStore, TieredStore

    document = " ".join(f"w{(5 * i) % 118 + 5}" for i in range(100))  # a 64-token prefix kept
    settings = {"kv_policy": "knorm", "kv_ratio": 0.5}
    first = Served(loaded, store=TieredStore(MemoryStore(2**30), LocalStore(tmp_path)))
    try:
        answer = chat(first, document + " w9 w10", extra_body=settings)
        deadline = time.monotonic() + 30  # the prefix is kept once the request is done, then written
        while (written := tier_counters(first)).get(("bytes_written", "disk"), 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        first.close()
    assert written["bytes_written", "cpu"] == written["bytes_written", "disk"] > 0
    second = Served(loaded, store=TieredStore(MemoryStore(2**30), LocalStore(tmp_path)))  # restarted: memory tier empty
    try:
        again = chat(second, document + " w9 w10", extra_body=settings)
        read = tier_counters(second)
        assert second.metric("store_hits_total") == 1
    finally:
        second.close()
    assert (read["misses", "cpu"], read["hits", "disk"]) == (1, 1) and read["bytes_read", "disk"] > 0
    assert again.choices[0].message.content == answer.choices[0].message.content


def test_documents_marked_in_a_chat_are_reused_from_the_store_wherever_they_sit(loaded, tmp_path):
    from kvforge.store import LocalStore

    docs = [" ".join(f"w{(3 * i + 40 * k) % 118 + 5}" for i in range(40)) for k in range(2)]

    def ask(served: Served, order: list[int]):  # type: ignore[no-untyped-def]
        parts = []
        for k in order:
            parts += [{"type": "text", "text": docs[k], "kv_document": True}, {"type": "text", "text": " "}]
        parts.append({"type": "text", "text": "w9 w10"})
        return served.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}], temperature=0, max_tokens=8)

    # Every reused token refreshed: exactly the cache a prefill of the whole prompt leaves.
    served = Served(loaded, store=LocalStore(tmp_path), blend_share=1.0)
    try:
        first = ask(served, [0, 1])  # neither stored: each prefilled alone, stored, then blended
        assert served.metric("store_blended_requests_total") == 1 and served.metric("store_blended_documents_found_total") == 0
        swapped = ask(served, [1, 0])  # both found, at other positions
        assert served.metric("store_blended_requests_total") == 2 and served.metric("store_blended_documents_found_total") == 2
        assert served.metric("store_blend_refreshed_tokens_total") == 2 * 80
    finally:
        served.close()
    assert first.choices[0].message.content == expected(loaded, f"{docs[0]} {docs[1]} w9 w10", "full", 0.0, 8)
    assert swapped.choices[0].message.content == expected(loaded, f"{docs[1]} {docs[0]} w9 w10", "full", 0.0, 8)
    plain = Served(loaded)  # no store: nothing to reuse them from
    try:
        with pytest.raises(openai.BadRequestError, match="kv_document parts are reused from the server's store"):
            ask(plain, [0])
    finally:
        plain.close()


def tier_counters(served: Served) -> dict[tuple[str, str], float]:
    """{(counter, tier): value} of the kvforge_store_tier_* lines of /metrics."""
    text = httpx.get(served.url + "/metrics", headers={"authorization": f"Bearer {served.api_key}"}).text
    found = re.findall(r'^kvforge_store_tier_(\w+)_total\{tier="(\w+)"\} (\d+)$', text, re.MULTILINE)
    return {(name, tier): float(value) for name, tier, value in found}


def test_a_damaged_store_entry_is_a_miss_for_the_server(loaded, tmp_path):
    from kvforge.store import LocalStore

    document = " ".join(f"w{(7 * i) % 120 + 5}" for i in range(90))
    first = Served(loaded, store=LocalStore(tmp_path))
    try:
        chat(first, document + " w9 w10")
    finally:
        first.close()
    for path in (tmp_path / "entries").rglob("*.kvf"):
        data = path.read_bytes()
        path.write_bytes(data[:500] + bytes([data[500] ^ 0xFF]) + data[501:])
    second = Served(loaded, store=LocalStore(tmp_path))
    try:
        reply = chat(second, document + " w9 w10")
        assert second.metric("store_corrupt_total") >= 1 and second.metric("store_hits_total") == 0
    finally:
        second.close()
    assert reply.choices[0].message.content == expected(loaded, document + " w9 w10", "full", 0.0, 8)


def test_two_servers_on_one_redis_share_what_either_prefilled(loaded, redis_server):
    from kvforge.store import RedisStore

    url, proc = redis_server
    document = " ".join(f"w{(5 * i) % 120 + 5}" for i in range(90))
    one, two = Served(loaded, store=RedisStore(url)), Served(loaded, store=RedisStore(url))
    try:
        first = chat(one, document + " w9 w10")
        one.engine.stored.writer.submit(lambda: None).result()  # what it queued for the store is written
        second = chat(two, document + " w11 w12")
        assert two.metric("store_hits_total") == 1 and two.metric("prefix_hits_total") == 1
        proc.terminate()  # the store goes away mid-run: the server goes on without it
        proc.wait()
        third = chat(two, " ".join(f"w{(3 * i) % 120 + 5}" for i in range(90)) + " w9")
        assert third.choices[0].finish_reason in ("stop", "length")
    finally:
        one.close()
        two.close()
    assert first.choices[0].message.content == expected(loaded, document + " w9 w10", "full", 0.0, 8)
    assert second.choices[0].message.content == expected(loaded, document + " w11 w12", "full", 0.0, 8)


def test_loadtest_drives_the_server(served, loaded):
    from kvforge.client.loadtest import loadtest, synthetic_prompts, task_prompts

    prompts = synthetic_prompts(6, 20, None)
    report = loadtest(served.url, "tiny", prompts, clients=3, max_tokens=4)
    assert report.errors == 0 and report.requests == 6 and report.completion_tokens > 0
    assert report.ttft_p50 is not None and report.latency_p90 >= report.latency_p50 > 0
    assert report.peak_kv_bytes > 0
    prompts, cases = task_prompts(loaded.tokenizer, "niah_single", 2, 200)
    scored = loadtest(served.url, "tiny", prompts, clients=2, max_tokens=8, cases=cases)
    assert scored.score is not None and 0 <= scored.score <= 100 and scored.errors == 0
    bad = loadtest(served.url, "gpt-4", prompts[:2], clients=2, max_tokens=4)
    assert bad.errors == 2 and "not served here" in bad.error_examples[0]


def test_sampling_stop_strings_and_models(served, loaded):
    def sampled(seed: int) -> str:
        return chat(served, PROMPTS[6], temperature=1.0, top_p=0.9, seed=seed, max_tokens=12).choices[0].message.content

    assert sampled(1) == sampled(1)  # a seed reproduces a completion
    assert len({sampled(s) for s in range(2, 6)}) > 1
    greedy = expected(loaded, PROMPTS[6], "full", 0.0, 8)
    words = greedy.split()
    assert len(words) >= 3
    cut = chat(served, PROMPTS[6], stop=[words[2]])
    assert cut.choices[0].finish_reason == "stop" and words[2] not in cut.choices[0].message.content
    assert greedy.startswith(cut.choices[0].message.content)
    assert [m.id for m in served.client.models.list().data] == ["tiny"]
    assert httpx.get(served.url + "/health").json()["status"] == "ok"


def test_a_pool_too_small_for_everyone_preempts_and_still_answers_everyone_exactly(served, loaded):
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[5]}], add_generation_prompt=True, tokenize=True, return_dict=False)
    one = served.engine.reservation(Request(list(ids), SamplingParams(48), KVSettings(), lambda _: None))
    limited = Served(loaded, kv_memory=int(1.2 * one))  # one request's whole life fits; four at once do not
    try:
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda t: chat(limited, t, max_tokens=48), PROMPTS[5:9]))
        assert [r.choices[0].message.content for r in replies] == [expected(loaded, t, "full", 0.0, 48) for t in PROMPTS[5:9]]
        assert limited.metric("requests_preempted_total") >= 1
        assert limited.metric("kv_peak_bytes") <= limited.metric("kv_pool_capacity_bytes") <= int(1.2 * one)
        assert limited.metric("kv_blocks_used") == 0 and limited.metric("kv_blocks_free") > 0
    finally:
        limited.close()


def test_quantized_requests_in_a_pool_too_small_for_everyone_take_turns_and_are_answered_exactly(served, loaded):
    spec = QuantSpec("int4", group=8, residual=4)  # the tiny model's head_dim is 16
    kv = KVSettings(quant=spec)
    one = served.engine.reservation(Request(template(loaded, PROMPTS[5]), SamplingParams(48), kv, lambda _: None))
    limited = Served(loaded, kv_memory=int(1.2 * one), defaults=kv)  # codes and tails share the one pool
    try:
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda t: chat(limited, t, max_tokens=48), PROMPTS[5:9]))
        assert [r.choices[0].message.content for r in replies] == [expected(loaded, t, "full", 0.0, 48, spec) for t in PROMPTS[5:9]]
        assert limited.metric("kv_peak_bytes") <= limited.metric("kv_pool_capacity_bytes") <= int(1.2 * one)
        assert limited.metric("kv_blocks_used") == 0 and limited.metric("kv_allocated_bytes") == 0
    finally:
        limited.close()


def test_a_prompt_sharing_only_some_blocks_reuses_them_and_answers_the_same(served, loaded):
    document = " ".join(f"w{(11 * i) % 120 + 5}" for i in range(160))
    hits, reused = served.metric("prefix_hits_total"), served.metric("prefix_reused_tokens_total")
    first = chat(served, document + " w9 w10")
    used = served.metric("kv_blocks_used")
    # Shares the first half of the document only: no kept prefix matches, whole blocks do.
    other_text = " ".join(document.split()[:100]) + " w77 w78 w79 w80"
    other = chat(served, other_text)
    assert served.metric("prefix_hits_total") == hits + 1
    gained = served.metric("prefix_reused_tokens_total") - reused
    ids = [template(loaded, t) for t in (document + " w9 w10", other_text)]
    shared = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    assert shared > 64 and gained == shared // 32 * 32  # every whole block of 32 shared tokens
    assert first.choices[0].message.content == expected(loaded, document + " w9 w10", "full", 0.0, 8)
    assert other.choices[0].message.content == expected(loaded, other_text, "full", 0.0, 8)
    assert served.metric("kv_blocks_used") == used  # the blocks found hold nothing new once it ends


def test_quantized_and_paged_requests_share_one_bounded_memory(served, loaded):
    ids = template(loaded, PROMPTS[5])
    one = served.engine.reservation(Request(list(ids), SamplingParams(16), KVSettings(), lambda _: None))
    # The tiny model's head_dim is 16: quantized groups of 8 channels, a short full-precision tail.
    limited = Served(loaded, kv_memory=int(2.5 * one), defaults=KVSettings(quant=QuantSpec("none", group=8, residual=4)))
    settings = [{}, {"kv_quant": "int4"}, {"kv_policy": "knorm", "kv_ratio": 0.5, "kv_quant": "int8"}, {"kv_quant": "int4/g4"}]
    try:
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda a: chat(limited, a[0], max_tokens=16, extra_body=a[1]), zip(PROMPTS[5:9], settings)))
        want = [
            expected(loaded, text, extra.get("kv_policy", "full"), extra.get("kv_ratio", 0.0), 16,
                     QuantSpec.parse(extra["kv_quant"], group=8, residual=4) if "kv_quant" in extra else None)
            for text, extra in zip(PROMPTS[5:9], settings)
        ]
        assert [r.choices[0].message.content for r in replies] == want
        # Quantized requests take blocks of the same pool as they go and hand them back when they end.
        assert limited.metric("kv_reserved_bytes") == 0 and limited.metric("kv_blocks_used") == 0
        assert limited.metric("kv_peak_bytes") <= limited.metric("kv_pool_capacity_bytes") <= int(2.5 * one)
    finally:
        limited.close()


def test_a_server_reading_a_quarter_of_each_rows_blocks_answers_as_kvforges_paged_loop(loaded):
    """Decoding steps read the chosen blocks of the server's memory, chosen by the blocks' key
    summaries, as `KVCache(layout="paged")` does (pages are the memory's blocks there too); the
    summaries count in --kv-memory."""
    budget = 2 * 2**20
    reading = Served(loaded, kv_memory=budget, defaults=KVSettings(quant=QuantSpec.parse("centroid0.25")))
    document = " ".join(f"w{(7 * i) % 120 + 5}" for i in range(150))
    texts = [document + " w9 w10", document + " w11 w12"]
    try:
        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda text: chat(reading, text, max_tokens=12), texts))
        want = [greedy(loaded, template(loaded, text), "full", 0.0, 12, "centroid0.25", layout="paged") for text in texts]
        assert [r.choices[0].message.content for r in replies] == want
        everything = [greedy(loaded, template(loaded, text), "full", 0.0, 12) for text in texts]
        assert want != everything  # reading a quarter changed what this random model says
        # The blocks' summaries live inside the memory's budget: fewer blocks, made room for them.
        memory = reading.engine.memory
        assert memory.store.summaries_nbytes > 0 and reading.metric("kv_pool_capacity_bytes") <= budget
        assert memory.pool.num_blocks == budget // (memory.block_nbytes + 16 * 4)  # head_dim 16: one float32 row
    finally:
        reading.close()
