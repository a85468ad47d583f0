"""`kvforge` commands: speed and memory: the whole model, one attention layer, the largest batch that fits."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from kvforge.cli.common import (
    err_console,
    build_policy,
    add_budget_args,
    add_quant_args,
    add_device_args,
    load,
    quant_specs,
    ensure_calibration,
    positive_int,
    split_list,
    split_policies,
    write_json,
    ratio_arg,
    size_arg,
)
from kvforge.models import DEFAULT_MODEL
from kvforge.storage import LAYOUTS


def size_lists(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """bench's --lengths and --batches as integers."""
    try:
        return [int(x) for x in split_list(args.lengths)], [int(x) for x in split_list(args.batches)]
    except ValueError as err:
        raise ValueError(f"--lengths {args.lengths!r} and --batches {args.batches!r} must be comma-separated integers, e.g. 1024,4096") from err


def cmd_attention_bench(args: argparse.Namespace) -> int:
    from kvforge.eval.attention_bench import check_shape, format_attention_table, run_attention_bench
    from kvforge.models import parse_device, parse_dtype

    check_shape(args.shape)
    lengths, batches = size_lists(args)
    if min(lengths + batches, default=0) < 1:
        raise ValueError("--lengths and --batches must be positive integers, e.g. --lengths 8192,32768 --batches 1,8")
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    quants = quant_specs(args)
    try:
        ratios = tuple(float(x) for x in split_list(args.ratios))
    except ValueError as err:
        raise ValueError(f"--ratios {args.ratios!r} must be comma-separated fractions in [0, 1), e.g. 0,0.5") from err
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with Progress(*columns, TimeElapsedColumn(), console=err_console) as progress:
        paged = args.layout == "paged"
        per_ratio = len(quants) + (paged and any(not q.enabled for q in quants))
        bar = progress.add_task("attention", total=len(lengths) * len(batches) * (1 + per_ratio * len(ratios)))
        rows = run_attention_bench(
            args.shape, lengths, batches, quants, dtype, device, steps=args.steps, ratios=ratios, paged=paged,
            on_row=lambda row: progress.update(bar, advance=1 if row.path == "torch" else 0, description=f"{row.length} x {row.batch} {row.layout}"),
        )  # fmt: skip
    print(f"kvforge bench --attention-only on {device} ({args.dtype}): one layer of {args.shape}, one decoding step")
    print(format_attention_table(rows))
    if args.json:
        write_json(Path(args.json), {"device": str(device), "dtype": args.dtype, "rows": [asdict(r) for r in rows]})
    return 0


def bench_policies(args: argparse.Namespace) -> tuple[list[str], list[Any]]:
    """bench's --policies (default: every registered one) at --ratio or --budget; full keeps all."""
    from kvforge.policies import methods

    names = split_policies(args.policies) if args.policies else methods()
    ratio = None if args.budget is not None or args.coverage is not None else args.ratio
    return names, [build_policy(n, None if n == "full" else ratio, [], args) for n in names]


def cmd_fit_bench(args: argparse.Namespace) -> int:
    from kvforge.eval.fit import format_fit_table, run_fit

    lengths, _ = size_lists(args)
    _, policies = bench_policies(args)
    quants = quant_specs(args)
    loaded = load(args)
    ensure_calibration(loaded, policies, quants)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with Progress(*columns, TimeElapsedColumn(), console=err_console) as progress:
        bar = progress.add_task("largest batch", total=len(lengths) * len(policies) * len(quants))
        rows = run_fit(loaded, lengths, policies, quants, args.fit_memory, args.max_batch, prefill_chunk=args.prefill_chunk,
                       on_row=lambda row: progress.advance(bar))  # fmt: skip
    device = loaded.model.device
    print(f"kvforge bench --fit-memory on {device}, {loaded.name}: the largest batch whose decoding fits, "
          f"peak from {rows[0].peak_source if rows else '-'}")  # fmt: skip
    print(format_fit_table(rows))
    if args.json:
        write_json(Path(args.json), {"device": str(device), "model": loaded.name, "rows": [asdict(r) for r in rows]})
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.attention_only:
        return cmd_attention_bench(args)
    if args.fit_memory is not None:
        return cmd_fit_bench(args)

    from kvforge.eval.baselines import check_baselines
    from kvforge.eval.bench import format_batch_table, format_table, ratios_to_full, run_batch_bench, run_bench
    from kvforge.policies import make_policy

    baselines = [] if args.no_baseline else check_baselines(split_list(args.baselines))
    lengths, batches = size_lists(args)
    if min(batches, default=0) < 1:
        raise ValueError(f"--batches {args.batches!r} must be positive integers, e.g. 1,8,32")
    names, policies = bench_policies(args)
    quants = quant_specs(args)
    loaded = load(args)
    device = str(loaded.model.device)
    ensure_calibration(loaded, policies, quants)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    per_length = len(set(names) | {"full"}) * (2 if args.prefill_chunk else 1) * len(quants) + len(baselines)
    with Progress(*columns, TimeElapsedColumn(), console=err_console) as progress:
        bar = progress.add_task("bench", total=len(lengths) * per_length)
        rows = run_bench(
            loaded, lengths, policies, decode_tokens=args.decode_tokens, repeats=args.repeats,
            prefill_chunk=args.prefill_chunk, baselines=baselines, on_row=lambda row: progress.advance(bar),
            quants=quants, layout=args.layout,
        )  # fmt: skip
        batch_rows = []
        if args.batch_compare:
            compare = [p for p in policies if p.name != "full"][:1] or policies
            for policy in [make_policy("full")] + compare:
                progress.update(bar, description=f"batch of {args.batch_compare}, {policy.full_name}")
                batch_rows += run_batch_bench(loaded, lengths[0], args.batch_compare, policy, args.decode_tokens, args.repeats)
    print(f"kvforge bench on {device}, {loaded.name}, {args.layout} layout:")
    print(format_table(rows))
    if batches != [1]:
        from kvforge.eval.batch_decode import format_decode_table, run_batched_decode

        with err_console.status(f"decoding batches of {args.batches} ..."):
            decoded = run_batched_decode(loaded, lengths, batches, policies, quants, args.decode_tokens, layout=args.layout)
        print(f"\nDecoding batches (one prompt prefilled per setting, forked into the batch), {args.decode_tokens} steps timed:")
        print(format_decode_table(decoded))
    if batch_rows:
        print(f"\nDecoding {args.batch_compare} prompts of equal and of unequal lengths (same total), {lengths[0]} tokens on average:")
        for i in range(0, len(batch_rows), 2):
            print(format_batch_table(batch_rows[i : i + 2]))
    if args.json:
        batch = [asdict(r) for r in batch_rows]
        write_json(Path(args.json), {"device": device, "model": loaded.name, "rows": ratios_to_full(rows), "batch": batch})
    return 0


