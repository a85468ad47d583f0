"""Decode attention alone, one layer of a model's shape: time per step, bytes held, transient
memory, and the bandwidth bound, for a dense SDPA cache and each kvforge layout.

A decoding step reads every byte a layer holds, so the fastest a step can be is bytes held over
the device's copy bandwidth (`copy_bandwidth`, measured here, not taken from a data sheet). Rows:

- `sdpa`: PyTorch's scaled_dot_product_attention over a dense (batch, kv_heads, L, head_dim)
  cache (what transformers' DynamicCache attends over);
- `kvforge <quant>`: the in-place layout (`none`) or the quantized layout, attended by the path
  the device uses (Triton kernels on CUDA, torch on the CPU), and on CUDA also by the torch path
  (`path` says which); at each `ratio`, that fraction of every chunk was evicted as it was stored
  (before it was quantized, as a compressing prefill does), the KV heads keeping unequal shares
  (from half to one and a half times the mean, as head-wise budgets leave them), so rows are
  ragged. `vs_sdpa` always compares with SDPA over the whole, uncompressed cache;
- `kvforge paged` (with `paged`): the full-precision entries in the paged layout's blocks
  (`storage/paged.py`), read by the paged kernel on CUDA, by a gather of whole blocks in torch.

Weights do not matter to attention time, so no model is loaded: K/V are random, with the shape of
the model named by `--shape` (a config dict; nothing is downloaded). Bytes are read from the
tensors held; peak is the allocator's (CUDA) during the timed steps, over what was held before.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvforge.reading import kernels
from kvforge.eval.bench import PeakMeter, sync
from kvforge.policies.base import top_slots
from kvforge.storage.base import KVStorage
from kvforge.storage.codec import QuantSpec
from kvforge.storage import make_storage

log = logging.getLogger(__name__)

BUILD_CHUNK = 4096  # tokens appended (and quantized) at a time while a cache is built


@dataclass(frozen=True)
class AttnShape:
    q_heads: int
    kv_heads: int
    head_dim: int
    layers: int


SHAPES = {
    "llama-3.1-8b": AttnShape(q_heads=32, kv_heads=8, head_dim=128, layers=32),
    "default": AttnShape(q_heads=9, kv_heads=3, head_dim=64, layers=30),  # SmolLM2-135M
}


@dataclass
class AttnRow:
    shape: str
    length: int
    batch: int
    layout: str  # sdpa, or kvforge <quant mode>
    path: str  # torch or triton
    ratio: float  # fraction of the tokens evicted (0: the whole cache)
    ms_per_step: float  # one layer's attention for the whole batch, median
    held_bytes: int  # one layer, read from the tensors
    bound_ms: float  # held_bytes / measured copy bandwidth: no step can be faster
    peak_bytes: int | None  # CUDA: allocator peak during the steps over what was held before
    vs_sdpa: float | None = None  # sdpa's time / this row's (> 1: faster)


def check_shape(name: str) -> AttnShape:
    if name not in SHAPES:
        raise ValueError(f"--shape {name!r} is not known; use one of {', '.join(SHAPES)}")
    return SHAPES[name]


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second a device-to-device copy moves (read + write), best of 5."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def time_steps(step: Callable[[], object], device: torch.device, steps: int, warmup: int = 2) -> float:
    """Median seconds of one call, each call timed alone."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def head_shares(kv_heads: int) -> torch.Tensor:
    """(kv_heads,) each head's share of the kept entries relative to the mean: 0.5 to 1.5, mean 1."""
    if kv_heads == 1:
        return torch.ones(1)
    return 0.5 + torch.arange(kv_heads) / (kv_heads - 1)


def _evict_chunk(one: KVStorage, n: int, ratio: float, gen: torch.Generator) -> None:
    """Keep every entry held before the chunk of n just appended and (1 - ratio) x share of the
    chunk's, chosen at random per KV head (which ones does not change attention's time)."""
    view = one.view()
    held = view.valid.shape[-1]
    keep_new = (n * (1.0 - ratio) * head_shares(one.kv_heads)).round().long().clamp(1, n).to(one.device)
    budget = one.lengths.to(one.device) - n + keep_new  # (1, kv_heads)
    scores = torch.rand(1, one.kv_heads, held, generator=gen, device=one.device)
    scores[..., : held - n] = float("inf")  # slots are time ordered: the chunk is the last n
    one.keep(view, *top_slots(scores, budget, view.valid))


def build_storage(
    shape: AttnShape, length: int, batch: int, spec: QuantSpec, dtype: torch.dtype, device: torch.device,
    seed: int = 0, ratio: float = 0.0, layout: str = "inplace",
) -> KVStorage:  # fmt: skip
    """One layer's storage holding `length` random entries per row for `batch` sequences (fewer
    with `ratio`: see the module's docstring), built a sequence and BUILD_CHUNK tokens at a time
    (bounded transients), as a chunked prefill would."""
    gen = torch.Generator(device=device).manual_seed(seed)
    parts: list[KVStorage] = []
    for _ in range(batch):
        one = make_storage(layout, 1, shape.kv_heads, shape.head_dim, dtype, device, quant=spec)
        for start in range(0, length, BUILD_CHUNK):
            n = min(BUILD_CHUNK, length - start)
            k, v = (torch.randn(1, shape.kv_heads, n, shape.head_dim, generator=gen, device=device, dtype=dtype) for _ in range(2))
            positions = torch.arange(start, start + n, device=device)
            one.append(k, v, positions, torch.ones(1, n, dtype=torch.bool, device=device), exact=n == length)
            if ratio > 0:
                _evict_chunk(one, n, ratio, gen)
            one.seal()
        parts.append(one)
    return type(parts[0]).stack(parts, [0] * batch, take=True)


