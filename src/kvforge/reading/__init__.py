"""Reading what a layer holds: attention over it, and the attention each held entry receives.

- `dense.py`: the torch math over dense (batch, heads, slots, head_dim) pictures and masks: the
  reference, and the CPU's path;
- `rows.py`: what the kernels read: rows (sequence, KV head) described by addresses, offsets and
  lengths, so a layout is read where it lies, and the calls into the kernels;
- `pages.py`: reading less: page summaries of the held keys and the pages a decoding step reads;
- `kernels/`: the Triton kernels (decoding, attention received), chosen on CUDA (`kernels.enabled`)
  and tested on the CPU under Triton's interpreter.

The layouts (`kvforge.storage`) read themselves through this package only; nothing here imports
the layouts, the cache or the attention function transformers calls (`kvforge.attention`).
"""

from kvforge.reading import kernels
from kvforge.reading.dense import (
    all_real,
    attend,
    attend_at,
    attention_probs_sum,
    causal_allowed,
    every_real,
    probe_attention,
    received_attention,
)
from kvforge.reading.pages import PAGE, block_summary, chosen_pages, chosen_slots, entries_read, grow_summary, page_scores, page_summary, summary_fields, summary_nbytes
from kvforge.reading.rows import DenseRows, KeyRows, PagedRows, QuantRows, Source, decode, dense_rows, key_rows, received

__all__ = [
    "PAGE", "DenseRows", "KeyRows", "PagedRows", "QuantRows", "Source", "all_real", "attend", "attend_at", "attention_probs_sum", "block_summary", "causal_allowed",
    "chosen_pages", "chosen_slots", "decode", "dense_rows", "entries_read", "every_real", "grow_summary", "kernels", "key_rows", "page_scores", "page_summary",
    "probe_attention", "received", "received_attention", "summary_fields", "summary_nbytes",
]  # fmt: skip
