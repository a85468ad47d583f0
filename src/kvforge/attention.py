"""The attention function kvforge registers with transformers (the math it uses is `kvforge.reading`).

transformers calls `cache.update(k, v, layer_idx)` and then the registered attention function
with whatever `update` returned. kvforge's cache returns the new chunk's K/V tagged with the
cache layer they belong to; the attention function finds the layer through that tag, lets it
store the chunk (padding excluded), attends over what the layer holds, and lets the policy
observe attention and compress. Nothing is patched: `enable(model)` registers the function
under the name "kvforge" through transformers' public interfaces and selects it on that model.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from kvforge.reading import all_real, attend, causal_allowed

log = logging.getLogger(__name__)

ATTN_NAME = "kvforge"
_LAYER_TAG = "_kvforge_layer"


class AttendingLayer(Protocol):
    def attend(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        new_valid: torch.Tensor,
        scaling: float,
        out_proj: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def output_projection(module: torch.nn.Module) -> torch.Tensor | None:
    """(hidden, q_heads * head_dim) weight of the attention's output projection (`o_proj` in
    Llama, Qwen, Mistral and Gemma), or None where the module has none by that name."""
    proj = getattr(module, "o_proj", None)
    weight = getattr(proj, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def tag_layer(keys: torch.Tensor, layer: AttendingLayer) -> None:
    """Mark the K tensor `update` returns with the cache layer that must attend over it."""
    setattr(keys, _LAYER_TAG, layer)


def pop_layer(keys: torch.Tensor) -> AttendingLayer | None:
    layer = getattr(keys, _LAYER_TAG, None)
    if layer is not None:
        delattr(keys, _LAYER_TAG)
    return layer


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **_: Any,
) -> torch.Tensor | None:
    """The mask kvforge's attention receives: the 2-D padding mask over the logical key range.

    Returns (batch, kv_length) bool, True for real tokens, or None when nothing is padded. The
    causal structure is not materialised here: the cache knows each kept entry's position.
    """
    if attention_mask is None:
        return None
    mask = attention_mask[:, kv_offset : kv_offset + kv_length].bool()
    return None if bool(mask.all()) else mask


def kvforge_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (batch, q_heads, T, head_dim)
    key: torch.Tensor,  # (batch, kv_heads, T, head_dim): the new chunk, tagged by the cache
    value: torch.Tensor,  # (batch, kv_heads, T, head_dim)
    attention_mask: torch.Tensor | None,  # (batch, kv_length) from `padding_mask`, or None
    scaling: float | None = None,
    dropout: float = 0.0,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over a kvforge cache layer; plain causal attention when no kvforge cache is in use."""
    batch, _, t, dim = query.shape
    scale = scaling if scaling is not None else dim**-0.5
    layer = pop_layer(key)
    if layer is not None:
        new_valid = all_real(batch, t, query.device) if attention_mask is None else attention_mask[:, -t:]
        out = layer.attend(query, key, value, new_valid, scale, output_projection(module))
    else:
        # Another cache (or none): keys are every token so far, the last T of them new.
        length = key.shape[2]
        allowed = None
        if attention_mask is not None or length != t:
            valid = (
                torch.ones(batch, length, dtype=torch.bool, device=query.device)
                if attention_mask is None
                else attention_mask[:, -length:]
            )
            positions = torch.arange(length, device=query.device)
            allowed = causal_allowed(positions.expand(batch, 1, -1), valid[:, None], positions[-t:])
        out = attend(query, key, value, allowed, scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register kvforge's attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_NAME, kvforge_attention)
    AttentionMaskInterface.register(ATTN_NAME, padding_mask)


def enable(model: torch.nn.Module) -> torch.nn.Module:
    """Switch `model` to kvforge attention, so a kvforge cache can serve it. Returns the model."""
    register()
    model.set_attn_implementation(ATTN_NAME)
    log.debug("attention implementation of %s set to %r", type(model).__name__, ATTN_NAME)
    return model
