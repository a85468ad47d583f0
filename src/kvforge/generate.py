"""Answer a question about a long context with a compressed cache.

Question-agnostic (default): the context is prefilled and compressed before the question is
seen; the question is then appended uncompressed and the answer generated. This is how
long-context compression is evaluated: one compressed context must serve questions it has not
seen. Query-aware: the whole prompt, question included, is prefilled and compressed (the
setting of the SnapKV paper).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from kvforge.cache import APPEND, DECODE, PREFILL, PROBE, KVCache, Probe
from kvforge.models import LoadedModel
from kvforge.policies.base import Policy, Reconstruction
from kvforge.reconstruct import passes
from kvforge.storage import DEFAULT_LAYOUT, QuantSpec

if TYPE_CHECKING:
    from kvforge.spec import KVSpec
    from kvforge.store import LocalStore

log = logging.getLogger(__name__)


@dataclass
class Prompt:
    """Token ids of a prompt split where compression stops (question-agnostic setting)."""

    context_ids: list[int]  # compressed part: template header + context
    rest_ids: list[int]  # appended after compression: question, template footer, answer prefix

    @property
    def ids(self) -> list[int]:
        return self.context_ids + self.rest_ids


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    generated_tokens: int
    policy: str
    ratio: float
    query_aware: bool
    cache_bytes: int  # K/V bytes allocated at the end (spare capacity included), read from the tensors
    kept_bytes: int  # K/V bytes of the entries kept at the end: entries x entry size
    peak_cache_bytes: int  # the most K/V bytes allocated at once during the run
    dense_cache_bytes: int  # K/V bytes an uncompressed cache holds for the same tokens
    cache_meta_bytes: int  # positions, lengths, policy state held beside K/V
    quant: str  # how entries are held: none, int8, int4, int2, fp8
    bits_per_element: float  # effective: K/V bytes held (codes, scales, full-precision tail) x 8 / elements
    prefill_seconds: float
    seconds: float
    stored: bool | None = None  # with a store: whether the compressed context came from it
    refreshed_tokens: int | None = None  # blended prompts: reused tokens computed again (kvforge.blend)
    read_fraction: float | None = None  # of the entries held, what the decoding steps read (--quant .../centroid0.125)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def build_prompt(
    tokenizer: PreTrainedTokenizerBase,
    context: str,
    question: str,
    chat: bool,
    answer_prefix: str = "",
) -> Prompt:
    """Tokenize context and question as one user message (with `chat`), split at the question.

    Both parts are tokenized separately so the compressed part is exactly the same ids in
    both settings. An empty context leaves only the chat template's opening to compress (or,
    without one, the question's first token).
    """
    if not question.strip():
        raise ValueError("the question is empty: give a non-empty question")
    marker = "\x00KVFORGE_SPLIT\x00"
    before = f"{context}\n\n" if context.strip() else ""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{before}{marker}{question}"}],
            tokenize=False,
            add_generation_prompt=True,
        )
    else:
        text = f"{before}{marker}{question}\n"
    head, tail = text.split(marker)
    tail += answer_prefix
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    context_ids, rest_ids = encode(head), encode(tail)
    if not context_ids:  # a prefill needs at least one token
        context_ids, rest_ids = rest_ids[:1], rest_ids[1:]
    return Prompt(context_ids=context_ids, rest_ids=rest_ids)


def check_length(prompt_tokens: int, max_new_tokens: int, context_length: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if context_length and prompt_tokens + max_new_tokens > context_length:
        raise ValueError(
            f"the prompt is {prompt_tokens} tokens and {max_new_tokens} new tokens are asked, "
            f"but the model's context is {context_length} tokens; shorten the prompt or --max-new-tokens"
        )


def check_chunk(chunk: int | None) -> None:
    if chunk is not None and chunk < 1:
        raise ValueError(f"prefill_chunk={chunk} must be at least 1 token (--prefill-chunk), or unset for one-shot prefill")


def _feed_once(
    model: torch.nn.Module, cache: KVCache, rows: list[list[int]], positions: torch.Tensor, mode: str, keep: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed left-padded `rows` in one forward: (batch, keep, vocab) logits of the last `keep`
    positions, and the next positions."""
    device = model.device
    width = max(len(r) for r in rows)
    # Built on the host and copied once (one copy per step, not one per row).
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], dtype=torch.long).to(device)
    seen = cache.get_seq_length()
    cache.phase.mode = mode
    if all(len(r) == width for r in rows):
        # No padding in this chunk: no mask, so the attention knows it without reading the device.
        mask = None
        pos = positions.to(device)[:, None] + torch.arange(width, device=device)
        return _forward(model, cache, ids, mask, pos, keep), positions.to(device) + width
    valid = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows]).to(device)
    mask = torch.cat([torch.ones(len(rows), seen, dtype=torch.long, device=device), valid.long()], dim=1)
    pos = positions.to(device)[:, None] + (valid.cumsum(1) - 1).clamp(min=0)
    return _forward(model, cache, ids, mask, pos, keep), positions.to(device) + valid.sum(1)


