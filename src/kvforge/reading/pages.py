"""Reading less instead of holding less: a decoding step reads only some pages of what a layer
holds, every entry still held.

Each row's held entries, oldest first, are cut into pages of `PAGE` consecutive slots, and each
page keeps a summary of its keys from which a query's attention to the page is estimated:

- `quest` (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
  Inference"): per channel the least and the most key of the page, two half-precision rows. The
  page's largest logit is at most sum_d max(q_d * min_d, q_d * max_d): an upper bound.
- `centroid` (the landmarks of ShadowKV and InfLLM): the sum of the page's keys, one float32 row
  (the same bytes); the estimate is q . mean key. Not a bound, but on SmolLM2 a tighter ranking:
  the bound is dominated by a few wide channels (README, "Reading less").

A KV head's row serves the query heads of its GQA group: a page's estimate is the highest any of
them gives. Everything here is tensor math over a dense picture of the held keys (slot j of a row
is its j-th oldest entry); the cache layer decides when to call it.
"""

from __future__ import annotations

import math

import torch

PAGE = 16  # entries per page: Quest's page size
BOUND_DTYPE = torch.float16  # quest's bounds are held in half precision, as Quest keeps them


def page_count(lengths: torch.Tensor) -> torch.Tensor:
    """(batch, kv_heads) pages of rows holding `lengths` entries (a partly filled last page counts)."""
    return (lengths + PAGE - 1) // PAGE


def page_bounds(
    keys: torch.Tensor,  # (batch, kv_heads, slots, head_dim)
    lengths: torch.Tensor,  # (batch, kv_heads) entries held per row; slots past them are padding
) -> tuple[torch.Tensor, torch.Tensor]:  # (batch, kv_heads, pages, head_dim) each
    """Per page and channel, the least and the most key of the page's held entries. Pages past a
    row's last hold +inf (least) and -inf (most): one entry appended there sets both."""
    batch, heads, slots, dim = keys.shape
    pages = math.ceil(slots / PAGE)
    pad = pages * PAGE - slots
    held = torch.arange(pages * PAGE, device=keys.device) < lengths.to(keys.device)[..., None]  # (batch, kv_heads, pages*PAGE)
    padded = torch.nn.functional.pad(keys.float(), (0, 0, 0, pad)).view(batch, heads, pages, PAGE, dim)
    held = held.view(batch, heads, pages, PAGE, 1)
    least = padded.masked_fill(~held, float("inf")).amin(3)
    most = padded.masked_fill(~held, float("-inf")).amax(3)
    return least.to(BOUND_DTYPE), most.to(BOUND_DTYPE)


def page_sums(
    keys: torch.Tensor,  # (batch, kv_heads, slots, head_dim)
    lengths: torch.Tensor,  # (batch, kv_heads)
) -> torch.Tensor:  # (batch, kv_heads, pages, head_dim) float32
    """Per page, the sum of its held keys (zero past a row's last)."""
    batch, heads, slots, dim = keys.shape
    pages = math.ceil(slots / PAGE)
    held = torch.arange(slots, device=keys.device) < lengths.to(keys.device)[..., None]
    padded = torch.nn.functional.pad(keys.float() * held[..., None], (0, 0, 0, pages * PAGE - slots))
    return padded.view(batch, heads, pages, PAGE, dim).sum(3)


