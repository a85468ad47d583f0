"""The OpenAI request shapes the server accepts, plus kvforge's per-request KV fields.

Unknown fields are ignored (OpenAI's own clients send more than a server needs); every known field
is checked strictly, type and range, whatever else the request says: a string is not a number, NaN
is not a ratio, 0 is not a token count. A value out of range raises a ValueError whose message
names the field, the value and the allowed range (the server turns it into a 400 with `param`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, field_validator

SEED_MAX = 2**63 - 1  # torch generators take 64-bit seeds; a signed bound keeps every backend happy
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4  # OpenAI's own limit


def outside(field: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{field}={value!r} is outside the allowed range {allowed}")


class KVFields(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1
    # kvforge's extension fields (the openai client sends them through `extra_body`)
    kv_policy: str | None = None
    kv_ratio: float | None = None
    kv_quant: str | None = None

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _tokens(cls, value: int | None, info) -> int | None:  # type: ignore[no-untyped-def]
        if value is not None and value < 1:
            raise outside(info.field_name, value, "[1, the model's context window]; ask for at least one token")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if not 0 <= value <= 2:
            raise outside("temperature", value, "[0, 2] (0: greedy)")
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise outside("top_p", value, "(0, 1]")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= SEED_MAX:
            raise outside("seed", value, "[0, 2^63 - 1]")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        listed = [value] if isinstance(value, str) else (value or [])
        if len(listed) > MAX_STOP or any(not s for s in listed):
            raise ValueError(f"stop takes at most {MAX_STOP} non-empty strings, got {value!r}")
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, value: dict | None) -> dict | None:
        usage = (value or {}).get("include_usage", False)
        if not isinstance(usage, bool):
            raise ValueError(f"stream_options.include_usage must be true or false, got {usage!r}")
        return value

    @field_validator("n")
    @classmethod
    def _n(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"n={value} is not supported; use n=1 (one completion per request)")
        return value

    @field_validator("kv_ratio")
    @classmethod
    def _ratio(cls, value: float | None) -> float | None:
        # allow_inf_nan=False refused NaN and infinities already; this is the range
        if value is not None and not 0 <= value < 1:
            raise outside("kv_ratio", value, "[0, 1) (0 keeps every entry, 0.75 keeps a quarter)")
        return value

    @field_validator("kv_policy", "kv_quant")
    @classmethod
    def _named(cls, value: str | None, info) -> str | None:  # type: ignore[no-untyped-def]
        if value is not None and not value.strip():
            raise ValueError(f"{info.field_name} is empty; name one (see `kvforge policies`) or leave it out")
        return value

    def new_tokens(self) -> int | None:
        """The requested number of new tokens (max_completion_tokens wins, as in OpenAI's API)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: str | list[dict] | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        if value not in ROLES:
            raise ValueError(f"role {value!r} is not one of {', '.join(ROLES)}")
        return value

    @field_validator("content")
    @classmethod
    def _content(cls, value: str | list[dict] | None) -> str | list[dict] | None:
        for i, part in enumerate(value if isinstance(value, list) else []):
            if part.get("kv_document") not in (None, False, True):
                raise ValueError(f"content part {i}: kv_document {part['kv_document']!r} must be true or false")
            if part.get("kv_document") and (part.get("type") != "text" or not isinstance(part.get("text"), str) or not part["text"].strip()):
                raise ValueError(f"content part {i}: a kv_document part is a text part with non-empty text")
        return value

    def text(self, document: str | None = None) -> str:
        """The message's text (content parts of type text joined); with `document`, each
        `kv_document` part is that marker instead of its text."""
        if isinstance(self.content, list):
            return "".join(
                document if document is not None and part.get("kv_document") else str(part.get("text", ""))
                for part in self.content
                if part.get("type") == "text"
            )
        return self.content or ""

    def documents(self) -> list[str]:
        """The text of each content part marked `"kv_document": true` (kvforge's extension: a
        document reused from the server's store wherever it sits in the prompt)."""
        return [part["text"] for part in self.content if part.get("kv_document")] if isinstance(self.content, list) else []


class ChatRequest(KVFields):
    messages: list[ChatMessage]

    @field_validator("messages")
    @classmethod
    def _messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("messages is empty; send at least one message")
        return value


class CompletionRequest(KVFields):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str]) -> str | list[str]:
        listed = [value] if isinstance(value, str) else value
        if len(listed) != 1:
            raise ValueError(f"prompt takes one string here (one completion per request), got {len(listed)}")
        if not listed[0]:
            raise ValueError("prompt is empty; send at least one character of text")
        return value

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]
