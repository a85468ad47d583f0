"""From a request body to an engine request: parse, validate, apply the chat template, tokenize,
resolve the KV settings and check them against the engine. It is CPU work that grows with the
body (a 5 MB prompt takes seconds to tokenize), so the server runs it on worker threads, never on
the event loop. Every refusal is an `APIError` naming the field."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field as dataclass_field, replace
from typing import TypeVar

from jinja2.exceptions import TemplateError
from pydantic import BaseModel, ValidationError
from transformers import PreTrainedTokenizerBase

from kvforge.blend import DOCUMENT_MARKER, split_documents
from kvforge.engine import Engine, KVSettings, Request, SamplingParams
from kvforge.server.errors import APIError
from kvforge.server.limits import ServerLimits
from kvforge.server.schemas import ChatRequest, CompletionRequest, KVFields
from kvforge.storage import QuantSpec

DEFAULT_MAX_TOKENS = 256
MAX_WRAPPERS = 4  # policies wrapped around a policy in one kv_policy name
M = TypeVar("M", bound=BaseModel)


def load(raw: bytes) -> dict:
    """The body as a JSON object, or a 400 saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise APIError(400, f"the request body is not UTF-8 (byte {err.start}); send JSON encoded as UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise APIError(400, f"the request body is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except (ValueError, RecursionError) as err:  # a number of thousands of digits; nesting too deep
        what = "nested too deeply" if isinstance(err, RecursionError) else "holds a number too long to read"
        raise APIError(400, f"the request body is JSON that {what}; send a plain request object") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    return data


def validate(data: dict, schema: type[M]) -> M:
    """`data` as `schema`, or a 400 naming the first field that is wrong."""
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = field_path(first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        shown = message if where is None or where.split(".")[0] in message else f"{where}: {message}"
        raise APIError(400, shown, where) from None


def field_path(loc: tuple[int | str, ...]) -> str | None:
    """pydantic's error location as the field a client sent: ('messages', 0, 'role') ->
    'messages.0.role'; the union member pydantic tried is left out (('prompt', 'str') -> 'prompt')."""
    kept: list[str] = []
    for part in loc:
        # a name right after a list index is a field of an item; any other name after the
        # first is the union member pydantic tried
        if not kept or isinstance(part, int) or (kept[-1].isdigit()):
            kept.append(str(part))
    return ".".join(kept) or None


def requested_quant(base: QuantSpec, label: str) -> QuantSpec:
    """A request's kv_quant over the server's --quant: a mode and, optionally, its group
    (`int4`, `int4/g16`); the server's other quantization options stay."""
    asked = QuantSpec.parse(label, group=base.group)
    if asked.rank is not None or asked.read is not None:
        raise ValueError(f"--quant: {label!r} takes a mode and a group here (e.g. int4/g16); ranks and page reading are the server's --quant")
    return replace(base, mode=asked.mode, group=asked.group)


@dataclass
class Prompt:
    """A request body read, validated and tokenized: all that the tokenizer alone decides. It
    crosses processes (a replicated server tokenizes in front of its replicas), so it holds no
    engine state."""

    body: ChatRequest | CompletionRequest
    ids: list[int]  # [prompt tokens]
    field: str  # the body's field an error about the prompt names: "messages" or "prompt"
    documents: list[tuple[int, int]] = dataclass_field(default_factory=list)  # kv_document spans, ascending


class Prompter:
    """The tokenizer's part of preparing a request: parse, validate, name the model, apply the
    chat template, tokenize. `window`: the model's context length in tokens (None: unbounded)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, names: set[str], served_as: str, window: int | None, limits: ServerLimits) -> None:
        self.tokenizer, self.names, self.served_as, self.window, self.limits = tokenizer, names, served_as, window, limits
        # No token covers more characters than the longest vocabulary entry (byte-level entries
        # hold one character per byte), so a prompt of C characters has at least C / this many
        # tokens: if the tokenizer drops no characters (whitespace, say), which a round trip of a
        # probe text checks. Byte-level BPE tokenizers pass (SmolLM2's does; a word-level one does not).
        self.longest_token = max(len(t) for t in tokenizer.get_vocab())
        probe = "a  b\n\n\tc  \u00e9 \u65e5\u672c \U0001f642 x"
        ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
        self.keeps_every_char = tokenizer.decode(ids, skip_special_tokens=True) == probe

    def chat(self, raw: bytes) -> Prompt:
        data = load(raw)
        # Counted before validation: validating 100k messages holds the interpreter for 0.7 s.
        count = len(data["messages"]) if isinstance(data.get("messages"), list) else 0
        if count > self.limits.max_messages:
            raise APIError(400, f"{count} messages is over the limit of {self.limits.max_messages} (--max-messages)", "messages")
        body = validate(data, ChatRequest)
        self.check_model(body)
        documents = [d for m in body.messages for d in m.documents()]
        marker = DOCUMENT_MARKER if documents else None
        messages = [{"role": m.role, "content": m.text(marker)} for m in body.messages]
        self.check_length(sum(len(m.text()) for m in body.messages), "messages")
        try:
            if not documents:
                ids = list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
                return Prompt(body, ids, "messages")
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as err:  # raised by the template itself: its message is for the client
            raise APIError(400, f"messages do not fit the model's chat template: {err.message}", "messages") from None
        blended = split_documents(self.tokenizer, text, documents)
        return Prompt(body, blended.ids, "messages", blended.spans())

    def completion(self, raw: bytes) -> Prompt:
        body = validate(load(raw), CompletionRequest)
        self.check_model(body)
        self.check_length(len(body.text()), "prompt")
        return Prompt(body, self.tokenizer(body.text())["input_ids"], "prompt")

    def check_model(self, body: KVFields) -> None:
        if body.model not in self.names:
            raise APIError(404, f"model {body.model!r} is not served here; use {self.served_as!r}", "model", "model_not_found")

    def check_length(self, chars: int, field: str) -> None:
        """Refuse, before tokenizing it (seconds for megabytes), a prompt certain to be beyond the
        model's window."""
        at_least = math.ceil(chars / self.longest_token)
        if self.window is not None and self.keeps_every_char and at_least > self.window:
            raise APIError(
                400, f"the prompt has {chars} characters, so at least {at_least} tokens: more than the model's context "
                f"window of {self.window} tokens; shorten it", field, "context_length_exceeded",
            )  # fmt: skip


def serving_prompter(tokenizer: PreTrainedTokenizerBase, model: str, window: int, served_as: str, limits: ServerLimits) -> Prompter:
    """The prompter of a server of `model` (window in tokens, 0: unknown) answering to
    `served_as`, 'default' and the model's own name."""
    return Prompter(tokenizer, {served_as, "default", model}, served_as, window or None, limits)


def prompter_for(engine: Engine, served_as: str, limits: ServerLimits) -> Prompter:
    """`serving_prompter` of the engine's model."""
    loaded = engine.loaded
    return serving_prompter(loaded.tokenizer, loaded.name, loaded.context_length, served_as, limits)


class Preparer:
    """Builds checked engine requests for one engine, as the server's flags say: the prompter's
    work, then the engine's checks (KV settings, window, budget, calibration, the store)."""

    def __init__(self, engine: Engine, prompter: Prompter, default_ratio: float) -> None:
        self.engine, self.prompter, self.default_ratio = engine, prompter, default_ratio

    def chat(self, raw: bytes) -> tuple[ChatRequest, Request]:
        prompt = self.prompter.chat(raw)
        return prompt.body, self.request(prompt)  # type: ignore[return-value]

    def completion(self, raw: bytes) -> tuple[CompletionRequest, Request]:
        prompt = self.prompter.completion(raw)
        return prompt.body, self.request(prompt)  # type: ignore[return-value]

    def kv_settings(self, body: KVFields) -> KVSettings:
        """The request's KV settings over the server's defaults: a compressing kv_policy without
        kv_ratio takes the server's --ratio; a kv_ratio the policy would ignore is refused."""
        base = self.engine.defaults
        policy = body.kv_policy or base.name  # the server's parameters too (`snapkv[window=32]`)
        nested = policy.partition("[")[0].count(":")
        if nested > MAX_WRAPPERS:
            raise APIError(400, f"kv_policy nests {nested} wrappers; at most {MAX_WRAPPERS} (e.g. adakv:chunk:snapkv)", "kv_policy")
        if policy == "full" and body.kv_ratio:
            raise APIError(
                400, f"kv_ratio={body.kv_ratio!r} has no effect with kv_policy 'full', which keeps every entry; "
                "leave kv_ratio out, or name a compressing kv_policy (see `kvforge policies`)", "kv_ratio",
            )  # fmt: skip
        if body.kv_ratio is not None:
            ratio = body.kv_ratio
        else:
            ratio = base.ratio if body.kv_policy is None else self.default_ratio
        try:
            quant = base.quant if body.kv_quant is None else requested_quant(base.quant, body.kv_quant)
            quant.check_head_dim(self.engine.shape.head_dim)
        except ValueError as err:  # its message is the CLI's: say which field it means here
            raise APIError(400, f"kv_quant: {str(err).removeprefix('--quant: ')} (as the server's --quant)", "kv_quant") from None
        try:
            kv = KVSettings.named(policy, 0.0 if policy == "full" else ratio, quant)  # parameters in brackets too
            self.engine.policy(kv)
        except ValueError as err:
            raise APIError(400, str(err), "kv_policy") from None
        return kv

    def request(self, prompt: Prompt) -> Request:
        """The engine request for `prompt`, checked by the engine (window, budget, calibration)."""
        body = prompt.body
        if prompt.documents and self.engine.stored is None:
            raise APIError(400, "kv_document parts are reused from the server's store: start it with --store DIR|redis://...", "messages")
        kv = self.kv_settings(body)
        new_tokens = body.new_tokens()
        if new_tokens is None:  # not asked: the default, within what the window leaves
            window = self.engine.loaded.context_length
            new_tokens = DEFAULT_MAX_TOKENS if window is None else max(min(DEFAULT_MAX_TOKENS, window - len(prompt.ids)), 1)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = SamplingParams(new_tokens, body.temperature, body.top_p, body.seed, stop)
        request = Request(prompt.ids, params, kv, deliver=lambda _: None, documents=list(prompt.documents))
        try:
            self.engine.check(request)
        except ValueError as err:
            raise APIError(400, str(err), self.blamed(body, len(prompt.ids), new_tokens, prompt.field)) from None
        return request

    def blamed(self, body: KVFields, prompt_tokens: int, new_tokens: int, prompt_field: str) -> str | None:
        """The field an engine refusal names: beyond the window, max_tokens when the client asked
        for that many and the prompt alone fits, else the prompt; the other refusals (budget,
        calibration) say in words what is wrong."""
        window = self.engine.loaded.context_length
        if window is None or prompt_tokens + new_tokens <= window:
            return None
        return "max_tokens" if prompt_tokens < window and body.new_tokens() is not None else prompt_field
