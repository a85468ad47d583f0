"""The largest batch that fits a memory limit, per policy and quantization mode, found by trying.

For each (length, policy, quant) one prompt is prefilled and compressed once. A try at batch B
forks that cache into B sequences (copy on write), stacks them and decodes `steps` greedy steps:
the first step makes every fork copy the rows it writes, so the try holds B sequences of its own
beside the prefilled one they were forked from (which the count leaves out: the search is
conservative by that one sequence, for every row alike). A try fits when it ran without running
out of memory and its measured peak stayed within the limit:

- on CUDA the allocator is capped at the limit (`set_per_process_memory_fraction`), so a batch
  too large fails as it would in a server, and the peak is `max_memory_allocated` (weights, the
  prefilled sequence, the batch and every transient);
- on the CPU nothing caps the process: the peak is the bytes held when the try starts (the model's
  parameters and the prefilled cache, read from their tensors) plus the process's peak growth
  during the try (`PeakMeter`).

The search doubles the batch from 1 until a try does not fit (or `max_batch` is reached), then
bisects between the last fit and the first failure. Nothing is computed from a formula.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from kvforge.cache import KVCache
from kvforge.eval.bench import MIB, PeakMeter, bench_ids, sync
from kvforge.generate import DECODE, check_length, feed, prefill
from kvforge.models import LoadedModel
from kvforge.policies.base import Policy
from kvforge.storage import QuantSpec
from kvforge.storage.codec import labelled

log = logging.getLogger(__name__)

GIB = 1024 * MIB


@dataclass
class FitTry:
    batch: int
    fits: bool
    peak_bytes: int | None  # measured peak of the try (None: it ran out of memory)


@dataclass
class FitRow:
    length: int
    policy: str
    ratio: float
    quant: str
    limit_bytes: int
    largest_batch: int  # 0: not even one sequence fits
    seq_cache_bytes: int  # K/V allocated for the one prefilled sequence
    peak_bytes: int | None  # the measured peak at largest_batch
    capped: bool  # the search stopped at max_batch, so more might fit
    peak_source: str
    tries: list[FitTry] = field(default_factory=list)


def search_largest(fits: Callable[[int], FitTry], max_batch: int) -> tuple[int, list[FitTry]]:
    """The largest batch in [0, max_batch] for which `fits` says yes, assuming a batch that fits
    makes every smaller one fit; every try made, in order."""
    tries: list[FitTry] = []

    def attempt(batch: int) -> bool:
        tries.append(fits(batch))
        return tries[-1].fits

    good, batch = 0, 1
    while attempt(batch):
        good = batch
        if batch == max_batch:
            return good, tries
        batch = min(2 * batch, max_batch)
    bad = batch
    while bad - good > 1:
        middle = (good + bad) // 2
        if attempt(middle):
            good = middle
        else:
            bad = middle
    return good, tries


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def capped_allocator(device: torch.device, limit: int) -> Iterator[None]:
    """On CUDA, let the allocator hand out at most `limit` bytes within the block."""
    if device.type != "cuda":
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def _try_batch(
    loaded: LoadedModel, base: KVCache, logits: torch.Tensor, length: int, batch: int, steps: int, limit: int, meter: PeakMeter
) -> FitTry:
    model, device = loaded.model, loaded.model.device
    held = sum(p.nbytes for p in model.parameters()) + base.nbytes  # CPU: what the try starts beside
    meter.start()
    try:
        _decode_forks(loaded, base, logits, length, batch, steps)
        ran = True
    except torch.OutOfMemoryError:
        ran = False  # what the try held is freed below, once the exception (and the frames it holds) is gone
    peak = meter.stop() + (meter.before if device.type == "cuda" else held)
    _free(device)
    if not ran:
        log.info("batch %d: out of memory", batch)
        return FitTry(batch, False, None)
    log.info("batch %d: peak %.2f GiB of %.2f", batch, peak / GIB, limit / GIB)
    return FitTry(batch, peak <= limit, peak)


def _decode_forks(loaded: LoadedModel, base: KVCache, logits: torch.Tensor, length: int, batch: int, steps: int) -> None:
    """`batch` forks of `base` decode `steps` greedy steps together; what they hold is dropped on return."""
    device = loaded.model.device
    cache = KVCache.stack([base.fork() for _ in range(batch)], take=True)
    positions = torch.full((batch,), length, device=device)
    tokens = [int(logits.argmax())] * batch
    for _ in range(steps):
        step_logits, positions = feed(loaded.model, cache, [[t] for t in tokens], positions, DECODE)
        tokens = step_logits.argmax(-1).tolist()
    sync(device)


@torch.inference_mode()
def run_fit(
    loaded: LoadedModel,
    lengths: list[int],
    policies: list[Policy],
    quants: list[QuantSpec],
    limit: int,
    max_batch: int = 1024,
    steps: int = 4,
    prefill_chunk: int | None = None,
    on_row: Callable[[FitRow], None] | None = None,
) -> list[FitRow]:
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch} must be at least 1")
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1 (the first step makes the forks copy what they hold)")
    device = loaded.model.device
    meter = PeakMeter(device)
    rows = []
    with capped_allocator(device, limit):
        for length in lengths:
            check_length(length, steps, loaded.context_length)
            ids = bench_ids(loaded, length)
            for spec in quants:
                for policy in policies:
                    _free(device)
                    base = KVCache(loaded.model, policy, tokenizer=loaded.tokenizer, quant=spec)
                    try:
                        logits = prefill(loaded.model, base, ids, prefill_chunk)
                    except torch.OutOfMemoryError:
                        del base
                        _free(device)
                        raise ValueError(
                            f"--fit-memory {limit / GIB:.1f} GiB: one prefill of {len(ids)} tokens ({policy.full_name}, "
                            f"{spec.mode}) does not fit; raise the limit or prefill in chunks (--prefill-chunk)"
                        ) from None
                    best, tries = search_largest(lambda b: _try_batch(loaded, base, logits, len(ids), b, steps, limit, meter), max_batch)
                    peak = next((t.peak_bytes for t in tries if t.batch == best), None)
                    row = FitRow(len(ids), policy.written_name, policy.ratio, spec.label, limit, best, base.nbytes, peak,
                                 best == max_batch, meter.source, tries)  # fmt: skip
                    del base, logits
                    log.info("%d tokens, %s: %d fit in %.1f GiB", len(ids), labelled(policy.written_name, spec.label), best, limit / GIB)
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
    return rows


def format_fit_table(rows: list[FitRow]) -> str:
    """One line per row; the batch and the bytes per sequence each with their ratio to the
    full-precision full cache of the same length, where the run has one."""
    full = {r.length: r for r in rows if r.policy == "full" and r.quant == "none"}
    head = "| tokens | policy | ratio | limit GiB | largest batch (vs full) | MiB per sequence (full / this) | peak GiB | tries |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        ref = full.get(r.length)
        grown = f" ({r.largest_batch / ref.largest_batch:.2f}x)" if ref is not None and ref.largest_batch else ""
        shrunk = f" ({ref.seq_cache_bytes / r.seq_cache_bytes:.2f}x)" if ref is not None and r.seq_cache_bytes else ""
        peak = "-" if r.peak_bytes is None else f"{r.peak_bytes / GIB:.2f}"
        most = "+" if r.capped else ""
        lines.append(
            f"| {r.length} | {labelled(r.policy, r.quant)} | {r.ratio:g} | {r.limit_bytes / GIB:.1f} | {r.largest_batch}{most}{grown} | "
            f"{r.seq_cache_bytes / MIB:.1f}{shrunk} | {peak} | {len(r.tries)} |"
        )
    return "\n".join(lines)
