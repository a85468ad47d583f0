"""Reading less instead of holding less: a decoding step reads only some pages of what a layer
holds, every entry still held.

Each row's held entries, oldest first, are cut into pages of `page` consecutive slots (`PAGE`, or
the blocks of a block memory: `memory/summaries.py`), and each page keeps a summary of its keys
from which a query's attention to the page is estimated:

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


def page_count(lengths: torch.Tensor, page: int = PAGE) -> torch.Tensor:
    """(batch, kv_heads) pages of rows holding `lengths` entries (a partly filled last page counts)."""
    return (lengths + page - 1) // page


def _in_pages(
    keys: torch.Tensor,  # (batch, kv_heads, slots, head_dim)
    lengths: torch.Tensor,  # (batch, kv_heads) entries held per row; slots past them are padding
    page: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # (batch, kv_heads, pages, page, head_dim) float32, (..., page, 1) bool
    """The keys cut into pages (the last padded), and which of their slots hold an entry."""
    batch, heads, slots, dim = keys.shape
    pages = math.ceil(slots / page)
    held = torch.arange(pages * page, device=keys.device) < lengths.to(keys.device)[..., None]
    paged = torch.nn.functional.pad(keys.float(), (0, 0, 0, pages * page - slots)).view(batch, heads, pages, page, dim)
    return paged, held.view(batch, heads, pages, page, 1)


def page_bounds(keys: torch.Tensor, lengths: torch.Tensor, page: int = PAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per page and channel, the least and the most key of the page's held entries: (batch,
    kv_heads, pages, head_dim) each. Pages past a row's last hold +inf (least) and -inf (most):
    one entry appended there sets both."""
    paged, held = _in_pages(keys, lengths, page)
    least = paged.masked_fill(~held, float("inf")).amin(3)
    most = paged.masked_fill(~held, float("-inf")).amax(3)
    return least.to(BOUND_DTYPE), most.to(BOUND_DTYPE)


def page_sums(keys: torch.Tensor, lengths: torch.Tensor, page: int = PAGE) -> torch.Tensor:
    """Per page, the sum of its held keys (zero past a row's last): (batch, kv_heads, pages,
    head_dim) float32."""
    paged, held = _in_pages(keys, lengths, page)
    return paged.masked_fill(~held, 0.0).sum(3)


def page_summary(kind: str, keys: torch.Tensor, lengths: torch.Tensor, page: int = PAGE) -> list[torch.Tensor]:
    """A summary of every page of rows holding (batch, kv_heads, slots, head_dim) `keys`:
    [least, most] for quest, [sums] for centroid."""
    return list(page_bounds(keys, lengths, page)) if kind == "quest" else [page_sums(keys, lengths, page)]


def block_summary(kind: str, keys: torch.Tensor, held: torch.Tensor) -> list[torch.Tensor]:
    """The summary of n pages given apart, (n, page, head_dim) `keys` holding (n,) `held`
    entries each: each tensor (n, head_dim) (a block memory's blocks: `memory/summaries.py`)."""
    return [t[:, 0, 0] for t in page_summary(kind, keys[:, None], held[:, None], keys.shape[1])]


def summary_fields(kind: str) -> list[tuple[torch.dtype, float]]:
    """(dtype, value of an empty page) of each tensor of a summary of `kind`."""
    return [(BOUND_DTYPE, float("inf")), (BOUND_DTYPE, float("-inf"))] if kind == "quest" else [(torch.float32, 0.0)]


def summary_nbytes(kind: str, head_dim: int) -> int:
    """Bytes of one page's summary of `kind`: two float16 key rows (quest) or one float32 row."""
    return sum(head_dim * torch.empty(0, dtype=dtype).element_size() for dtype, _ in summary_fields(kind))


