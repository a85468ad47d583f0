"""Speed and memory of each policy against the full cache, measured in one run on the same input.

For every prompt length one prompt is built and every policy prefills exactly the same ids, so
differences between rows come from the policy alone. Per (length, policy) we measure:

- prefill time (the prefill forward, compression included, since it runs inside it),
- time the policy itself spent (`KVCache.policy_seconds`),
- greedy decode throughput after the prefill,
- bytes of K/V held after the prefill, read from the stored tensors,
- peak memory during prefill and compression, read from the allocator (CUDA) or from the
  operating system (CPU peak RSS). Memory is never computed from a formula.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvforge.cache import KVCache
from kvforge.eval.baselines import BASELINES, DYNAMIC, Baseline, held_nbytes
from kvforge.eval.tasks import make_case
from kvforge.attention import enable
from kvforge.generate import build_prompt, check_chunk, check_length, greedy, prefill
from kvforge.models import LoadedModel
from kvforge.policies.base import Policy
from kvforge.policies.registry import make_policy
from kvforge.storage import DEFAULT_LAYOUT, QuantSpec
from kvforge.storage.codec import labelled

log = logging.getLogger(__name__)

FULL = "full"
WARMUP_TOKENS = 32  # long enough that compressing policies actually compress during warm-up
MIB = 1024 * 1024

# Where peak_bytes came from, recorded per row so a reader knows how far to trust it.
PEAK_CUDA = "cuda max_memory_allocated"
PEAK_PROC = "/proc/self/status VmHWM (reset via clear_refs)"
PEAK_RUSAGE = "getrusage ru_maxrss growth (lower bound: the process peak cannot be reset)"

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")

# The ratios to the full row of the same length that ratios_to_full adds, as `<field>_vs_full`.
VS_FULL_FIELDS = ("prefill_seconds", "decode_tokens_per_s", "cache_bytes", "peak_cache_bytes", "peak_bytes")


@dataclass
class BenchRow:
    """One policy (or the plain transformers baseline) at one prompt length."""

    length: int  # prompt tokens actually prefilled
    policy: str  # a kvforge policy, or DYNAMIC for plain transformers
    ratio: float
    prefill_chunk: int | None  # tokens per prefill chunk; None: the prompt in one forward
    prefill_seconds: float  # the prefill forward(s), compression inside them included
    compress_seconds: float  # of which spent in the policy (observe + select + keep)
    decode_tokens_per_s: float  # greedy single-token forwards after the prefill
    cache_bytes: int  # K/V bytes allocated after the prefill (spare capacity included)
    kept_bytes: int  # K/V bytes of the entries kept after the prefill
    peak_cache_bytes: int  # the most K/V bytes allocated at once during the prefill
    dense_bytes: int  # K/V bytes an uncompressed cache would hold for the same tokens
    peak_bytes: int  # peak process memory growth during prefill + compression
    peak_source: str  # how peak_bytes was measured (see PEAK_*)
    device: str
    quant: str = "none"  # how entries are held
    bits_per_element: float = 0.0  # effective, after the prefill (codes, scales, full-precision tail)

    @property
    def label(self) -> str:
        label = labelled(self.policy, self.quant)
        return label if self.prefill_chunk is None else f"{label} chunk {self.prefill_chunk}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# --- peak memory -------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status, in KiB."""
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not found in {STATUS}")


def _maxrss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018  glibc only
    except (OSError, AttributeError, TypeError):
        return None
    return libc


