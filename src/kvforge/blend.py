"""Reusing stored documents anywhere in a prompt (CacheBlend, Yao et al., EuroSys 2025).

Retrieval-augmented prompts put several documents after a system prompt, in an order that
changes from one request to the next, so only the first could be a stored prefix. Here every
document is prefilled (and compressed) once on its own, from position 0, and kept in the store;
a prompt made of stored documents and literal text between them is then served by:

1. splicing: each document's held entries are appended after what precedes it, their positions
   shifted and their keys rotated by the shift (RoPE rotations compose: R(p + d) = R(d) R(p));
   literal text is fed through the model as usual;
2. selecting: the spliced tokens go through the first layers again, reading the whole prompt up
   to them; at `check_layer` their new values are compared with the held ones, and the `share`
   of tokens whose values moved most are the ones whose entries are wrong enough to matter
   (CacheBlend's "high KV deviation" tokens; the later layers are not run);
3. refreshing: those tokens run through every layer at their positions, reading everything that
   precedes them; their entries replace the held ones in the rows that held them, so a
   compressed document keeps its budget;
4. the question is fed and the answer generated as after any prefill.

With `share=1` every spliced token is refreshed and the cache is the one a full prefill of the
prompt leaves (up to float error); with `share=0` the documents are reused as they were stored.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvforge.cache import REFRESH, SELECT, Blend, KVCache, Selected, head_dim, held_at
from kvforge.generate import GenerationResult, feed, greedy, stop_ids
from kvforge.memory.kvmemory import shared_memory
from kvforge.models import LoadedModel
from kvforge.policies.base import Policy
from kvforge.spec import KVSpec
from kvforge.store import LocalStore, RedisStore
from kvforge.store.documents import cached_prefill

log = logging.getLogger(__name__)

DEFAULT_SHARE = 0.15  # CacheBlend recomputes about 15% of the reused tokens
CHECK_LAYER = 1  # the first layer whose K/V depend on the preceding text (layer 0's do not)
DOCUMENT_MARKER = "\x00KVFORGE_DOCUMENT\x00"  # where a document goes in a prompt's text


@dataclass
class BlendPrompt:
    """A prompt as segments of token ids, each tokenized on its own so a document's ids are the
    same wherever it sits. Documents are reused from the store; the last segment is literal
    (the question and the template's closing) and is fed after the refresh."""

    segments: list[list[int]]
    documents: list[bool]  # per segment: a stored document (True) or literal text

    @property
    def ids(self) -> list[int]:
        return [t for s in self.segments for t in s]

    def spans(self) -> list[tuple[int, int]]:
        """(start, end) of each document in `ids`."""
        spans, at = [], 0
        for segment, is_document in zip(self.segments, self.documents):
            if is_document:
                spans.append((at, at + len(segment)))
            at += len(segment)
        return spans


def check_share(share: float) -> None:
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"blend share {share} must be in [0, 1]: the fraction of reused tokens recomputed (--blend-share; CacheBlend uses 0.15)")


def document_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A document's tokens as a blended prompt holds them (and as it is stored): tokenized alone."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_blend_prompt(
    tokenizer: PreTrainedTokenizerBase, documents: list[str], question: str, chat: bool, answer_prefix: str = ""
) -> BlendPrompt:
    """Documents then the question as one user message (with `chat`), documents separated by a
    blank line: the same text `build_prompt` makes of the documents joined, in segments; the
    answer's start, if any, after the template's opening of the reply."""
    if not documents or not all(d.strip() for d in documents):
        raise ValueError("a blended prompt takes one non-empty document or more (--blend FILE, repeatable)")
    if not question.strip():
        raise ValueError("the question is empty: give a non-empty question")
    content = "\n\n".join([DOCUMENT_MARKER] * len(documents)) + f"\n\n{question}"
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    else:
        text = f"{content}\n"
    return split_documents(tokenizer, text + answer_prefix, documents)


def split_documents(tokenizer: PreTrainedTokenizerBase, text: str, documents: list[str]) -> BlendPrompt:
    """The segments of a prompt `text` holding DOCUMENT_MARKER where each of `documents` goes,
    in order: literal text and documents each tokenized alone (no empty segment)."""
    literal = text.split(DOCUMENT_MARKER)
    if len(literal) != len(documents) + 1:
        raise ValueError(f"the prompt names {len(literal) - 1} documents, {len(documents)} were given")
    segments: list[list[int]] = []
    kinds: list[bool] = []
    for piece, document in zip(literal, documents):
        if ids := document_ids(tokenizer, piece):
            segments.append(ids)
            kinds.append(False)
        segments.append(document_ids(tokenizer, document))
        kinds.append(True)
    segments.append(document_ids(tokenizer, literal[-1]))
    kinds.append(False)
    return BlendPrompt(segments, kinds)