def register(sub: Any) -> None:
    """Add this group's commands to the `kvforge` parser's subcommands."""
    ben = sub.add_parser("bench", help="speed and memory of each policy against the full cache")
    ben.add_argument("--model", default=DEFAULT_MODEL)
    ben.add_argument("--lengths", default="1024,4096", help="prompt lengths in tokens, comma-separated")
    ben.add_argument("--policies", default=None, help="comma list (default: every registered policy)")
    ben.add_argument("--ratio", type=ratio_arg, default=0.5)
    add_budget_args(ben, "also measure every policy prefilled N tokens at a time (compressing after each chunk)")
    ben.add_argument("--batch-compare", type=positive_int("--batch-compare"), default=None, metavar="B",
                     help="also time decoding B equal prompts against B unequal ones (first length, full + first policy)")
    ben.add_argument("--baselines", default="dynamic", metavar="NAMES",
                     help="transformers' own caches measured beside kvforge's rows, comma-separated: dynamic (DynamicCache), "
                          "quanto-int4, quanto-int2, hqq-int4, hqq-int2, fp8 (QuantizedCache; quanto and hqq need "
                          "pip install -e '.[baselines]'); default: dynamic")
    ben.add_argument("--no-baseline", action="store_true", help="no transformers rows (same as --baselines '')")
    add_quant_args(ben, many=True)
    ben.add_argument("--decode-tokens", type=int, default=32)
    ben.add_argument("--layout", default="inplace", choices=sorted(LAYOUTS),
                     help="how full-precision rows are held: inplace (default), paged (blocks of one pool, as `serve` holds them) "
                          "or ragged; with --attention-only, paged adds rows of the paged layout beside the in-place ones")
    ben.add_argument("--repeats", type=int, default=1, help="take the fastest of this many runs")
    add_device_args(ben)
    ben.add_argument("--attention-only", action="store_true",
                     help="time one layer's decode attention alone (no model: random K/V of --shape) against SDPA")
    ben.add_argument("--shape", default="llama-3.1-8b", help="--attention-only: llama-3.1-8b or default")
    ben.add_argument("--batches", default="1",
                     help="batch sizes, comma-separated: --attention-only times each; otherwise batches other than 1 add a "
                          "table of batched decoding (one prefill per setting, forked into the batch)")
    ben.add_argument("--steps", type=positive_int("--steps"), default=20, help="--attention-only: timed steps (median)")
    ben.add_argument("--ratios", default="0", metavar="R",
                     help="--attention-only: fractions of the tokens evicted before timing, comma-separated (each KV "
                          "head keeps a different share; rows compare with SDPA over the whole cache); default 0")
    ben.add_argument("--fit-memory", type=size_arg, default=None, metavar="SIZE",
                     help="instead of timing: the largest batch whose decoding fits SIZE (e.g. 120GiB; weights included) "
                          "per length, policy and quant mode, found by trying (on CUDA the allocator is capped at SIZE)")
    ben.add_argument("--max-batch", type=positive_int("--max-batch"), default=1024, metavar="B",
                     help="--fit-memory: the largest batch tried (default 1024)")
    ben.add_argument("--json", default=None, metavar="FILE", help="also write the rows with ratios to full")
    ben.set_defaults(func=cmd_bench)
