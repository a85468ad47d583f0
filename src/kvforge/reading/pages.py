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


def _in_pages(
    keys: torch.Tensor,  # (batch, kv_heads, slots, head_dim)
    lengths: torch.Tensor,  # (batch, kv_heads) entries held per row; slots past them are padding
) -> tuple[torch.Tensor, torch.Tensor]:  # (batch, kv_heads, pages, PAGE, head_dim) float32, (..., PAGE, 1) bool
    """The keys cut into pages (the last padded), and which of their slots hold an entry."""
    batch, heads, slots, dim = keys.shape
    pages = math.ceil(slots / PAGE)
    held = torch.arange(pages * PAGE, device=keys.device) < lengths.to(keys.device)[..., None]
    paged = torch.nn.functional.pad(keys.float(), (0, 0, 0, pages * PAGE - slots)).view(batch, heads, pages, PAGE, dim)
    return paged, held.view(batch, heads, pages, PAGE, 1)


def page_bounds(keys: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per page and channel, the least and the most key of the page's held entries: (batch,
    kv_heads, pages, head_dim) each. Pages past a row's last hold +inf (least) and -inf (most):
    one entry appended there sets both."""
    paged, held = _in_pages(keys, lengths)
    least = paged.masked_fill(~held, float("inf")).amin(3)
    most = paged.masked_fill(~held, float("-inf")).amax(3)
    return least.to(BOUND_DTYPE), most.to(BOUND_DTYPE)


def page_sums(keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per page, the sum of its held keys (zero past a row's last): (batch, kv_heads, pages,
    head_dim) float32."""
    paged, held = _in_pages(keys, lengths)
    return paged.masked_fill(~held, 0.0).sum(3)


def page_summary(kind: str, keys: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """A summary of every page of rows holding (batch, kv_heads, slots, head_dim) `keys`:
    [least, most] for quest, [sums] for centroid."""
    return list(page_bounds(keys, lengths)) if kind == "quest" else [page_sums(keys, lengths)]


def _page_at(summary: torch.Tensor, slot: torch.Tensor, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`summary` (batch, kv_heads, pages, head_dim) grown with pages of `fill` until it holds
    every (batch, kv_heads) `slot`'s page, and that page's index, shaped for gather/scatter
    (batch, kv_heads, 1, head_dim)."""
    needed = int(slot.max()) // PAGE + 1 if slot.numel() else 0
    if needed > summary.shape[2]:
        summary = torch.nn.functional.pad(summary, (0, 0, 0, needed - summary.shape[2]), value=fill)
    page = (slot // PAGE).clamp(max=summary.shape[2] - 1)[..., None, None].expand(-1, -1, 1, summary.shape[-1])
    return summary, page


def grow_summary(
    kind: str,
    summary: list[torch.Tensor],  # each (batch, kv_heads, pages, head_dim)
    key: torch.Tensor,  # (batch, kv_heads, head_dim): each row's newest entry
    slot: torch.Tensor,  # (batch, kv_heads) its slot (the row's length before it)
    added: torch.Tensor,  # (batch, kv_heads) bool: rows that took one (padding steps did not)
) -> list[torch.Tensor]:
    """The summary after one entry per row was appended at `slot`, in the rows where `added`:
    that slot's page widens to hold it (quest) or adds it (centroid); a page is grown where the
    slot begins one."""
    if kind == "quest":
        least, page = _page_at(summary[0], slot, float("inf"))
        most, _ = _page_at(summary[1], slot, float("-inf"))
        key = key.to(BOUND_DTYPE)[:, :, None]
        low = key.masked_fill(~added[..., None, None], float("inf"))  # a row that took nothing keeps its bounds
        high = key.masked_fill(~added[..., None, None], float("-inf"))
        least = least.scatter(2, page, torch.minimum(least.gather(2, page), low))
        most = most.scatter(2, page, torch.maximum(most.gather(2, page), high))
        return [least, most]
    sums, page = _page_at(summary[0], slot, 0.0)
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