class Rotation:
    """Moves keys held at positions p to p + shift: rotates each (even, odd) half pair by the
    model's RoPE angle of `shift` (the rotation of half-split RoPE: Llama, Qwen, Mistral...)."""

    def __init__(self, model: PreTrainedModel) -> None:
        rotary = getattr(model.get_decoder(), "rotary_emb", None)
        if rotary is None:
            raise ValueError(f"blending moves keys by their rotary angle; {type(model).__name__} has no rotary_emb to take it from")
        self.rotary = rotary
        self.scale = float(getattr(rotary, "attention_scaling", 1.0))

    def __call__(self, keys: torch.Tensor, shift: int) -> torch.Tensor:  # (..., head_dim) -> same
        position = torch.tensor([[shift]], device=keys.device)
        cos, sin = self.rotary(keys, position)  # (1, 1, head_dim), attention_scaling applied
        cos, sin = cos[0, 0].to(keys.dtype) / self.scale, sin[0, 0].to(keys.dtype) / self.scale
        half = keys.shape[-1] // 2
        rotated_half = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)
        return keys * cos + rotated_half * sin


def splice(cache: KVCache, document: KVCache, rotation: Rotation) -> None:
    """Append what `document` (one sequence prefilled alone from position 0) holds after what
    `cache` has seen, keys rotated to their new positions, each row keeping the entries the
    document's row kept (a compressed document stays compressed)."""
    shift, n = cache.get_seq_length(), document.get_seq_length()
    for layer, part in zip(cache.layers, document.layers):
        assert part.storage is not None, "splice() takes a document that was prefilled"
        keys, values, held = held_at(part.storage.view(), torch.arange(n, device=part.storage.device))
        positions = torch.arange(shift, shift + n, device=keys.device)
        layer.append_where(rotation(keys, shift), values, positions, held)
        layer.seen += n
        layer.chunks += 1
        assert layer.tokens is not None
        layer.tokens += n
        layer.seal(prompt=True)


