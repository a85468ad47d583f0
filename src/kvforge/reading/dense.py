"""Attention over dense pictures of what a layer holds: (batch, heads, slots, head_dim) tensors
and boolean masks. The torch math here is the reference every kernel is tested against and the
path the CPU takes; `received_attention` hands over to its Triton kernel where kernels run. It
knows nothing of how a layout holds its entries (`kvforge.storage`) or of the cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvforge.reading import kernels

_ALL_REAL_TAG = "_kvforge_all_real"


def all_real(batch: int, t: int, device: torch.device) -> torch.Tensor:
    """(batch, T) bool, all True, marked so `every_real` knows it without reading the device."""
    valid = torch.ones(batch, t, dtype=torch.bool, device=device)
    setattr(valid, _ALL_REAL_TAG, True)
    return valid


def every_real(valid: torch.Tensor) -> bool:
    """Whether every token of a (batch, T) validity mask is real: known on the host for a mask
    made by `all_real` (no padding in the chunk), else read from the device (a synchronisation)."""
    return getattr(valid, _ALL_REAL_TAG, False) or bool(valid.all())


def causal_allowed(
    key_positions: torch.Tensor,  # (batch, kv_heads | 1, L)
    key_valid: torch.Tensor,  # (batch, kv_heads | 1, L)
    query_positions: torch.Tensor,  # (T,)
) -> torch.Tensor:
    """(batch, kv_heads | 1, T, L) bool: query t may read key l.

    A query that may read nothing (a padding query) is allowed everything instead, so softmax
    stays finite; its output is never used.
    """
    allowed = key_valid[:, :, None, :] & (key_positions[:, :, None, :] <= query_positions[None, None, :, None])
    return allowed | ~allowed.any(-1, keepdim=True)


def attend(
    query: torch.Tensor,  # (batch, q_heads, T, head_dim)
    keys: torch.Tensor,  # (batch, kv_heads, L, head_dim)
    values: torch.Tensor,  # (batch, kv_heads, L, head_dim)
    allowed: torch.Tensor | None,  # (batch, kv_heads | 1, T, L) bool; None = plain causal
    scaling: float,
) -> torch.Tensor:  # (batch, q_heads, T, head_dim)
    batch, q_heads, t, dim = query.shape
    kv_heads = keys.shape[1]
    if allowed is None:  # plain causal over keys that end with the T queries (T == 1: no mask)
        return F.scaled_dot_product_attention(query, keys, values, is_causal=t > 1, scale=scaling, enable_gqa=True)
    if allowed.shape[1] == 1:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=allowed, scale=scaling, enable_gqa=True)
    # Masks differ per KV head (ragged rows): fold each GQA group's query heads into the
    # query axis so one mask row serves all heads of the group.
    group = q_heads // kv_heads
    q = query.reshape(batch, kv_heads, group * t, dim)
    mask = allowed[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, kv_heads, group * t, -1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
    return out.view(batch, q_heads, t, dim)


def attend_at(
    query: torch.Tensor,  # (batch, q_heads, T, head_dim)
    keys: torch.Tensor,  # (batch, kv_heads, L, head_dim)
    values: torch.Tensor,  # (batch, kv_heads, L, head_dim)
    key_positions: torch.Tensor,  # (batch, kv_heads, L)
    key_valid: torch.Tensor,  # (batch, kv_heads, L)
    positions: torch.Tensor,  # (T,) ascending: each query's position
    scaling: float,
    chunks: int = 4,
) -> torch.Tensor:  # (batch, q_heads, T, head_dim)
    """Attention of queries sitting anywhere among the keys, causal by position (CacheBlend's
    refresh). Where every row holds the same positions, ascending (a cache refreshed in place),
    queries go in `chunks` runs, each reading only the keys up to its last position: about half
    the work of reading every key."""
    if bool((key_positions == key_positions[:, :1]).all() and (key_valid == key_valid[:, :1]).all()):
        key_positions, key_valid = key_positions[:, :1], key_valid[:, :1]  # one mask for every head
    ordered = key_positions.shape[1] == 1 and bool((key_positions[..., 1:] >= key_positions[..., :-1]).all())
    if not ordered or positions.numel() < 2 * chunks:
        return attend(query, keys, values, causal_allowed(key_positions, key_valid, positions), scaling)
    out = []
    for run in torch.arange(positions.numel(), device=positions.device).tensor_split(chunks):
        last = positions[run[-1]]
        n = int((key_positions[0, 0] <= last).sum())  # the keys this run may read: a prefix
        allowed = causal_allowed(key_positions[..., :n], key_valid[..., :n], positions[run])
        out.append(attend(query[:, :, run], keys[:, :, :n], values[:, :, :n], allowed, scaling))
    return torch.cat(out, dim=2)


def attention_probs_sum(
    query: torch.Tensor,  # (batch, q_heads, T, head_dim)
    keys: torch.Tensor,  # (batch, kv_heads, L, head_dim)
    allowed: torch.Tensor,  # (batch, kv_heads | 1, T, L) bool
    query_weight: torch.Tensor,  # (batch, T) float, 0 for queries that must not count
    scaling: float,
    chunk: int = 128,
) -> torch.Tensor:  # (batch, kv_heads, L)
    """Softmax attention each key received, summed over weighted queries, averaged over each GQA group.

    Queries are processed `chunk` at a time so the probability matrix never exceeds
    (batch, q_heads, chunk, L). Each chunk only looks at the key columns some of its queries may
    attend to (causality leaves the later half of a prefill's columns empty on average), works
    in place, and folds the softmax's normalisation into the query weights, so the big matrix is
    exponentiated once and reduced by one matrix product.
    """
    batch, q_heads, t, dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    total = keys.new_zeros(batch, kv_heads, length, dtype=torch.float32)
    keys32 = keys.float()
    for start in range(0, t, chunk):
        mask = allowed[:, :, start : start + chunk]  # (batch, kv_heads | 1, c, L)
        columns = mask.flatten(0, 2).any(0).nonzero()
        if columns.numel() == 0:
            continue
        width = int(columns[-1]) + 1
        mask = mask[..., :width]
        q = query[:, :, start : start + chunk].float().view(batch, kv_heads, group, -1, dim) * scaling
        logits = torch.einsum("bhgtd,bhld->bhgtl", q, keys32[:, :, :width])  # (batch, kv, group, c, width)
        logits.masked_fill_(~mask[:, :, None], float("-inf"))
        peak = logits.amax(-1, keepdim=True).clamp_min_(torch.finfo(logits.dtype).min)
        logits.sub_(peak).exp_()
        # weight / row sum. A row that may read nothing is all zeros after exp, so clamping its
        # zero sum keeps it at 0 instead of NaN.
        rowsum = logits.sum(-1)  # (batch, kv, group, c)
        weight = query_weight[:, None, None, start : start + chunk].float()
        scale = weight / rowsum.clamp_min(torch.finfo(rowsum.dtype).tiny)
        total[..., :width] += torch.einsum("bhgtl,bhgt->bhl", logits, scale) / group
    return total


def received_attention(
    query: torch.Tensor,  # (batch, q_heads, T, head_dim)
    keys: torch.Tensor,  # (batch, kv_heads, L, head_dim)
    key_positions: torch.Tensor,  # (batch, kv_heads | 1, L) logical position of each key
    key_valid: torch.Tensor,  # (batch, kv_heads | 1, L) bool, False on padding slots
    query_positions: torch.Tensor,  # (T,)
    query_weight: torch.Tensor,  # (batch, T) float, 0 for queries that must not count
    scaling: float,
) -> torch.Tensor:  # (batch, kv_heads, L) float32
    """Softmax attention each key received from the weighted queries, causal by logical position,
    averaged over each GQA group: `attention_probs_sum` over `causal_allowed`, or the Triton kernel
    (`kvforge.reading.kernels.received`) where the kernels are enabled.

    The two differ only for a query that may read no key: the kernel counts it nowhere, the torch
    path lets it read everything. Callers give such a query (a padding query) weight 0."""
    if kernels.received_enabled(query.device, query.shape[-1]):
        from kvforge.reading.kernels.received import received_padded  # imports Triton: only when a kernel runs

        return received_padded(query, keys, key_positions, key_valid, query_positions, query_weight, scaling)
    allowed = causal_allowed(key_positions, key_valid, query_positions)
    return attention_probs_sum(query, keys, allowed, query_weight, scaling)


def head_grams(out_proj: torch.Tensor, kv_heads: int, group: int) -> torch.Tensor:
    """(hidden, q_heads * head_dim) output projection -> (kv_heads, group, head_dim, head_dim)
    W_h^T W_h of each query head's slice W_h, so ||W_h x||^2 = x^T (W_h^T W_h) x."""
    hidden = out_proj.shape[0]
    w = out_proj.float().view(hidden, kv_heads, group, -1)
    return torch.einsum("ohgd,ohge->hgde", w, w)


def removal_shift(
    probs: torch.Tensor,  # (batch, kv_heads, group, c, M): each query's attention to each scored entry
    own_probs: torch.Tensor,  # (batch, kv_heads, group, c, T): and to the chunk's own entries
    values: torch.Tensor,  # (batch, kv_heads, M, head_dim): the scored entries' values
    own_values: torch.Tensor,  # (batch, kv_heads, T, head_dim)
    grams: torch.Tensor | None = None,  # (kv_heads, group, head_dim, head_dim): see `head_grams`
) -> torch.Tensor:  # (batch, kv_heads, group, c, M)
    """How far each query head's contribution to the layer's output moves when one entry is taken
    out of its softmax: with o the head's attention output and a_i the entry's attention, the
    output renormalised without it is (o - a_i v_i) / (1 - a_i), so the shift is a_i / (1 - a_i)
    * ||W_h (v_i - o)||, W_h the head's slice of the output projection (ReST-KV's layer-wise
    output reconstruction); without `grams`, ||v_i - o||. Padding queries (probs all 0) give 0."""
    out = torch.einsum("bhgcm,bhmd->bhgcd", probs, values) + torch.einsum("bhgct,bhtd->bhgcd", own_probs, own_values)
    # ||W(v_i - o)||^2 = v_i.Gv_i + o.Go - 2 o.Gv_i (G = W^T W, or the identity), without a
    # (.., c, M, head_dim) difference
    if grams is None:
        v_gv = values.square().sum(-1)[:, :, None, None, :]  # (batch, kv_heads, 1, 1, M)
        o_g = out
    else:
        v_gv = torch.einsum("bhmd,hgde,bhme->bhgm", values, grams, values)[:, :, :, None, :]
        o_g = torch.einsum("bhgcd,hgde->bhgce", out, grams)
    distance = (v_gv + (o_g * out).sum(-1, keepdim=True) - 2 * torch.einsum("bhgcd,bhmd->bhgcm", o_g, values)).clamp_min_(0).sqrt_()
    return probs / (1 - probs).clamp_min(1e-6) * distance


def probe_attention(
    query: torch.Tensor,  # (batch, q_heads, T, head_dim): a reconstruction chunk's queries
    held_keys: torch.Tensor,  # (batch, kv_heads, S, head_dim): what the layer holds
    held_values: torch.Tensor,  # (batch, kv_heads, S, head_dim)
    held_valid: torch.Tensor,  # (batch, kv_heads, S) bool
    scored: torch.Tensor,  # (batch, kv_heads, S) bool: held entries in the scoring softmax
    new_keys: torch.Tensor,  # (batch, kv_heads, T, head_dim): the chunk's own keys, not stored
    new_values: torch.Tensor,  # (batch, kv_heads, T, head_dim)
    new_valid: torch.Tensor,  # (batch, T) bool
    scaling: float,
    chunk: int = 128,
    score: str = "attention",
    out_proj: torch.Tensor | None = None,  # (hidden, q_heads * head_dim): "output" measures through it
) -> tuple[torch.Tensor, torch.Tensor]:  # (batch, q_heads, T, head_dim), (batch, kv_heads, S)
    """Attention of a chunk that reads everything held plus itself (causally) without being
    stored, and each held entry's score: the most attention it got from any of its queries and
    query heads (`score="attention"`), or the most any query's output would move were the entry
    removed from its softmax (`"output"`, see `removal_shift`).

    The output is the full softmax (the next layer needs the true hidden states), computed by the
    fused kernel. The score renormalises over the `scored` entries and the chunk's own keys only,
    so an entry is measured against the part of the context the chunk repeats (KVzip's scoring);
    it is computed apart, on the scored entries gathered, `chunk` queries at a time.
    """
    batch, q_heads, t, dim = query.shape
    kv_heads, slots = held_keys.shape[1], held_keys.shape[2]
    steps = torch.arange(t, device=query.device)
    own_ok = (steps[None, :] <= steps[:, None])[None] & new_valid[:, None, :]  # (batch, T, T)
    # One mask for all heads when they hold the same slots (the usual case), else one per KV head.
    heads = 1 if bool((held_valid == held_valid[:, :1]).all()) else kv_heads
    allowed = torch.cat(
        [held_valid[:, :heads, None, :].expand(-1, -1, t, -1), own_ok[:, None].expand(-1, heads, -1, -1)], -1
    )
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # a padding query reads everything; it is zeroed below
    keys = torch.cat([held_keys, new_keys], 2)
    values = torch.cat([held_values, new_values], 2)
    out = attend(query, keys, values, allowed, scaling).masked_fill(~new_valid[:, None, :, None], 0.0)

    # The scored entries of each row, gathered to the front: (batch, kv_heads, M).
    counts = scored.sum(-1)
    width = max(int(counts.max()), 1)
    index = scored.float().topk(width, dim=-1, sorted=False).indices
    sub_valid = torch.gather(scored, -1, index)
    sub_keys = torch.gather(held_keys, 2, index[..., None].expand(-1, -1, -1, dim)).float()
    sub_values = torch.gather(held_values, 2, index[..., None].expand(-1, -1, -1, dim)).float() if score == "output" else None
    group = q_heads // kv_heads
    grams = head_grams(out_proj, kv_heads, group) if sub_values is not None and out_proj is not None else None
    best = held_keys.new_zeros(batch, kv_heads, width, dtype=torch.float32)
    k_new = new_keys.float()
    for start in range(0, t, chunk):
        stop = min(start + chunk, t)
        q = query[:, :, start:stop].float().view(batch, kv_heads, group, -1, dim) * scaling
        held = torch.einsum("bhgtd,bhld->bhgtl", q, sub_keys)  # (batch, kv, group, c, M)
        own = torch.einsum("bhgtd,bhld->bhgtl", q, k_new)  # (batch, kv, group, c, T)
        held.masked_fill_(~sub_valid[:, :, None, None], float("-inf"))
        own.masked_fill_(~own_ok[:, None, None, start:stop], float("-inf"))
        peak = torch.maximum(held.amax(-1, keepdim=True), own.amax(-1, keepdim=True)).clamp_min_(torch.finfo(held.dtype).min)
        held.sub_(peak).exp_()
        own.sub_(peak).exp_()
        total = (held.sum(-1, keepdim=True) + own.sum(-1, keepdim=True)).clamp_min_(torch.finfo(held.dtype).tiny)
        probs = held.div_(total)
        probs.masked_fill_(~new_valid[:, None, None, start:stop, None], 0.0)
        if sub_values is not None:
            probs = removal_shift(probs, own.div_(total), sub_values, new_values.float(), grams)
        best = torch.maximum(best, probs.amax(dim=(2, 3)))
    scores = held_keys.new_zeros(batch, kv_heads, slots, dtype=torch.float32)
    scores.scatter_(-1, index, best * sub_valid)
    return out, scores