def _forward(
    model: torch.nn.Module, cache: KVCache, ids: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor, keep: int = 1
) -> torch.Tensor:
    """(batch, keep, vocab) logits of each row's last `keep` positions."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=keep)
    return out.logits[:, -keep:]


def feed(
    model: torch.nn.Module,
    cache: KVCache,
    rows: list[list[int]],
    positions: torch.Tensor,  # (batch,) rotary position of each row's next token
    mode: str = APPEND,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed token rows (they may differ in length; each chunk is left-padded and the padding is
    not stored), `chunk` tokens per row at a time (None: all at once). `mode` says what the
    cache does with them (`Phase`); a prompt chunk (PREFILL) is compressed before the next one
    comes, also by policies that defer compression (`settle`). Returns (batch, vocab) logits of
    each row's last token and the next positions."""
    check_chunk(chunk)
    longest = max(len(r) for r in rows)
    step = chunk or max(longest, 1)
    logits: torch.Tensor | None = None
    for start in range(0, max(longest, 1), step):
        part = [r[start : start + step] for r in rows]
        out, positions = _feed_once(model, cache, part, positions, mode)
        out = out[:, -1]
        if mode == PREFILL:
            settle(model, cache, part, positions)
        # A row that ran out of tokens keeps the logits of its own last chunk.
        fed = torch.tensor([bool(p) for p in part], device=out.device)[:, None]
        logits = out if logits is None else torch.where(fed, out, logits)
    assert logits is not None
    return logits, positions


def feed_every(model: torch.nn.Module, cache: KVCache, rows: list[list[int]], positions: torch.Tensor) -> torch.Tensor:
    """Append token rows (at least one token in some row) in one forward and return the logits at
    every position: (batch, longest row, vocab), each row's tokens at the right end (left-padded)."""
    logits, _ = _feed_once(model, cache, rows, positions, APPEND, keep=max(len(r) for r in rows))
    return logits


def prefill(model: torch.nn.Module, cache: KVCache, ids: list[int], chunk: int | None = None) -> torch.Tensor:
    """Prefill one sequence's `ids`, compressing after every chunk of `chunk` tokens (None: one
    shot), so the cache never holds more than its budget plus one chunk. (vocab,) next-token logits."""
    logits, _ = feed(model, cache, [ids], torch.tensor([cache.get_seq_length()]), PREFILL, chunk)
    return logits[0]


def settle(
    model: torch.nn.Module,
    cache: KVCache,
    rows: list[list[int]],  # per sequence, the prompt ids just stored (they end at the cache's end)
    positions: torch.Tensor,  # (batch,) rotary position of each row's next token
    observed: dict | None = None,
) -> float:
    """Finish compressing prompt rows for a policy that defers it (nothing to do for the others):
    run its reconstruction passes, which store nothing, then compress every layer.

    `observed`, kept by the caller across policies derived from one base, lets policies that
    differ only in budget share the passes' scores (a sweep over ratios pays for them once).
    Returns the seconds the passes took when they were shared rather than run (0 otherwise), so
    a sweep can report every ratio's cost as if it had run them itself."""
    policy = cache.policy
    if not policy.defers:
        return 0.0
    spec = policy.reconstruction()
    skipped = 0.0
    if spec is not None:
        key = (policy.state_key(), "reconstruction")
        if observed is not None and key in observed:
            states, skipped = observed[key]
            for layer, state in zip(cache.layers, states):
                layer.storage.import_aux(state)
        else:
            start = time.perf_counter()
            reconstruct(model, cache, rows, positions, spec)
            if observed is not None:
                observed[key] = ([layer.storage.export_aux() for layer in cache.layers], time.perf_counter() - start)
    cache.compress()
    return skipped


def reconstruct(
    model: torch.nn.Module, cache: KVCache, rows: list[list[int]], positions: torch.Tensor, spec: Reconstruction
) -> None:
    """Run the passes that ask the model to repeat `rows` (KVzip); each raises the policy state
    of the entries of the piece it repeats. Nothing is stored: the cache is as long after."""
    if cache.tokenizer is None:
        raise ValueError(
            f"policy {cache.policy.full_name!r} asks the model to repeat the context and needs the tokenizer: "
            f"KVCache(model, policy, tokenizer=tokenizer)"
        )
    end = cache.get_seq_length()
    row_start = torch.tensor([end - len(r) for r in rows], device=model.device)
    for piece in passes(cache.tokenizer, spec, rows):
        start = row_start + torch.tensor(piece.starts, device=model.device)
        stop = row_start + torch.tensor(piece.ends, device=model.device)
        cache.phase.probe = Probe(start, stop, spec.sinks, spec.state, spec.score)
        try:
            feed(model, cache, piece.rows, positions, PROBE)
        finally:
            cache.phase.probe, cache.phase.mode = None, None