def select(model: PreTrainedModel, cache: KVCache, ids: list[int], positions: torch.Tensor, share: float) -> torch.Tensor:
    """The positions (ascending) of the `share` of spliced tokens `ids` (at `positions`, (T,))
    whose values at CHECK_LAYER move most once the whole prompt before them is read."""
    count = math.ceil(share * len(ids))
    if count == 0:
        return positions[:0]
    if count >= len(ids):
        return positions
    blend = Blend(positions, check_layer=min(CHECK_LAYER, cache.num_layers - 1))
    try:
        cache.phase.mode, cache.phase.blend = SELECT, blend
        model(input_ids=torch.tensor([ids], device=model.device), position_ids=positions[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
    except Selected:
        pass
    finally:
        cache.phase.mode, cache.phase.blend = None, None
    assert blend.deviation is not None, "the check layer did not run"
    return positions[blend.deviation.topk(count).indices.sort().values]


def refresh(model: PreTrainedModel, cache: KVCache, ids: list[int], positions: torch.Tensor) -> None:
    """Compute the tokens `ids` at `positions` (T,) again through every layer, reading what
    precedes each, and put their entries in place of the held ones."""
    if not ids:
        return
    try:
        cache.phase.mode, cache.phase.blend = REFRESH, Blend(positions)
        model(input_ids=torch.tensor([ids], device=model.device), position_ids=positions[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
    finally:
        cache.phase.mode, cache.phase.blend = None, None


@dataclass
class Blended:
    cache: KVCache
    logits: torch.Tensor  # (1, vocab) after the prompt's last token
    stored: int  # documents found in the store (the others were prefilled now and stored)
    refreshed: int  # tokens recomputed
    seconds: dict[str, float]  # per step: load (store reads, or prefills), splice, text, select, refresh, question


class Stopwatch(dict[str, float]):
    """Seconds spent per named step, summed."""

    def __init__(self) -> None:
        super().__init__()
        self.last = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self[step] = self.get(step, 0.0) + now - self.last
        self.last = now


def blend_prefill(
    loaded: LoadedModel, policy: Policy, spec: KVSpec, prompt: BlendPrompt, store: LocalStore | RedisStore,
    share: float = DEFAULT_SHARE, chunk: int | None = None,
) -> Blended:  # fmt: skip
    """The cache of `prompt` with its documents reused from `store` (prefilled alone and stored
    first where missing) and `share` of their tokens refreshed; see the module's description."""
    check_share(share)
    if prompt.documents[-1]:
        raise ValueError("a blended prompt ends with literal text (the question), not a document")
    model = loaded.model
    memory = shared_memory(model.device, model.dtype, head_dim(model))
    cache = KVCache(model, policy, tokenizer=loaded.tokenizer, layout="paged", quant=spec.quant, memory=memory)
    clock = Stopwatch()
    stored, refreshed = blend(loaded, spec, cache, prompt.segments[:-1], prompt.documents[:-1], store, share, chunk, clock)
    logits, _ = feed(model, cache, [prompt.segments[-1]], torch.tensor([cache.get_seq_length()], device=model.device))
    clock.lap("question")
    log.debug("blend steps (s): %s", {k: round(v, 3) for k, v in clock.items()})
    return Blended(cache, logits, stored, refreshed, dict(clock))


def blend(
    loaded: LoadedModel, spec: KVSpec, cache: KVCache, segments: list[list[int]], documents: list[bool],
    store: LocalStore | RedisStore, share: float, chunk: int | None, clock: Stopwatch | None = None,
) -> tuple[int, int]:  # fmt: skip
    """Fill `cache` (new, paged over a memory, of `spec`'s policy and quantization) with
    `segments` in order: literal text fed, documents (`documents[i]`) spliced from `store` (each
    prefilled alone into the cache's memory and stored where missing), then `share` of what
    follows the first document refreshed. (Documents found in the store, tokens refreshed.)"""
    model, memory = loaded.model, cache.memory
    assert memory is not None, "blend() fills a paged cache over a memory"
    clock = clock if clock is not None else Stopwatch()
    rotation = Rotation(model)
    stored = 0
    reused_ids: list[int] = []
    reused_pos: list[torch.Tensor] = []
    first = None  # position of the first document: every token after it read text it did not see
    for segment, is_document in zip(segments, documents):
        start = cache.get_seq_length()
        if is_document:
            document, found = cached_prefill(store, loaded, cache.policy, spec, segment, chunk, memory)
            stored += found
            clock.lap("load")
            memory.reserve(document.nbytes // memory.block_nbytes + cache.num_layers)  # one growth, not one per layer
            splice(cache, document, rotation)
            clock.lap("splice")
            first = start if first is None else first
        else:
            feed(model, cache, [segment], torch.tensor([start], device=model.device))
            clock.lap("text")
        if first is not None:  # literal text between documents is refreshed like them
            reused_ids += segment
            reused_pos.append(torch.arange(start, start + len(segment), device=model.device))
    if first is None:
        return stored, 0
    positions = torch.cat(reused_pos)
    chosen = select(model, cache, reused_ids, positions, share)
    clock.lap("select")
    index = {p: i for i, p in enumerate(positions.tolist())}
    refresh(model, cache, [reused_ids[index[p]] for p in chosen.tolist()], chosen)
    clock.lap("refresh")
    return stored, len(chosen)


@torch.inference_mode()
def answer_blended(
    loaded: LoadedModel, prompt: BlendPrompt, policy: Policy, spec: KVSpec, store: LocalStore | RedisStore,
    max_new_tokens: int = 64, share: float = DEFAULT_SHARE, chunk: int | None = None,
) -> GenerationResult:  # fmt: skip
    """Generate greedily from a blended prompt (see `blend_prefill`)."""
    start = time.perf_counter()
    blended = blend_prefill(loaded, policy, spec, prompt, store, share, chunk)
    prefill_seconds = time.perf_counter() - start
    cache = blended.cache
    positions = torch.tensor([cache.get_seq_length()], device=loaded.model.device)
    new = greedy(loaded.model, cache, blended.logits, positions, max_new_tokens, stop_ids(loaded.tokenizer))[0]
    seconds = time.perf_counter() - start
    documents = sum(prompt.documents)
    log.info("blended %d documents (%d stored), %d tokens refreshed, %.2fs", documents, blended.stored, blended.refreshed, seconds)
    return GenerationResult(
        text=loaded.tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=len(prompt.ids), generated_tokens=len(new), policy=policy.full_name, ratio=policy.ratio,
        query_aware=False, cache_bytes=cache.nbytes, kept_bytes=cache.kept_nbytes, peak_cache_bytes=cache.peak_nbytes,
        dense_cache_bytes=cache.dense_nbytes, cache_meta_bytes=cache.meta_nbytes, quant=cache.quant.mode,
        bits_per_element=cache.bits_per_element, prefill_seconds=prefill_seconds, seconds=seconds,
        stored=blended.stored == documents, refreshed_tokens=blended.refreshed,
    )  # fmt: skip