def _peak(device: torch.device, run: Callable[[], float]) -> tuple[float, int | None]:
    """`run()`'s result and the allocator's peak over what was held before (CUDA; None on a CPU,
    where one layer's transients are too small for the process peak to show)."""
    if device.type != "cuda":
        return run(), None
    meter = PeakMeter(device)
    meter.start()
    seconds = run()
    return seconds, meter.stop()


def _sdpa(shape: AttnShape, query: torch.Tensor, length: int, scaling: float, steps: int) -> tuple[float, int, int | None]:
    """(seconds per step, bytes held, peak) of SDPA over a dense cache of `length` tokens."""
    batch, device = query.shape[0], query.device
    gen = torch.Generator(device=device).manual_seed(2)
    k, v = (torch.randn(batch, shape.kv_heads, length, shape.head_dim, generator=gen, device=device, dtype=query.dtype) for _ in range(2))
    seconds, peak = _peak(device, lambda: time_steps(
        lambda: F.scaled_dot_product_attention(query, k, v, scale=scaling, enable_gqa=True), device, steps))  # fmt: skip
    return seconds, k.nbytes + v.nbytes, peak


def _kvforge(
    shape: AttnShape, query: torch.Tensor, length: int, spec: QuantSpec, ratio: float, scaling: float, steps: int, layout: str
) -> dict[str, tuple[float, int, int | None]]:
    """Per path (triton where it runs, torch): seconds per step, bytes held, peak."""
    batch, device = query.shape[0], query.device
    storage = build_storage(shape, length, batch, spec, query.dtype, device, ratio=ratio, layout=layout)
    positions = torch.tensor([length], device=device)
    valid = torch.ones(batch, 1, dtype=torch.bool, device=device)
    out = {}
    for path in ["triton", "torch"] if kernels.enabled(device) else ["torch"]:
        with kernels.using(path == "triton"):
            seconds, peak = _peak(device, lambda: time_steps(lambda: storage.attend(query, positions, valid, scaling), device, steps))
        out[path] = (seconds, storage.allocated_nbytes, peak)
    return out


def run_attention_bench(
    shape_name: str,
    lengths: list[int],
    batches: list[int],
    quants: list[QuantSpec],
    dtype: torch.dtype,
    device: torch.device,
    steps: int = 20,
    on_row: Callable[[AttnRow], None] | None = None,
    ratios: tuple[float, ...] = (0.0,),
    paged: bool = False,
) -> list[AttnRow]:
    """Every row of the module's docstring; `paged`: the full-precision rows in the paged layout
    too."""
    shape = check_shape(shape_name)
    for ratio in ratios:
        if not 0 <= ratio < 1:
            raise ValueError(f"--ratios: {ratio} is outside [0, 1): the fraction of the tokens evicted")
    bandwidth = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 28)
    log.info("copy bandwidth on %s: %.1f GB/s", device, bandwidth / 1e9)
    scaling = shape.head_dim**-0.5
    rows: list[AttnRow] = []

    def add(row: AttnRow) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    for length in lengths:
        for batch in batches:
            gen = torch.Generator(device=device).manual_seed(1)
            query = torch.randn(batch, shape.q_heads, 1, shape.head_dim, generator=gen, device=device, dtype=dtype)
            seconds, held, peak = _sdpa(shape, query, length, scaling, steps)
            add(AttnRow(shape_name, length, batch, "sdpa", "torch", 0.0, seconds * 1e3, held, held / bandwidth * 1e3, peak, 1.0))
            for ratio in ratios:
                for spec in quants:
                    layouts = ["inplace", "paged"] if paged and not spec.enabled else ["inplace"]
                    for layout in layouts:
                        label = "kvforge paged" if layout == "paged" else f"kvforge {spec.mode}"
                        for path, (secs, held, peak) in _kvforge(shape, query, length, spec, ratio, scaling, steps, layout).items():
                            add(AttnRow(shape_name, length, batch, label, path, ratio, secs * 1e3, held,
                                        held / bandwidth * 1e3, peak, seconds / secs))  # fmt: skip
    return rows


def format_attention_table(rows: list[AttnRow]) -> str:
    head = "| shape | tokens | batch | layout | path | ratio | ms/step | vs sdpa | held MiB | bound ms | peak MiB |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        peak = "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.1f}"
        lines.append(
            f"| {r.shape} | {r.length} | {r.batch} | {r.layout} | {r.path} | {r.ratio:g} | {r.ms_per_step:.3f} | "
            f"{r.vs_sdpa:.2f}x | {r.held_bytes / 2**20:.1f} | {r.bound_ms:.3f} | {peak} |"
        )
    return "\n".join(lines)