def _page_at(summary: torch.Tensor, slot: torch.Tensor, fill: float, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`summary` (batch, kv_heads, pages, head_dim) grown with pages of `fill` until it holds
    every (batch, kv_heads) `slot`'s page, and that page's index, shaped for gather/scatter
    (batch, kv_heads, 1, head_dim)."""
    needed = int(slot.max()) // page + 1 if slot.numel() else 0
    if needed > summary.shape[2]:
        summary = torch.nn.functional.pad(summary, (0, 0, 0, needed - summary.shape[2]), value=fill)
    index = (slot // page).clamp(max=summary.shape[2] - 1)[..., None, None].expand(-1, -1, 1, summary.shape[-1])
    return summary, index


def grow_summary(
    kind: str,
    summary: list[torch.Tensor],  # each (batch, kv_heads, pages, head_dim)
    key: torch.Tensor,  # (batch, kv_heads, head_dim): each row's newest entry
    slot: torch.Tensor,  # (batch, kv_heads) its slot (the row's length before it)
    added: torch.Tensor,  # (batch, kv_heads) bool: rows that took one (padding steps did not)
    page: int = PAGE,  # entries per page
) -> list[torch.Tensor]:
    """The summary after one entry per row was appended at `slot`, in the rows where `added`:
    that slot's page widens to hold it (quest) or adds it (centroid); a page is grown where the
    slot begins one."""
    if kind == "quest":
        least, index = _page_at(summary[0], slot, float("inf"), page)
        most, _ = _page_at(summary[1], slot, float("-inf"), page)
        key = key.to(BOUND_DTYPE)[:, :, None]
        low = key.masked_fill(~added[..., None, None], float("inf"))  # a row that took nothing keeps its bounds
        high = key.masked_fill(~added[..., None, None], float("-inf"))
        least = least.scatter(2, index, torch.minimum(least.gather(2, index), low))
        most = most.scatter(2, index, torch.maximum(most.gather(2, index), high))
        return [least, most]
    sums, index = _page_at(summary[0], slot, 0.0, page)
    return [sums.scatter_add(2, index, (key.float() * added[..., None])[:, :, None])]


def page_scores(
    kind: str,
    query: torch.Tensor,  # (batch, q_heads, 1, head_dim): one decoding step's queries
    summary: list[torch.Tensor],  # each (batch, kv_heads, pages, head_dim)
    lengths: torch.Tensor,  # (batch, kv_heads) entries held per row
    page: int = PAGE,  # entries per page
) -> torch.Tensor:  # (batch, kv_heads, pages) float32; -inf past a row's last page
    """Each page's estimate of the query's attention to it, the highest over the GQA group."""
    batch, q_heads, _, dim = query.shape
    heads, pages = summary[0].shape[1], summary[0].shape[2]
    lengths = lengths.to(query.device)
    live = torch.arange(pages, device=query.device) < page_count(lengths, page)[..., None]  # (batch, kv_heads, pages)
    q = query.float().view(batch, heads, q_heads // heads, dim)
    if kind == "quest":
        lo = summary[0].float().masked_fill(~live[..., None], 0.0)
        hi = summary[1].float().masked_fill(~live[..., None], 0.0)
        score = torch.einsum("bhgd,bhpd->bhgp", q.clamp(min=0), hi) + torch.einsum("bhgd,bhpd->bhgp", q.clamp(max=0), lo)
    else:
        held = (lengths[..., None] - torch.arange(pages, device=query.device) * page).clamp(0, page)  # (batch, kv_heads, pages)
        mean = summary[0] / held.clamp(min=1)[..., None]
        score = torch.einsum("bhgd,bhpd->bhgp", q, mean)
    return score.amax(2).masked_fill(~live, float("-inf"))


def chosen_pages(
    score: torch.Tensor,  # (batch, kv_heads, pages) from `page_scores`
    lengths: torch.Tensor,  # (batch, kv_heads) entries held per row
    fraction: float,  # of each row's pages read, rounded up
    page: int = PAGE,  # entries per page
) -> tuple[torch.Tensor, torch.Tensor]:  # (batch, kv_heads, W) page indices, (batch, kv_heads, W) bool
    """The pages a decoding step reads: in each row, those that score highest, `fraction` of the
    row's pages rounded up, always its first page (the attention sinks) and its last (the newest
    entries, the step's own among them), in time order. Returns page indices (unused columns,
    last, point at the row's page 0) and which columns are used."""
    pages = score.shape[2]
    counts = page_count(lengths.to(score.device), page)  # (batch, kv_heads)
    page_ids = torch.arange(pages, device=score.device)
    live = page_ids < counts[..., None]
    always = (page_ids == 0) | (page_ids == (counts - 1).clamp(min=0)[..., None])
    score = score.masked_fill(always, float("inf")).masked_fill(~live, float("-inf"))
    wanted = torch.minimum(counts, torch.ceil(counts * fraction).long().clamp(min=2))  # (batch, kv_heads)
    width = max(int(wanted.max()), 1)
    top = score.topk(min(width, pages), dim=-1).indices  # (batch, kv_heads, W)
    used = torch.arange(top.shape[-1], device=score.device) < wanted[..., None]
    top, _ = torch.where(used, top, pages).sort(-1)  # time order; unused columns last
    used = top < pages
    return top.masked_fill(~used, 0), used


def entries_read(lengths: torch.Tensor, used: torch.Tensor, page: int = PAGE) -> torch.Tensor:
    """(batch, kv_heads) entries the pages `chosen_pages` picked hold, (batch, kv_heads, W) `used`:
    whole pages but the row's last (always chosen), which holds what is left (0 for an empty row)."""
    lengths = lengths.to(used.device)
    in_last = lengths - (lengths - 1).div(page, rounding_mode="floor") * page  # 1 .. page; page for an empty row
    return (used.sum(-1) - 1) * page + in_last


def chosen_slots(
    score: torch.Tensor,  # (batch, kv_heads, pages) from `page_scores`
    lengths: torch.Tensor,  # (batch, kv_heads) entries held per row
    fraction: float,  # of each row's pages read, rounded up
    page: int = PAGE,
) -> tuple[torch.Tensor, torch.Tensor]:  # (batch, kv_heads, K) slots, (batch, kv_heads, K) bool
    """The slots of the pages `chosen_pages` picks: slot indices (clamped to a real slot) and
    which of them are read (False: unused columns, or past the row)."""
    lengths = lengths.to(score.device)
    top, used = chosen_pages(score, lengths, fraction, page)
    slots = top[..., None] * page + torch.arange(page, device=score.device)  # (batch, kv_heads, W, page)
    read = used[..., None] & (slots < lengths[..., None, None])
    slots, read = slots.flatten(2), read.flatten(2)
    return slots.clamp(max=max(int(lengths.max()) - 1, 0)), read
