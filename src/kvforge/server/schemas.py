"""The OpenAI request shapes the server accepts (unknown fields are ignored, as OpenAI's own
clients send more than a server needs), plus kvforge's per-request KV fields."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class KVFields(BaseModel):
    model_config = ConfigDict(extra="allow")

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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The message's text (content parts of type text joined)."""
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(KVFields):
    messages: list[ChatMessage]


class CompletionRequest(KVFields):
    prompt: str | list[str]
