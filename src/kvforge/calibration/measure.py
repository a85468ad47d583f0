"""`kvforge calibrate`: measure once per model what razor, qfilters and kvzap need.

- Retrieval heads (Tang et al., RazorAttention, 2024): a random token sequence is fed twice; a
  head that retrieves pays attention, from each token of the second copy, to the same token in
  the first (echo) and to the token after it (induction). A KV head's score is the mean of that
  attention over the second copy, the most of its group's query heads, averaged over `repeats`
  sequences.
- Query directions (Godey et al., Q-Filters, 2025): queries of a head lie mostly along one
  direction; it is the first right singular vector of the head's queries (its GQA group's, stacked)
  on documentation prose, signed so that queries project positively on it.
- KVzap (Jegou et al., 2025): KVzip's scores of entries of generated contexts (prose with planted
  needles), and per layer and KV head a ridge regression from features of each entry (`kvzap
  features`) to their logarithm; the fit is checked on a context it was not fitted on.

Everything is seeded and runs on CPU in float32, so two runs give the same file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from kvforge.cache import KVCache
from kvforge.calibration import Calibration, calibration_path, find_calibration, fingerprint, remember
from kvforge.eval import corpus
from kvforge.eval.tasks import make_case
from kvforge.generate import build_prompt, prefill
from kvforge.models import LoadedModel
from kvforge.policies import make_policy
from kvforge.policies.kvzap import kvzap_features

if TYPE_CHECKING:
    from kvforge.calibration.lowrank import Bases

log = logging.getLogger(__name__)


def recorded_prefill(loaded: LoadedModel, ids: list[int], policy: str = "full") -> KVCache:
    """A cache holding `ids`, each layer's prefill queries recorded (policy `full`), or scored
    by another uncompressing policy (kvzip at ratio 0)."""
    made = make_policy(policy, ratio=0.0)
    cache = KVCache(loaded.model, made, record_prefill=policy == "full", tokenizer=loaded.tokenizer)
    with torch.inference_mode():
        prefill(loaded.model, cache, ids)
    return cache


def retrieval_scores(loaded: LoadedModel, length: int = 256, repeats: int = 3) -> torch.Tensor:
    """(layers, kv_heads) echo + induction attention on a random sequence seen twice."""
    vocab = loaded.model.config.get_text_config().vocab_size
    total: torch.Tensor | None = None
    for seed in range(repeats):
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(vocab // 4, vocab, (length,), generator=gen).tolist()
        cache = recorded_prefill(loaded, tokens + tokens)
        scores = []
        for layer in cache.layers:
            record = layer.prefill_record
            assert record is not None and layer.storage is not None
            q, k = record.query[0].float(), layer.storage.view().keys[0].float()  # (Hq, 2L, D), (Hkv, 2L, D)
            group = q.shape[0] // k.shape[0]
            logits = torch.einsum("hqd,hkd->hqk", q[:, length:] * record.scaling, k.repeat_interleave(group, 0))
            future = torch.arange(2 * length)[None, :] > torch.arange(length, 2 * length)[:, None]
            probs = logits.masked_fill(future, float("-inf")).softmax(-1)  # (Hq, L, 2L)
            rows = torch.arange(length)
            echo = probs[:, rows, rows]
            induction = probs[:, rows[:-1], rows[:-1] + 1]  # query L+i reads the token after r_i's first copy
            score = echo.mean(-1) + induction.mean(-1)  # (Hq,)
            scores.append(score.view(k.shape[0], group).amax(-1))
        stacked = torch.stack(scores)
        total = stacked if total is None else total + stacked
    assert total is not None
    return total / repeats


def calibration_text(loaded: LoadedModel, tokens: int) -> list[int]:
    text = " ".join(corpus.paragraphs()[::7])
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]


def query_directions(loaded: LoadedModel, tokens: int = 1024) -> torch.Tensor:
    """(layers, kv_heads, head_dim) unit main direction of each KV head's group of queries."""
    cache = recorded_prefill(loaded, calibration_text(loaded, tokens))
    out = []
    for layer in cache.layers:
        assert layer.prefill_record is not None and layer.storage is not None
        q = layer.prefill_record.query[0].float()  # (Hq, T, D)
        kv_heads = layer.storage.kv_heads
        per_head = q.reshape(kv_heads, -1, q.shape[-1])  # (Hkv, group * T, D)
        directions = []
        for queries in per_head:
            u = torch.linalg.svd(queries.double(), full_matrices=False).Vh[0].float()
            directions.append(u if float((queries @ u).mean()) >= 0 else -u)
        out.append(torch.stack(directions))
    return torch.stack(out)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (x.argsort().argsort().double() for x in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


# Calibration contexts for kvzap, as fractions of the longest: the surrogate reads keys after
# rotary embedding, so it must have seen the positions it will score (fitted on 768 tokens only,
# it starved whole layers at 4096). The last context is held out of the fit.
KVZAP_LENGTHS = (0.25, 1.0, 0.5, 0.75)


def kvzap_weights(loaded: LoadedModel, longest: int = 4096, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """((layers, kv_heads, features) ridge weights, (layers,) Spearman correlation on the last
    context, which is held out of the fit). Contexts of KVZAP_LENGTHS x `longest` tokens."""
    features: list[list[torch.Tensor]] = []  # [context][layer] (kv_heads, T, F)
    targets: list[list[torch.Tensor]] = []  # [context][layer] (kv_heads, T)
    for i, fraction in enumerate(KVZAP_LENGTHS):
        length = max(int(longest * fraction), min(256, longest))  # a task prompt needs ~100 tokens
        case = make_case(loaded.tokenizer, "niah_prose", length, seed=10**9 + i, chat=loaded.is_instruct)
        prompt = build_prompt(loaded.tokenizer, case.context, case.question, loaded.is_instruct)
        cache = recorded_prefill(loaded, prompt.context_ids, "kvzip")
        feats, ys = [], []
        for layer in cache.layers:
            assert layer.storage is not None
            view = layer.storage.view()
            feats.append(kvzap_features(view.keys[0].float(), view.values[0].float()))
            ys.append(torch.log(view.aux["kvzip"][0].clamp_min(1e-8)))
        features.append(feats)
        targets.append(ys)
    layers = len(features[0])
    weights, fits = [], []
    for layer in range(layers):
        x = torch.cat([f[layer] for f in features[:-1]], 1).double()  # (kv_heads, N, F)
        y = torch.cat([t[layer] for t in targets[:-1]], 1).double()  # (kv_heads, N)
        gram = x.transpose(1, 2) @ x
        scale = gram.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None]
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
        w = torch.linalg.solve(gram + ridge * scale * eye, (x.transpose(1, 2) @ y[..., None]))[..., 0]  # (kv_heads, F)
        weights.append(w.float())
        held_x, held_y = features[-1][layer].double(), targets[-1][layer].double()
        predicted = (held_x @ w[..., None])[..., 0]
        fits.append(spearman(predicted.flatten(), held_y.flatten()))
    return torch.stack(weights), torch.tensor(fits)


def timed(seconds: dict[str, float], name: str, run: Callable[[], object]) -> object:
    start = time.perf_counter()
    out = run()
    seconds[name] = time.perf_counter() - start
    log.info("calibration: %s took %.1fs", name, seconds[name])
    return out


def calibrate(loaded: LoadedModel, force: bool = False) -> Calibration:
    """The model's calibration: found (this process, then disk), or measured and saved when
    missing or `force`. Sizes follow the model's context (a quarter to a half of it at most)."""
    model = fingerprint(loaded.model)
    found = None if force else find_calibration(model)
    if found is not None:
        return found
    context = loaded.context_length or 4096
    seconds: dict[str, float] = {}
    retrieval = timed(seconds, "retrieval heads", lambda: retrieval_scores(loaded, min(256, context // 4)))
    directions = timed(seconds, "query directions", lambda: query_directions(loaded, min(1024, context // 2)))
    zap, fit = timed(seconds, "kvzap surrogate", lambda: kvzap_weights(loaded, longest=min(4096, context // 2)))  # type: ignore[misc]
    calibration = Calibration(model, loaded.name, retrieval, directions, zap, fit, seconds)  # type: ignore[arg-type]
    calibration.save(calibration_path(model))
    log.info("calibration of %s saved to %s", loaded.name, calibration_path(model))
    return remember(calibration)


def lowrank_bases(loaded: LoadedModel, tokens: int = 2048) -> tuple[torch.Tensor, ...]:
    """Per layer and KV head, the principal directions of the keys and values a prefill of the
    calibration text stores, and its key channels by ThinK's score against the prefill's queries:
    (keys, values, key_energy, value_energy, key_channels, channel_share), see
    `calibration/lowrank.py`."""
    from kvforge.calibration.lowrank import principal, think_channels

    cache = recorded_prefill(loaded, calibration_text(loaded, tokens))
    found = []
    for layer in cache.layers:
        assert layer.prefill_record is not None
        view = layer.storage.view()
        keys = view.keys[0].float()  # (Hkv, T, D)
        queries = layer.prefill_record.query[0].float()  # (Hq, T, D), a group's heads side by side
        grouped = queries.reshape(keys.shape[0], -1, queries.shape[-1])  # (Hkv, group * T, D)
        found.append(principal(keys) + principal(view.values[0].float()) + think_channels(grouped, keys))
    keys, key_energy, values, value_energy, channels, share = (torch.stack([f[i] for f in found]) for i in range(6))
    return keys, values, key_energy, value_energy, channels, share


def calibrate_lowrank(loaded: LoadedModel, force: bool = False) -> Bases:
    """The model's low-rank bases: found (this process, then disk), or measured and saved."""
    from kvforge.calibration.lowrank import Bases, bases_path, find_bases, remember

    model = fingerprint(loaded.model)
    found = None if force else find_bases(model)
    if found is not None:
        return found
    bases = Bases(model, loaded.name, *lowrank_bases(loaded, min(2048, (loaded.context_length or 4096) // 2)))
    bases.save(bases_path(model))
    log.info("low-rank bases of %s saved to %s", loaded.name, bases_path(model))
    return remember(bases)
