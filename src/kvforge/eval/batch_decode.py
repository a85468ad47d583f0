"""Decoding throughput at several batch sizes, per policy and quantization mode.

For each (length, policy, quant) one prompt is prefilled and compressed once; its cache is forked
into B sequences (copy on write) and stacked into one batch, which decodes greedily. The first
step (where each fork copies the rows it writes) is not timed; the next `decode_tokens` are. So a
batch of 32 at 32k tokens costs one prefill, not 32. Bytes are read from the tensors held; the
peak is the allocator's (CUDA) or the process's (CPU) growth during the timed steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvforge.cache import KVCache
from kvforge.eval.bench import MIB, PeakMeter, bench_ids, sync
from kvforge.generate import DECODE, check_length, feed, prefill
from kvforge.models import LoadedModel
from kvforge.policies.base import Policy
from kvforge.storage import DEFAULT_LAYOUT, QuantSpec
from kvforge.storage.codec import labelled

log = logging.getLogger(__name__)


@dataclass
class DecodeRow:
    length: int  # prompt tokens of each sequence
    batch: int
    policy: str
    ratio: float
    quant: str
    tokens_per_s: float  # batch x timed steps / their seconds
    ms_per_step: float  # one step of the whole batch
    cache_bytes: int  # K/V allocated for the whole batch when the timed steps start
    peak_bytes: int  # growth during the timed steps
    peak_source: str


@torch.inference_mode()
def _measure(
    loaded: LoadedModel, ids: list[int], batch: int, policy: Policy, spec: QuantSpec, steps: int, meter: PeakMeter, layout: str
) -> DecodeRow:
    model, device = loaded.model, loaded.model.device
    base = KVCache(model, policy, tokenizer=loaded.tokenizer, quant=spec, layout=layout)
    logits = prefill(model, base, ids)  # (vocab,)
    cache = KVCache.stack([base] + [base.fork() for _ in range(batch - 1)], take=True) if batch > 1 else base
    del base
    positions = torch.full((batch,), len(ids), device=device)
    tokens = [int(logits.argmax())] * batch
    step_logits, positions = feed(model, cache, [[t] for t in tokens], positions, DECODE)  # untimed: forks copy here
    held = cache.nbytes
    meter.start()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        tokens = step_logits.argmax(-1).tolist()  # the host loop's one read per step
        step_logits, positions = feed(model, cache, [[t] for t in tokens], positions, DECODE)
    sync(device)
    seconds = time.perf_counter() - start
    peak = meter.stop()
    return DecodeRow(len(ids), batch, policy.written_name, policy.ratio, spec.label, batch * steps / seconds, seconds / steps * 1e3, held, peak, meter.source)


def run_batched_decode(
    loaded: LoadedModel,
    lengths: list[int],
    batches: list[int],
    policies: list[Policy],
    quants: list[QuantSpec],
    decode_tokens: int = 32,
    on_row: Callable[[DecodeRow], None] | None = None,
    layout: str = DEFAULT_LAYOUT,
) -> list[DecodeRow]:
    if not batches or min(batches) < 1:
        raise ValueError(f"batches={batches!r} must be positive integers")
    meter = PeakMeter(loaded.model.device)
    rows = []
    for length in lengths:
        check_length(length, decode_tokens + 1, loaded.context_length)
        ids = bench_ids(loaded, length)
        for batch in batches:
            for spec in quants:
                for policy in policies:
                    row = _measure(loaded, ids, batch, policy, spec, decode_tokens, meter, layout)
                    log.info("%d x %d, %s %s: %.1f tok/s", length, batch, policy.written_name, spec.label, row.tokens_per_s)
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
    return rows


def format_decode_table(rows: list[DecodeRow]) -> str:
    """One line per row; tok/s with its ratio to the full-precision full cache of the same
    length and batch, where the run has one."""
    full = {(r.length, r.batch): r for r in rows if r.policy == "full" and r.quant == "none"}
    lines = ["| tokens | batch | policy | ratio | decode tok/s | ms/step | cache MiB | peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = full.get((r.length, r.batch))
        vs = f" ({r.tokens_per_s / ref.tokens_per_s:.2f}x)" if ref is not None else ""
        lines.append(
            f"| {r.length} | {r.batch} | {labelled(r.policy, r.quant)} | {r.ratio:g} | {r.tokens_per_s:.1f}{vs} | "
            f"{r.ms_per_step:.1f} | {r.cache_bytes / MIB:.1f} | {r.peak_bytes / MIB:.1f} |"
        )
    return "\n".join(lines)
