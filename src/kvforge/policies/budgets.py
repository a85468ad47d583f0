"""Spending a budget across heads and layers: shared by the policies whose budgets are not
one per row (Ada-KV's layer budgets, KVzip's and KVzap's thresholds).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvforge.policies.base import StepContext, top_slots


def rows_from_chosen(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, kv_heads, slots) bool of slots to keep -> (index, mask), each (batch, kv_heads, K),
    K the most any row keeps: what `Policy.select` returns."""
    counts = chosen.sum(-1)  # (batch, kv_heads)
    k = max(int(counts.max()), 1)
    index = chosen.float().topk(k, dim=-1).indices
    mask = torch.arange(k, device=chosen.device) < counts[..., None]
    return index, mask


def lexsort_desc(keys: torch.Tensor) -> torch.Tensor:
    """(batch, n, 2) -> (batch, n) indices sorting by key 0, then key 1, both descending."""
    by_second = keys[..., 1].argsort(dim=-1, descending=True, stable=True)
    first = keys[..., 0].gather(1, by_second)
    return by_second.gather(1, first.argsort(dim=-1, descending=True, stable=True))


def spend_across_heads(scores: torch.Tensor, ctx: StepContext, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Select with one budget per layer (Ada-KV): each head first keeps its best `floor` fraction
    of its own budget, then the layer's remaining budget goes to the highest scores of any head.

    scores: (batch, kv_heads, slots). The layer's budget is what ctx.target asks of all heads,
    at most what they hold. Returns (index, mask) as `Policy.select` does."""
    assert ctx.budget is not None
    valid = ctx.view.valid  # (batch, kv_heads, slots)
    scores = scores.float().masked_fill(~valid, float("-inf"))
    batch, heads, slots = scores.shape
    floor_n = torch.ceil(ctx.budget.double() * floor).long().minimum(ctx.budget)  # (batch, kv_heads)
    rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = the head's best
    protected = (rank < floor_n[..., None]) & valid
    # Protected first, then by score; a flat top-k over the layer's heads spends the rest.
    order = torch.stack([protected.float(), scores], -1).view(batch, heads * slots, 2)
    target = ctx.target if ctx.target is not None else ctx.budget
    total = target.sum(-1).minimum(ctx.view.lengths.sum(-1))  # (batch,)
    flat = lexsort_desc(order)[:, : int(total.max())]  # (batch, k)
    chosen = torch.zeros(batch, heads * slots, dtype=torch.bool, device=scores.device)
    chosen.scatter_(1, flat, torch.arange(flat.shape[1], device=scores.device) < total[:, None])
    return rows_from_chosen(chosen.view(batch, heads, slots) & valid)


def threshold_over_layers(scores: list[torch.Tensor], targets: list[torch.Tensor]) -> list[torch.Tensor]:
    """One threshold per sequence over every layer and head (KVzip's non-uniform budgets): the
    cache keeps its total budget, sum of `targets`, the best-scoring entries of any (layer, head)
    row. Ties at the threshold go to whichever topk returns first, so exactly the budget is kept (pooled
    scores tie often); entries scoring +inf are all kept, even past it. scores: per layer
    (batch, kv_heads, slots), -inf on padding; targets: per layer (batch, kv_heads). Returns per
    layer (batch, kv_heads) counts."""
    flat = torch.cat([s.float().flatten(1) for s in scores], 1)  # (batch, all entries)
    total = torch.stack(targets).sum(dim=(0, 2)).clamp(max=flat.shape[1])  # (batch,)
    k = max(int(total.max()), 1)
    top = flat.topk(k, dim=1).indices  # (batch, k)
    chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, torch.arange(k, device=flat.device) < total[:, None])
    chosen |= flat == float("inf")
    per_layer = chosen.split([s[0].numel() for s in scores], dim=1)
    return [c.view(s.shape).sum(-1) for c, s in zip(per_layer, scores)]


SPREADS = ("model", "layer", "head")


def check_spread(spread: str) -> None:
    if spread not in SPREADS:
        raise ValueError(f"spread={spread!r} is not one of {', '.join(map(repr, SPREADS))}")


def spread_select(scores: torch.Tensor, ctx: StepContext, spread: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Select by `scores` (batch, kv_heads, slots) as `spread` says: "head", every head its own
    budget; "layer" and "model", the layer's budget (after `spread_targets`) spent across its
    heads by score. While decoding every head keeps its own budget."""
    assert ctx.budget is not None
    if spread == "head" or ctx.decoding:
        return top_slots(scores, ctx.budget, ctx.view.valid)
    return spend_across_heads(scores, ctx, floor=0.0)


def spread_targets(
    score: Callable[[StepContext], torch.Tensor], contexts: list[StepContext | None], spread: str
) -> list[torch.Tensor | None]:
    """Per-layer targets: with spread "model" one threshold over every layer's `score` (see
    `threshold_over_layers`), else each layer its own target."""
    if spread != "model" or any(c is None or c.target is None for c in contexts):
        return [None if c is None else c.target for c in contexts]
    scores = [score(c).float().masked_fill(~c.view.valid, float("-inf")) for c in contexts]  # type: ignore[union-attr]
    return list(threshold_over_layers(scores, [c.target for c in contexts]))  # type: ignore[union-attr, misc]
