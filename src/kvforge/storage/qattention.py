"""Attention over quantized storage (`quantized.py`): every part (one per bit width) and the
full-precision tail in one softmax, reading at most BLOCK quantized tokens per row at a time.

Every part is read by `qpart.Reader` (scales folded into the query and the probabilities, no
full-precision K/V built): as it lies when its rows hold the same whole key groups, else padded to
whole groups with its empty slots masked. Quantized entries are older than every query, so only
the tail needs a causal mask.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kvforge.reading import causal_allowed
from kvforge.storage.qpart import Part, Reader
from kvforge.storage.segments import Segments

BLOCK = 4096  # quantized tokens read at once per row (a bounded transient: BLOCK x head_dim floats per row)
QUERY_CHUNK = 128  # queries of a prompt chunk attended at once over the quantized parts


def blocks(part: Part, slots: int | None = None) -> list[tuple[int, int]]:
    """Slot ranges of at most about BLOCK tokens, aligned to whole key groups, over `slots`
    (default: the part's longest row)."""
    slots = part.quant.longest if slots is None else slots
    step = max(BLOCK // part.spec.group, 1) * part.spec.group
    return [(start, min(start + step, slots)) for start in range(0, slots, step)]


def tail_allowed(tail: Segments, positions: torch.Tensor) -> torch.Tensor:
    """(batch, heads, T, St) bool: which tail entries each of the chunk's queries may read."""
    return causal_allowed(tail.padded("pos").long(), tail.slot_rows()[1], positions)


def attention_chunks(
    all_parts: list[Part],
    tail: Segments,  # k, v, pos: the full-precision entries (see quantized.py)
    query: torch.Tensor,  # (batch, q_heads, T, head_dim): the chunk's queries
    positions: torch.Tensor,  # (T,)
    valid: torch.Tensor,  # (batch, T)
    scaling: float,
    received: bool,
) -> Iterator[tuple[int, torch.Tensor, list[torch.Tensor | None] | None]]:
    """For each chunk of queries: (first query, output (batch, q_heads, c, dim), and with
    `received` the attention each source's slots received (per part, then the tail:
    (batch, heads, slots)), summed over the chunk's valid queries and averaged over each GQA
    group)."""
    batch, q_heads, t, dim = query.shape
    heads = tail.lengths.shape[1]
    group = q_heads // heads
    active = [i for i, p in enumerate(all_parts) if p.quant.entries]
    parts = [all_parts[i] for i in active]
    readers = [Reader(p) for p in parts]
    spans_of = [blocks(p, r.width) for p, r in zip(parts, readers)]
    widths = [b[-1][1] for b in spans_of]
    q_valid = [
        r.valid if r.valid is not None else torch.arange(w, device=query.device) < p.quant.lengths[..., None]
        for w, p, r in zip(widths, parts, readers)
    ]
    tail_k, tail_v = tail.padded("k").float(), tail.padded("v").float()
    tail_valid = tail.slot_rows()[1]
    # (batch, heads, T, St); one query reads its whole tail (every entry held is in its past)
    allowed_t = tail_valid[:, :, None] if t == 1 else tail_allowed(tail, positions)
    for first in range(0, t, QUERY_CHUNK):
        last = min(first + QUERY_CHUNK, t)
        c = last - first
        q = query[:, :, first:last].float().reshape(batch, heads, group * c, dim) * scaling
        logits = []
        for reader, spans, ok in zip(readers, spans_of, q_valid):
            part_logits = torch.cat([reader.logits(q, a, b) for a, b in spans], -1)
            logits.append(part_logits if reader.valid is None else part_logits.masked_fill_(~ok[:, :, None], float("-inf")))
        logits_t = (q @ tail_k.transpose(-1, -2)).view(batch, heads, group, c, -1)
        logits_t = logits_t.masked_fill_(~allowed_t[:, :, None, first:last], float("-inf")).view(batch, heads, group * c, -1)
        probs = torch.softmax(torch.cat([*logits, logits_t], -1), dim=-1).split([*widths, logits_t.shape[-1]], -1)
        out = probs[-1] @ tail_v
        for reader, spans, p in zip(readers, spans_of, probs):
            for a, b in spans:
                out += reader.output(p[..., a:b], a, b)
        got = None
        if received:
            weight = valid[:, None, None, first:last, None].float() / group  # (batch, 1, 1, c, 1)
            sums = [(p.view(batch, heads, group, c, -1) * weight).sum((2, 3)) for p in probs]
            # One entry per source, in order (None for a part holding nothing).
            got = [None] * len(all_parts) + [sums[-1]]
            for j, i in enumerate(active):
                index = readers[j].index  # a padded part's slots back to the compact picture's
                got[i] = sums[j] if index is None else torch.gather(sums[j], 2, index)
        yield first, out.view(batch, q_heads, c, dim), got
