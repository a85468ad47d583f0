"""Attention-scored policies keep what transformers' own eager attention says they should.

An independent reference: the same weights run with `attn_implementation="eager"` and
`output_attentions=True`; the selection rule is re-derived here from those probabilities, on a
left-padded batch, and compared with the positions kvforge really holds.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

import kvforge
from kvforge.cache import KVCache
from conftest import held_positions, left_padded

LENGTHS = [60, 45]
RATIO = 0.5


@pytest.fixture(scope="module")
def eager_attentions(tiny_model: LlamaForCausalLM) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per layer (batch, q_heads, T, T) attention probabilities, and the padded batch."""
    ref = copy.deepcopy(tiny_model)
    ref.set_attn_implementation("eager")
    ids, mask = left_padded(LENGTHS)
    with torch.inference_mode():
        out = ref(input_ids=ids, attention_mask=mask, output_attentions=True)
    return list(out.attentions), ids, mask


def kept_positions(tiny_model: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor, policy: str, **params) -> list[list[list[int]]]:
    """[layer][batch * kv_heads] sorted logical positions the cache holds after the prefill."""
    cache = KVCache(tiny_model, kvforge.make_policy(policy, ratio=RATIO, **params))
    with torch.inference_mode():
        tiny_model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    return [held_positions(layer.storage) for layer in cache.layers]


def group_mean(probs: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(q_heads, L) -> (kv_heads, L): the mean over each GQA group."""
    return probs.view(kv_heads, -1, probs.shape[-1]).mean(1)


def top(scores: torch.Tensor, pad: int, budget: int) -> list[int]:
    """Logical positions of the `budget` best real slots of a (slots,) score row."""
    return sorted((scores.topk(budget).indices + pad).tolist())


def test_snapkv_keeps_the_pooled_window_attention_top(tiny_model, eager_attentions):
    attentions, ids, mask = eager_attentions
    window, kernel = 8, 5
    got = kept_positions(tiny_model, ids, mask, "snapkv", window=window, kernel=kernel)
    kv_heads = tiny_model.config.num_key_value_heads
    width = ids.shape[1]
    for layer, probs in enumerate(attentions):
        for b, n in enumerate(LENGTHS):
            pad = width - n
            a = group_mean(probs[b, :, -window:, pad:].sum(1), kv_heads)  # (kv_heads, n)
            pooled = F.avg_pool1d(a[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
            pooled[:, n - window :] = float("inf")  # the window itself is kept
            budget = math.floor(n * (1 - RATIO))
            for h in range(kv_heads):
                assert got[layer][b * kv_heads + h] == top(pooled[h], pad, budget), (layer, b, h)


def test_h2o_keeps_heavy_hitters_and_the_recent_window(tiny_model, eager_attentions):
    attentions, ids, mask = eager_attentions
    got = kept_positions(tiny_model, ids, mask, "h2o", recent_fraction=0.5)
    kv_heads = tiny_model.config.num_key_value_heads
    width = ids.shape[1]
    for layer, probs in enumerate(attentions):
        for b, n in enumerate(LENGTHS):
            pad = width - n
            a = group_mean(probs[b, :, pad:, pad:].sum(1), kv_heads)  # (kv_heads, n): every real query
            budget = math.floor(n * (1 - RATIO))
            recent = math.ceil(budget * 0.5)
            a[:, n - recent :] = float("inf")
            for h in range(kv_heads):
                assert got[layer][b * kv_heads + h] == top(a[h], pad, budget), (layer, b, h)
