"""`kvforge loadtest`: drive an OpenAI-compatible server with the official async client and
measure it: throughput, time to first token, latency percentiles, errors, and (from a kvforge
server's /metrics) the peak KV bytes. `hf_baseline` answers the same requests one at a time with
plain transformers `generate`, for comparison in the same run."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field

import httpx

from kvforge.eval import corpus
from kvforge.eval.tasks import Case, make_case, score

QUESTIONS = [
    "Summarise the text above in one sentence.",
    "What is the main topic of the text above?",
    "Name one technical term used in the text above.",
    "Which example does the text above give first?",
    "What would a newcomer find hardest in the text above?",
    "List two facts stated in the text above.",
    "What is the last point the text above makes?",
    "Give a title for the text above.",
]


@dataclass
class Outcome:
    ok: bool
    seconds: float = 0.0
    first_token_seconds: float | None = None
    completion_tokens: int = 0
    error: str = ""
    text: str = ""


@dataclass
class Report:
    requests: int
    clients: int
    seconds: float
    errors: int
    completion_tokens: int
    tokens_per_second: float
    requests_per_second: float
    ttft_first: float | None  # the first request's (with a --document, the one that cannot reuse a prefix)
    ttft_p50: float | None
    ttft_p90: float | None
    latency_p50: float | None
    latency_p90: float | None
    latency_p99: float | None
    peak_kv_bytes: float | None  # from /metrics (kvforge servers only)
    max_running: float | None
    error_examples: list[str] = field(default_factory=list)
    score: float | None = None  # mean 0-100 over eval cases sent as the requests (`task_prompts`)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def synthetic_prompts(count: int, words: int, document: str | None) -> list[str]:
    """`count` user messages: the document with a different question each, or distinct passages
    of about `words` words from the built-in corpus."""
    if document is not None:
        return [f"{document}\n\n{QUESTIONS[i % len(QUESTIONS)]}" for i in range(count)]
    text = " ".join(corpus.paragraphs()).split()
    out = []
    for i in range(count):
        start = (i * 97) % max(len(text) - words, 1)
        passage = " ".join((text * 2)[start : start + words])
        out.append(f"{passage}\n\n{QUESTIONS[i % len(QUESTIONS)]}")
    return out


def task_prompts(tokenizer, task: str, count: int, length: int) -> tuple[list[str], list[Case]]:  # type: ignore[no-untyped-def]
    """`count` cases of an eval task as chat messages (context, question and the answer's start in
    one user message: a chat API cannot begin the assistant's turn), and the cases to score."""
    cases = [make_case(tokenizer, task, length, seed=s) for s in range(count)]
    return [f"{c.context}\n\n{c.question} {c.answer_prefix}".strip() for c in cases], cases


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _one(client, model: str, prompt: str, max_tokens: int, extra: dict) -> Outcome:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    first, tokens, pieces = None, None, 0
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body=extra or None,
        )  # fmt: skip
        text = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first if first is not None else time.perf_counter() - start
                text.append(chunk.choices[0].delta.content)
                pieces += 1
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as err:  # every failure is counted and shown, none stops the run
        return Outcome(False, time.perf_counter() - start, error=f"{type(err).__name__}: {err}"[:200])
    # A server that sends no usage in its stream (llama-cpp-python's): count the streamed pieces,
    # one per token in its stream as in kvforge's.
    return Outcome(True, time.perf_counter() - start, first, pieces if tokens is None else tokens, text="".join(text))


async def _run(
    url: str, model: str, prompts: list[str], clients: int, max_tokens: int, extra: dict, api_key: str
) -> tuple[list[Outcome], float]:  # fmt: skip
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=600)
    gate = asyncio.Semaphore(clients)

    async def limited(prompt: str) -> Outcome:
        async with gate:
            return await _one(client, model, prompt, max_tokens, extra)

    start = time.perf_counter()
    outcomes = await asyncio.gather(*(limited(p) for p in prompts))
    return list(outcomes), time.perf_counter() - start


def kvforge_metric(url: str, name: str, api_key: str = "none") -> float | None:
    """A value of a kvforge server's /metrics (None for other servers)."""
    try:
        text = httpx.get(url.rstrip("/") + "/metrics", timeout=5, headers={"authorization": f"Bearer {api_key}"}).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith(f"kvforge_{name} "):
            return float(line.split()[1])
    return None


def loadtest(
    url: str, model: str, prompts: list[str], clients: int, max_tokens: int, extra: dict | None = None, cases: list[Case] | None = None,
    api_key: str = "none",
) -> Report:  # fmt: skip
    """`api_key`: what a server started with --api-key asks for (anything, for one without)."""
    if clients < 1 or not prompts:
        raise ValueError("--clients and --requests must be at least 1")
    outcomes, seconds = asyncio.run(_run(url, model, prompts, clients, max_tokens, extra or {}, api_key))
    done = [o for o in outcomes if o.ok]
    tokens = sum(o.completion_tokens for o in done)
    latencies = [o.seconds for o in done]
    ttfts = [o.first_token_seconds for o in done if o.first_token_seconds is not None]
    return Report(
        requests=len(prompts), clients=clients, seconds=seconds, errors=len(outcomes) - len(done),
        completion_tokens=tokens, tokens_per_second=tokens / seconds, requests_per_second=len(done) / seconds,
        ttft_first=outcomes[0].first_token_seconds, ttft_p50=percentile(ttfts, 0.5), ttft_p90=percentile(ttfts, 0.9),
        latency_p50=percentile(latencies, 0.5), latency_p90=percentile(latencies, 0.9), latency_p99=percentile(latencies, 0.99),
        peak_kv_bytes=kvforge_metric(url, "kv_peak_bytes", api_key), max_running=kvforge_metric(url, "peak_running", api_key),
        error_examples=sorted({o.error for o in outcomes if not o.ok})[:3],
        score=None if cases is None else sum(score(o.text, c) for o, c in zip(outcomes, cases)) / len(cases),
    )  # fmt: skip


def hf_baseline(model_name: str, prompts: list[str], max_tokens: int) -> Report:
    """The same requests answered one at a time by plain transformers `generate` (DynamicCache,
    SDPA attention, greedy), in this process."""
    import torch

    from kvforge.models import load_model

    loaded = load_model(model_name)
    model, tok = loaded.model, loaded.tokenizer
    model.set_attn_implementation("sdpa")
    latencies, tokens = [], 0
    start = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            began = time.perf_counter()
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
            tokens += out.shape[1] - ids["input_ids"].shape[1]
            latencies.append(time.perf_counter() - began)
    seconds = time.perf_counter() - start
    return Report(
        requests=len(prompts), clients=1, seconds=seconds, errors=0, completion_tokens=tokens,
        tokens_per_second=tokens / seconds, requests_per_second=len(prompts) / seconds, ttft_first=None, ttft_p50=None, ttft_p90=None,
        latency_p50=percentile(latencies, 0.5), latency_p90=percentile(latencies, 0.9), latency_p99=percentile(latencies, 0.99),
        peak_kv_bytes=None, max_running=1,
    )  # fmt: skip