def greedy(
    model: torch.nn.Module,
    cache: KVCache,
    logits: torch.Tensor,  # (batch, vocab) next-token logits after each row's prompt
    positions: torch.Tensor,  # (batch,) rotary position of each row's next token
    max_new_tokens: int,
    stop_ids: set[int],
) -> list[list[int]]:
    """Greedy decoding of a batch, one token per row per step, on `cache`.

    A row that emitted a stop token is finished: it is fed no more real tokens, so its cache
    stops growing while the others go on."""
    tokens: list[list[int]] = [[] for _ in range(logits.shape[0])]
    finished = [False] * logits.shape[0]
    for step in range(max_new_tokens):
        chosen = logits.argmax(-1).tolist()
        for b, token in enumerate(chosen):
            if not finished[b]:
                tokens[b].append(token)
                finished[b] = token in stop_ids
        if all(finished) or step == max_new_tokens - 1:
            return tokens
        logits, positions = feed(model, cache, [[] if f else [t] for f, t in zip(finished, chosen)], positions, DECODE)
    return tokens


def stop_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return ids | {i for i in (tokenizer.convert_tokens_to_ids("<|im_end|>"),) if isinstance(i, int) and i != tokenizer.unk_token_id}


@torch.inference_mode()
def answer(
    loaded: LoadedModel,
    prompt: Prompt,
    policy: Policy,
    max_new_tokens: int = 64,
    query_aware: bool = False,
    prefill_chunk: int | None = None,
    layout: str = DEFAULT_LAYOUT,
    quant: QuantSpec | None = None,
    store: LocalStore | None = None,
    spec: KVSpec | None = None,
) -> GenerationResult:
    """Generate greedily from `prompt` with a cache compressed by `policy`.

    Question-agnostic: the context is prefilled and compressed, then the rest is fed. Query-aware:
    the whole prompt is prefilled and compressed. Either way the first new token comes from the
    prefill's own logits, as compression happens after each layer's attention. `prefill_chunk`
    prefills (and compresses) that many tokens at a time. With a `store` (and the `spec` that
    names `policy` and `quant`), the compressed context is taken from it when it holds it, else
    prefilled and kept there (the paged layout, whatever `layout` says).
    """
    model, tokenizer = loaded.model, loaded.tokenizer
    check_length(len(prompt.ids), max_new_tokens, loaded.context_length)
    check_chunk(prefill_chunk)
    start = time.perf_counter()
    compressed = prompt.ids if query_aware else prompt.context_ids
    stored = None
    if store is not None:
        from kvforge.store.documents import cached_prefill

        if query_aware or spec is None:
            raise ValueError("--store keeps a question-agnostic prefill of the context: drop --query-aware")
        cache, stored = cached_prefill(store, loaded, policy, spec, compressed, prefill_chunk)
        logits = None
    else:
        cache = KVCache(model, policy, layout=layout, tokenizer=tokenizer, quant=quant)
        logits = prefill(model, cache, compressed, prefill_chunk)[None]  # (1, vocab)
    positions = torch.tensor([len(compressed)], device=model.device)
    prefill_seconds = time.perf_counter() - start
    if not query_aware:
        logits, positions = feed(model, cache, [prompt.rest_ids], positions)
    new = greedy(model, cache, logits, positions, max_new_tokens, stop_ids(tokenizer))[0]
    seconds = time.perf_counter() - start
    text = tokenizer.decode(new, skip_special_tokens=True)
    log.info("%s ratio %.3g: %d prompt tokens, %d generated, %.2fs", policy.written_name, policy.ratio, len(prompt.ids), len(new), seconds)
    return GenerationResult(
        text=text,
        prompt_tokens=len(prompt.ids),
        generated_tokens=len(new),
        policy=policy.written_name,
        ratio=policy.ratio,
        query_aware=query_aware,
        cache_bytes=cache.nbytes,
        kept_bytes=cache.kept_nbytes,
        peak_cache_bytes=cache.peak_nbytes,
        dense_cache_bytes=cache.dense_nbytes,
        cache_meta_bytes=cache.meta_nbytes,
        quant=cache.quant.label,
        bits_per_element=cache.bits_per_element,
        prefill_seconds=prefill_seconds,
        seconds=seconds,
        stored=stored,
        read_fraction=None if (read := cache.seq_read_fraction()) is None else float(read[0]),
    )
