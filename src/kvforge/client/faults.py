"""A catalogue of requests a careless or hostile client sends, with what a kvforge server must
answer to each: the fault-injection tests send every one while good requests run, and
`scripts/hostile.py` prints the same table measured on the default model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@dataclass(frozen=True)
class Fault:
    name: str
    status: int  # what the server must answer
    param: str | None = None  # the field its error must name (None: no field)
    body: dict | bytes | None = None  # JSON (merged over a good chat request), or raw bytes
    path: str = CHAT
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    authorized: bool = True  # send the server's API key
    bare: bool = False  # send `body` alone, not merged over a good request


def good_chat(model: str, text: str = "Say hello.", max_tokens: int = 8) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0}


def catalogue(context_window: int, max_body_bytes: int, max_messages: int = 1024) -> list[Fault]:
    """Every fault, for a server whose model has `context_window` tokens and whose limits are
    `max_body_bytes` and `max_messages` (with an API key and loopback Host names, as the tests
    start it)."""
    nan = b'{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "kv_policy": "knorm", "kv_ratio": NaN}'
    return [
        Fault("empty prompt (completions)", 400, "prompt", {"prompt": ""}, path=COMPLETIONS),
        Fault("empty messages", 400, "messages", {"messages": []}),
        Fault("max_tokens 0", 400, "max_tokens", {"max_tokens": 0}),
        Fault("max_tokens -5", 400, "max_tokens", {"max_tokens": -5}),
        Fault("max_tokens as a string", 400, "max_tokens", {"max_tokens": "8"}),
        Fault("kv_ratio 7 with policy full", 400, "kv_ratio", {"kv_ratio": 7}),
        Fault("kv_ratio 0.5 with policy full", 400, "kv_ratio", {"kv_policy": "full", "kv_ratio": 0.5}),
        Fault("kv_ratio as a string", 400, "kv_ratio", {"kv_policy": "knorm", "kv_ratio": "0.5"}),
        Fault("kv_ratio NaN", 400, "kv_ratio", nan),
        Fault("kv_ratio 1.5", 400, "kv_ratio", {"kv_policy": "knorm", "kv_ratio": 1.5}),
        Fault("unknown kv_policy", 400, "kv_policy", {"kv_policy": "nope"}),
        Fault("empty kv_policy", 400, "kv_policy", {"kv_policy": ""}),
        Fault("unknown kv_quant", 400, "kv_quant", {"kv_quant": "int3"}),
        Fault("seed 2^70", 400, "seed", {"seed": 2**70}),
        Fault("seed -1", 400, "seed", {"seed": -1}),
        Fault("temperature 3", 400, "temperature", {"temperature": 3}),
        Fault("temperature as a string", 400, "temperature", {"temperature": "hot"}),
        Fault("top_p 0", 400, "top_p", {"top_p": 0}),
        Fault("n 2", 400, "n", {"n": 2}),
        Fault("five stop strings", 400, "stop", {"stop": ["a", "b", "c", "d", "e"]}),
        Fault("stream as a string", 400, "stream", {"stream": "yes"}),
        Fault("unknown role", 400, "messages.0.role", {"messages": [{"role": "wizard", "content": "hi"}]}),
        Fault("messages not a list", 400, "messages", {"messages": "hi"}),
        Fault("too many messages", 400, "messages", {"messages": [{"role": "user", "content": "hi"}] * (max_messages + 1)}),
        Fault("prompt as token ids", 400, "prompt", {"prompt": [1, 2, 3]}, path=COMPLETIONS),
        Fault("unknown model", 404, "model", {"model": "gpt-4"}),
        Fault("prompt + max_tokens beyond the window", 400, "max_tokens", {"max_tokens": context_window}),
        Fault("kv_policy nesting 3000 wrappers", 400, "kv_policy", {"kv_policy": "chunk:" * 3000 + "knorm"}),
        Fault("a number of 5000 digits", 400, None, b'{"model": "MODEL", "messages": [], "max_tokens": ' + b"9" * 5000 + b"}", bare=True),
        Fault("JSON nested 20k deep", 400, None, b"[" * 20_000 + b"]" * 20_000, bare=True),
        Fault("huge prompt, just under the body limit", 400, "messages",
              {"messages": [{"role": "user", "content": "x " * ((max_body_bytes - 4096) // 2)}]}),  # fmt: skip
        Fault("malformed JSON", 400, None, b'{"model": ', bare=True),
        Fault("a JSON array", 400, None, b"[1, 2]", bare=True),
        Fault("not UTF-8", 400, None, b'{"model": "\xff\xfe"}', bare=True),
        Fault("body over the limit", 413, None, b"x" * (max_body_bytes + 1), bare=True),
        Fault("unknown route", 404, None, None, path="/v1/nothing", method="GET"),
        Fault("wrong method", 405, None, None, path=CHAT, method="GET"),
        Fault("no API key", 401, None, {}, authorized=False),
        Fault("foreign Host header (DNS rebinding)", 400, None, {}, headers={"host": "attacker.example"}),
    ]


def send(client: httpx.Client, url: str, fault: Fault, model: str, api_key: str | None) -> httpx.Response:
    """Send `fault` to the server at `url` as raw HTTP (the openai client would refuse most)."""
    headers = {"content-type": "application/json", **fault.headers}
    if fault.authorized and api_key:
        headers["authorization"] = f"Bearer {api_key}"
    if isinstance(fault.body, bytes):
        content = fault.body.replace(b"MODEL", model.encode())
    elif fault.body is None:
        content = None
    else:
        content = json.dumps(fault.body if fault.bare else {**good_chat(model), **fault.body}).encode()
    return client.request(fault.method, url + fault.path, content=content, headers=headers)


def problems(response: httpx.Response, fault: Fault) -> list[str]:
    """What is wrong with the server's answer to `fault` (empty: it is right)."""
    found = []
    if response.status_code != fault.status:
        found.append(f"status {response.status_code}, expected {fault.status}")
    try:
        error = response.json()["error"]
        assert {"message", "type", "param", "code"} <= set(error) and error["message"]
    except (ValueError, KeyError, TypeError, AssertionError):
        return found + [f"not an OpenAI error body: {response.text[:120]!r}"]
    if error["param"] != fault.param:
        found.append(f"param {error['param']!r}, expected {fault.param!r}")
    if any(leak in error["message"] for leak in ("Traceback", "/site-packages/", "/src/kvforge", "Error:")):
        found.append(f"internal detail in the message: {error['message'][:120]!r}")
    return found