_LIBC = _load_libc()


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS, so memory a previous run freed but kept resident
    does not hide the next run's growth in RSS (which would favour whichever policy ran later)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class PeakMeter:
    """Peak memory growth over a block: `start()`, run, then `stop()` returns bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.source = PEAK_CUDA if self.cuda else self._cpu_source()
        self.before = 0

    @staticmethod
    def _cpu_source() -> str:
        try:
            CLEAR_REFS.write_text("5")
            _status_kib("VmHWM")
        except OSError as err:
            log.warning("cannot reset the peak RSS (%s); peak memory falls back to getrusage, a lower bound", err)
            return PEAK_RUSAGE
        return PEAK_PROC

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return
        _release_freed_memory()
        if self.source == PEAK_PROC:
            CLEAR_REFS.write_text("5")  # VmHWM := current RSS
            self.before = _status_kib("VmRSS") * 1024
        else:
            self.before = _maxrss_bytes()

    def stop(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.source == PEAK_PROC:
            peak = _status_kib("VmHWM") * 1024
        else:
            peak = _maxrss_bytes()
        return max(0, peak - self.before)


# --- prompts and timing ------------------------------------------------------------------


def bench_ids(loaded: LoadedModel, length: int) -> list[int]:
    """Prompt ids of `length` tokens (fewer only if the tokenizer cannot make that many):
    a needle-in-a-haystack prompt, cut to length, the same for every policy."""
    target = max(length, 256)  # a needle prompt has a minimum size; short prompts are cut from it
    ids: list[int] = []
    for _ in range(4):  # the haystack is sized approximately; grow it until the prompt is long enough
        case = make_case(loaded.tokenizer, "niah_single", target, seed=0, chat=loaded.is_instruct)
        prompt = build_prompt(loaded.tokenizer, case.context, case.question, chat=loaded.is_instruct, answer_prefix=case.answer_prefix)
        ids = prompt.ids
        if len(ids) >= length:
            return ids[:length]
        target += length - len(ids)
    log.warning("asked for a %d-token prompt, got %d tokens", length, len(ids))
    return ids


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a clock read after it measures that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Measure:
    prefill_seconds: float
    compress_seconds: float
    decode_seconds: float
    cache_bytes: int
    kept_bytes: int
    peak_cache_bytes: int
    dense_bytes: int
    peak_bytes: int
    bits_per_element: float


def _measure_once(
    loaded: LoadedModel,
    ids: list[int],
    policy: Policy,
    decode_tokens: int,
    meter: PeakMeter,
    chunk: int | None,
    quant: QuantSpec | None = None,
    layout: str = DEFAULT_LAYOUT,
) -> _Measure:
    model = loaded.model
    cache = KVCache(model, policy, tokenizer=loaded.tokenizer, quant=quant, layout=layout)
    meter.start()
    start = time.perf_counter()
    logits = prefill(model, cache, ids, chunk)
    sync(meter.device)
    prefill_seconds = time.perf_counter() - start
    peak = meter.stop()
    # Read the sizes before decoding grows the cache.
    sizes = (cache.nbytes, cache.kept_nbytes, cache.peak_nbytes, cache.dense_nbytes)
    bits = cache.bits_per_element
    compress = cache.policy_seconds

    # greedy() runs one forward per token after the first, so decode_tokens + 1 tokens time
    # exactly decode_tokens forwards; no stop ids, so every row decodes the same count.
    start = time.perf_counter()
    greedy(model, cache, logits[None], torch.tensor([len(ids)], device=model.device), decode_tokens + 1, stop_ids=set())
    sync(meter.device)
    decode = time.perf_counter() - start
    del cache, logits
    return _Measure(prefill_seconds, compress, decode, *sizes, peak, bits)


def _measure_transformers(loaded: LoadedModel, ids: list[int], decode_tokens: int, meter: PeakMeter, baseline: Baseline) -> _Measure:
    """Plain transformers: one of its own caches with its SDPA attention, kvforge switched off."""
    model = loaded.model
    model.set_attn_implementation("sdpa")
    try:
        cache = baseline.make(model.config)
        meter.start()
        start = time.perf_counter()
        out = model(input_ids=torch.tensor([ids], device=model.device), past_key_values=cache, use_cache=True, logits_to_keep=1)
        sync(meter.device)
        prefill_seconds = time.perf_counter() - start
        peak = meter.stop()
        held = held_nbytes(cache)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            token = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        sync(meter.device)
        decode = time.perf_counter() - start
    finally:
        enable(model)
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # Elements a dense cache holds for these tokens (K and V), to state bits per element.
    elements = 2 * len(ids) * config.num_hidden_layers * config.num_key_value_heads * head_dim
    dense = elements * model.dtype.itemsize
    return _Measure(prefill_seconds, 0.0, decode, held, held, held, dense, peak, 8 * held / elements)


def _with_full_first(policies: list[Policy]) -> list[Policy]:
    """The full cache first (added if missing): every other row is compared with it."""
    full = [p for p in policies if p.name == FULL]
    rest = [p for p in policies if p.name != FULL]
    return (full[:1] or [make_policy(FULL)]) + rest


@torch.inference_mode()
def run_bench(
    loaded: LoadedModel,
    lengths: list[int],
    policies: list[Policy],
    decode_tokens: int = 32,
    repeats: int = 1,
    prefill_chunk: int | None = None,
    baselines: list[Baseline] | None = None,
    on_row: Callable[[BenchRow], None] | None = None,
    quants: list[QuantSpec] | None = None,
    layout: str = DEFAULT_LAYOUT,
) -> list[BenchRow]:
    """Benchmark every policy at every prompt length against the full cache.

    Per length: transformers' own caches (`baselines`; default: DynamicCache), then every policy
    with a one-shot prefill, then (with `prefill_chunk`) every policy again prefilled chunk by chunk.
    Times are the minimum over `repeats` (the least disturbed run); peak memory is the maximum
    (on CPU, pages still resident from earlier runs can only hide growth, never add it).
    `on_row` is called with each row as soon as it is measured. `quants`: every policy once per
    quantization mode (default: full precision only); the reference stays the full-precision full.
    `layout`: how kvforge's rows hold full-precision entries (`kvforge.storage.LAYOUTS`).
    """
    specs = quants or [QuantSpec()]
    baselines = [BASELINES["dynamic"]] if baselines is None else baselines
    if not lengths or any(n < 1 for n in lengths):
        raise ValueError(f"lengths={lengths!r} must be a non-empty list of positive token counts")
    if decode_tokens < 1:
        raise ValueError(f"decode_tokens={decode_tokens} must be at least 1")
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    check_chunk(prefill_chunk)
    for n in lengths:
        check_length(n, decode_tokens, loaded.context_length)
    policies = _with_full_first(policies)
    chunks: list[int | None] = [None] if prefill_chunk is None else [None, prefill_chunk]
    device = loaded.model.device
    meter = PeakMeter(device)

    # Untimed warm-up on a short prompt: first-call costs (kernel selection, lazy allocations,
    # each policy's code paths) would otherwise land in whichever row runs first.
    warm = bench_ids(loaded, WARMUP_TOKENS)
    for baseline in baselines:
        _measure_transformers(loaded, warm, 1, meter, baseline)
    for policy in policies:
        for chunk in chunks:
            for spec in specs:
                _measure_once(loaded, warm, policy, 1, meter, chunk and min(chunk, WARMUP_TOKENS // 2), spec, layout)

    rows: list[BenchRow] = []
    for length in lengths:
        ids = bench_ids(loaded, length)
        jobs: list[tuple[str, float, int | None, str, Callable[[], _Measure]]] = []
        for baseline in baselines:
            run = lambda b=baseline: _measure_transformers(loaded, ids, decode_tokens, meter, b)  # noqa: E731
            jobs.append((baseline.label, 0.0, None, baseline.quant, run))
        for chunk in chunks:
            for spec in specs:
                for policy in policies:
                    run = lambda p=policy, c=chunk, q=spec: _measure_once(loaded, ids, p, decode_tokens, meter, c, q, layout)  # noqa: E731
                    jobs.append((policy.written_name, policy.ratio, chunk, spec.label, run))
        for name, ratio, chunk, mode, run in jobs:
            runs = [run() for _ in range(repeats)]
            decode = min(r.decode_seconds for r in runs)
            row = BenchRow(
                length=len(ids),
                policy=name,
                ratio=ratio,
                prefill_chunk=chunk,
                prefill_seconds=min(r.prefill_seconds for r in runs),
                compress_seconds=min(r.compress_seconds for r in runs),
                decode_tokens_per_s=decode_tokens / decode if decode > 0 else float("inf"),
                cache_bytes=runs[0].cache_bytes,
                kept_bytes=runs[0].kept_bytes,
                peak_cache_bytes=runs[0].peak_cache_bytes,
                dense_bytes=runs[0].dense_bytes,
                peak_bytes=max(r.peak_bytes for r in runs),
                peak_source=meter.source,
                device=str(device),
                quant=mode,
                bits_per_element=round(runs[0].bits_per_element, 3),
            )
            log.info(
                "%d tokens, %s ratio %.3g: prefill %.4fs, %.1f tok/s, cache %d B, peak %d B",
                row.length, row.label, row.ratio, row.prefill_seconds, row.decode_tokens_per_s, row.cache_bytes, row.peak_bytes,
            )  # fmt: skip
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


@dataclass
class BatchRow:
    """Decoding a batch of prompts: equal lengths, or unequal ones with the same total."""

    policy: str
    ratio: float
    lengths: list[int]  # prompt tokens of each sequence
    step_seconds: float  # one decoding step of the whole batch (min over repeats)
    cache_bytes: int  # K/V bytes allocated when decoding starts
    kept_bytes: int


def batch_lengths(length: int, batch: int) -> tuple[list[int], list[int]]:
    """Equal lengths, and lengths spread evenly over [length / 2, 3 * length / 2] with the same
    total (so both batches hold the same number of tokens)."""
    equal = [length] * batch
    if batch == 1:
        return equal, equal
    spread = [round(length / 2 + i * length / (batch - 1)) for i in range(batch)]
    spread[-1] += length * batch - sum(spread)
    return equal, spread


@torch.inference_mode()
def run_batch_bench(
    loaded: LoadedModel, length: int, batch: int, policy: Policy, decode_tokens: int = 16, repeats: int = 1
) -> list[BatchRow]:
    """Per-step decode time of `batch` equal prompts against `batch` unequal ones (same total).

    Each prompt is prefilled alone (compressed by `policy`), the caches are stacked into one
    batch, and the batch decodes greedily; only decoding is timed."""
    if batch < 1:
        raise ValueError(f"batch={batch} must be at least 1")
    model = loaded.model
    equal, spread = batch_lengths(length, batch)
    check_length(max(spread), decode_tokens, loaded.context_length)
    full_ids = bench_ids(loaded, max(spread))
    out = []
    for lengths in (equal, spread):
        times = []
        for _ in range(repeats):
            caches, firsts = [], []
            for n in lengths:
                cache = KVCache(model, policy, tokenizer=loaded.tokenizer)
                firsts.append(prefill(model, cache, full_ids[:n]))
                caches.append(cache)
            cache = KVCache.stack(caches)
            del caches
            sizes = (cache.nbytes, cache.kept_nbytes)
            positions = torch.tensor([max(lengths)] * batch, device=model.device)
            start = time.perf_counter()
            greedy(model, cache, torch.stack(firsts), positions, decode_tokens + 1, stop_ids=set())
            sync(model.device)
            times.append((time.perf_counter() - start) / decode_tokens)
        out.append(BatchRow(policy.written_name, policy.ratio, lengths, min(times), *sizes))
    return out


def format_batch_table(rows: list[BatchRow]) -> str:
    lines = ["| batch | lengths | policy | ratio | decode ms / step (vs equal) | cache MiB | kept MiB |", "|---|---|---|---|---|---|---|"]
    equal = rows[0].step_seconds
    for row in rows:
        kind = "equal" if len(set(row.lengths)) == 1 else "unequal"
        lengths = f"{kind} {min(row.lengths)}-{max(row.lengths)}"
        lines.append(
            f"| {len(row.lengths)} | {lengths} | {row.policy} | {row.ratio:g} | {row.step_seconds * 1000:.1f} "
            f"({row.step_seconds / equal:.2f}x) | {row.cache_bytes / MIB:.2f} | {row.kept_bytes / MIB:.2f} |"
        )
    return "\n".join(lines)


# --- reporting ---------------------------------------------------------------------------


def _ratio(value: float, reference: float) -> float | None:
    """value / reference; 1.0 when equal (so full against itself is 1.0 even at 0), None when
    the reference is 0 and the value is not (no meaningful ratio)."""
    if value == reference:
        return 1.0
    if reference == 0:
        return None
    return value / reference


def ratios_to_full(rows: list[BenchRow]) -> list[dict[str, object]]:
    """Each row as a dict plus `<field>_vs_full` ratios against the full row of the same length.

    compress_seconds is compared with full's *prefill* time (`compress_seconds_vs_full_prefill`),
    since the full cache spends no time compressing. Ratios are None where a length has no full
    row or the full value is 0.
    """
    full = {row.length: row for row in rows if row.policy == FULL and row.prefill_chunk is None and row.quant == "none"}
    out: list[dict[str, object]] = []
    for row in rows:
        d = row.to_dict()
        ref = full.get(row.length)
        for name in VS_FULL_FIELDS:
            d[f"{name}_vs_full"] = None if ref is None else _ratio(getattr(row, name), getattr(ref, name))
        d["compress_seconds_vs_full_prefill"] = None if ref is None else _ratio(row.compress_seconds, ref.prefill_seconds)
        out.append(d)
    return out


def _cell(value: float, ratio: object, digits: int) -> str:
    """`4.12 (1.03x)`; `n/a` where there is no ratio."""
    shown = f"{ratio:.2f}x" if isinstance(ratio, float) else "n/a"
    return f"{value:.{digits}f} ({shown})"


def format_table(rows: list[BenchRow]) -> str:
    """A markdown table, one line per (length, policy, chunking), each measure with its ratio to
    the one-shot full cache of the same length."""
    header = [
        "length", "policy", "ratio", "prefill s", "compress s (vs full prefill)",
        "decode tok/s", "cache MiB", "kept MiB", "bits", "peak cache MiB", "peak process MiB",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row, d in zip(rows, ratios_to_full(rows)):
        cells = [
            str(row.length),
            row.label,
            f"{row.ratio:g}",
            _cell(row.prefill_seconds, d["prefill_seconds_vs_full"], 4),
            _cell(row.compress_seconds, d["compress_seconds_vs_full_prefill"], 4),
            _cell(row.decode_tokens_per_s, d["decode_tokens_per_s_vs_full"], 1),
            _cell(row.cache_bytes / MIB, d["cache_bytes_vs_full"], 2),
            f"{row.kept_bytes / MIB:.2f}",
            f"{row.bits_per_element:.2f}",
            _cell(row.peak_cache_bytes / MIB, d["peak_cache_bytes_vs_full"], 2),
            _cell(row.peak_bytes / MIB, d["peak_bytes_vs_full"], 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