def page_summary(kind: str, keys: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """A summary of every page of rows holding (batch, kv_heads, slots, head_dim) `keys`:
    [least, most] for quest, [sums] for centroid."""
    return list(page_bounds(keys, lengths)) if kind == "quest" else [page_sums(keys, lengths)]


def add_entry(
    least: torch.Tensor,  # (batch, kv_heads, pages, head_dim)
    most: torch.Tensor,  # (batch, kv_heads, pages, head_dim)
    key: torch.Tensor,  # (batch, kv_heads, head_dim): each row's newest entry
    slot: torch.Tensor,  # (batch, kv_heads) its slot (the row's length before it)
    added: torch.Tensor,  # (batch, kv_heads) bool: rows that took one (padding steps did not)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bounds after one entry per row was appended at `slot`: that slot's page widens to hold
    it; a new page is grown where the slot begins one."""
    needed = int(slot.max()) // PAGE + 1 if slot.numel() else 0
    if needed > least.shape[2]:
        extra = needed - least.shape[2]
        least = torch.nn.functional.pad(least, (0, 0, 0, extra), value=float("inf"))
        most = torch.nn.functional.pad(most, (0, 0, 0, extra), value=float("-inf"))
    page = (slot // PAGE).clamp(max=least.shape[2] - 1)[..., None, None].expand(-1, -1, 1, least.shape[-1])
    key = key.to(BOUND_DTYPE)[:, :, None]
    keep = ~added[..., None, None]
    new_least = torch.minimum(least.gather(2, page), key)
    new_most = torch.maximum(most.gather(2, page), key)
    least = least.scatter(2, page, torch.where(keep, least.gather(2, page), new_least))
    most = most.scatter(2, page, torch.where(keep, most.gather(2, page), new_most))
    return least, most


def grow_summary(kind: str, summary: list[torch.Tensor], key: torch.Tensor, slot: torch.Tensor, added: torch.Tensor) -> list[torch.Tensor]:
    """The summary after one entry per row (batch, kv_heads, head_dim) `key` was appended at
    (batch, kv_heads) `slot`, in the rows where `added`."""
    if kind == "quest":
        return list(add_entry(summary[0], summary[1], key, slot, added))
    (sums,) = summary
    needed = int(slot.max()) // PAGE + 1 if slot.numel() else 0
    if needed > sums.shape[2]:
        sums = torch.nn.functional.pad(sums, (0, 0, 0, needed - sums.shape[2]))
    page = (slot // PAGE).clamp(max=sums.shape[2] - 1)[..., None, None].expand(-1, -1, 1, sums.shape[-1])
    return [sums.scatter_add(2, page, (key.float() * added[..., None])[:, :, None])]


def page_scores(
    kind: str,
    query: torch.Tensor,  # (batch, q_heads, 1, head_dim): one decoding step's queries
    summary: list[torch.Tensor],  # each (batch, kv_heads, pages, head_dim)
    lengths: torch.Tensor,  # (batch, kv_heads) entries held per row
) -> torch.Tensor:  # (batch, kv_heads, pages) float32; -inf past a row's last page
    """Each page's estimate of the query's attention to it, the highest over the GQA group."""
    batch, q_heads, _, dim = query.shape
    heads, pages = summary[0].shape[1], summary[0].shape[2]
    lengths = lengths.to(query.device)
    live = torch.arange(pages, device=query.device) < page_count(lengths)[..., None]  # (batch, kv_heads, pages)
    q = query.float().view(batch, heads, q_heads // heads, dim)
    if kind == "quest":
        lo = summary[0].float().masked_fill(~live[..., None], 0.0)
        hi = summary[1].float().masked_fill(~live[..., None], 0.0)
        score = torch.einsum("bhgd,bhpd->bhgp", q.clamp(min=0), hi) + torch.einsum("bhgd,bhpd->bhgp", q.clamp(max=0), lo)
    else:
        held = (lengths[..., None] - torch.arange(pages, device=query.device) * PAGE).clamp(0, PAGE)  # (batch, kv_heads, pages)
        mean = summary[0] / held.clamp(min=1)[..., None]
        score = torch.einsum("bhgd,bhpd->bhgp", q, mean)
    return score.amax(2).masked_fill(~live, float("-inf"))


def chosen_slots(
    score: torch.Tensor,  # (batch, kv_heads, pages) from `page_scores`
    lengths: torch.Tensor,  # (batch, kv_heads) entries held per row
    fraction: float,  # of each row's pages read, rounded up
) -> tuple[torch.Tensor, torch.Tensor]:  # (batch, kv_heads, K) slots, (batch, kv_heads, K) bool
    """The slots a decoding step reads: in each row, the pages that score highest, `fraction` of
    the row's pages rounded up, always its first page (the attention sinks) and its last (the
    newest entries, the step's own among them). Returns slot indices (clamped to a real slot)
    and which of them are read (False: unused columns, or past the row)."""
    pages = score.shape[2]
    lengths = lengths.to(score.device)
    counts = page_count(lengths)  # (batch, kv_heads)
    page_ids = torch.arange(pages, device=score.device)
    live = page_ids < counts[..., None]
    always = (page_ids == 0) | (page_ids == (counts - 1).clamp(min=0)[..., None])
    score = score.masked_fill(always, float("inf")).masked_fill(~live, float("-inf"))
    wanted = torch.minimum(counts, torch.ceil(counts * fraction).long().clamp(min=2))  # (batch, kv_heads)
    width = max(int(wanted.max()), 1)
    top = score.topk(min(width, pages), dim=-1).indices  # (batch, kv_heads, width)
    used = torch.arange(top.shape[-1], device=score.device) < wanted[..., None]
    top, _ = torch.where(used, top, pages).sort(-1)  # time order; unused columns last
    used = top < pages
    slots = top[..., None] * PAGE + torch.arange(PAGE, device=score.device)  # (batch, kv_heads, width, PAGE)
    read = used[..., None] & (slots < lengths[..., None, None])
    slots, read = slots.flatten(2), read.flatten(2)
    return slots.clamp(max=max(int(lengths.max()) - 1, 0)), read
