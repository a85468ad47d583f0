"""The `kvforge` command: generate with a compressed cache, list policies, run the demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from kvforge.models import DEFAULT_MODEL

console = Console()
err_console = Console(stderr=True)


def parse_param(text: str) -> tuple[str, Any]:
    """'window=32' -> ('window', 32); values are read as JSON when they parse, else as strings."""
    if "=" not in text:
        raise ValueError(f"--param {text!r} must look like NAME=VALUE, e.g. --param window=32")
    name, raw = text.split("=", 1)
    try:
        return name.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return name.strip(), raw


def build_policy(name: str, ratio: float | None, params: list[str], args: argparse.Namespace | None = None) -> Any:
    """A policy from the command line: its name, --ratio, --param NAME=VALUE and the budget
    options (--budget, --decode-budget, --evict-every) where the command has them."""
    from kvforge.policies import make_policy

    kwargs = dict(parse_param(p) for p in params)
    if ratio is not None:
        kwargs["ratio"] = ratio
    if args is not None and name != "full":
        if getattr(args, "budget", None) is not None:
            if ratio is not None:
                raise ValueError("give either --ratio or --budget, not both")
            kwargs["budget"], kwargs["ratio"] = args.budget, 0.0  # the budget replaces the ratio
        for option in ("decode_budget", "evict_every"):
            if getattr(args, option, None) is not None:
                kwargs[option] = getattr(args, option)
    return make_policy(name, **kwargs)


def add_budget_args(parser: argparse.ArgumentParser, chunk_help: str) -> None:
    """The options that bound memory, shared by generate and bench."""
    parser.add_argument("--budget", type=positive_int("--budget"), default=None, metavar="TOKENS",
                        help="instead of --ratio: keep at most TOKENS entries per sequence and KV head")
    parser.add_argument("--decode-budget", type=positive_int("--decode-budget"), default=None, metavar="TOKENS",
                        help="entries per sequence and KV head held while decoding (default: streaming and h2o "
                             "hold the prompt's size, the others grow)")
    parser.add_argument("--evict-every", type=positive_int("--evict-every"), default=None, metavar="K",
                        help="while decoding, compress when a row exceeds its budget by K (default 16; 1 = every step)")
    parser.add_argument("--prefill-chunk", type=positive_int("--prefill-chunk"), default=None, metavar="N", help=chunk_help)


def add_quant_args(parser: argparse.ArgumentParser, many: bool = False) -> None:
    """How kept entries are held: shared by generate, eval and bench."""
    from kvforge.storage.codec import MODES

    what = "comma list of modes, each a set of rows" if many else "one mode"
    parser.add_argument("--quant", default="none", help=f"K/V quantization ({what}): {', '.join(MODES)}")
    parser.add_argument("--quant-group", type=int, default=32, metavar="G",
                        help="tokens per key group and channels per value group (must divide head_dim; default 32)")
    parser.add_argument("--quant-residual", type=int, default=128, metavar="R",
                        help="recent tokens per row kept in full precision (default 128)")
    parser.add_argument("--quant-split", type=float, default=0.25, metavar="F",
                        help="mixed: the fraction of entries held in int4, those the policy scores highest "
                             "(the others in int2; default 0.25)")


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """Where and in what precision the model runs: shared by every command that loads one."""
    from kvforge.models import DTYPES

    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when torch sees one, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                        help="weights, activations and K/V (default float32; bfloat16 halves the bytes held)")


def load(args: argparse.Namespace) -> Any:
    """The model --model, --device and --dtype name, with a spinner while it loads."""
    from kvforge.models import load_model, parse_device, parse_dtype

    device, dtype = parse_device(args.device), parse_dtype(args.dtype)  # bad values fail before the spinner
    first = " (the first run converts the default model once)" if args.model == DEFAULT_MODEL else ""
    with err_console.status(f"loading {args.model} on {device} ({args.dtype}){first} ..."):
        return load_model(args.model, dtype=dtype, device=device)


def quant_specs(args: argparse.Namespace) -> list[Any]:
    """The QuantSpec of each mode --quant names (validated: a bad value names its option)."""
    from kvforge.storage import QuantSpec

    return [QuantSpec(mode, args.quant_group, args.quant_residual, args.quant_split) for mode in split_list(args.quant)]


def quant_spec(args: argparse.Namespace) -> Any:
    specs = quant_specs(args)
    if len(specs) != 1:
        raise ValueError(f"--quant takes one mode here, got {args.quant!r}")
    return specs[0]


def ensure_calibration(loaded: Any, policies: list[Any]) -> None:
    """Measure the model's calibration once (kept on disk) when one of `policies` needs it."""
    from kvforge.calibrate import calibrate
    from kvforge.calibration import find_calibration, fingerprint

    if not any(p.needs_calibration for p in policies) or find_calibration(fingerprint(loaded.model)):
        return
    with err_console.status(f"calibrating {loaded.name} once (retrieval heads, query directions, kvzap surrogate) ..."):
        calibration = calibrate(loaded)
    err_console.print(f"[dim]calibrated {loaded.name} in {sum(calibration.seconds.values()):.0f}s (once per model)[/dim]")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from kvforge.calibrate import calibrate
    from kvforge.calibration import calibration_path
    from kvforge.policies.razor import retrieval_heads

    loaded = load(args)
    with err_console.status(f"calibrating {loaded.name} (retrieval heads, query directions, kvzap surrogate) ..."):
        cal = calibrate(loaded, force=args.force)
    table = Table(title=f"calibration of {loaded.name} ({cal.model})", caption=str(calibration_path(cal.model)))
    table.add_column("measurement")
    table.add_column("seconds", justify="right")
    table.add_column("result")
    heads = retrieval_heads(cal.retrieval, 0.15).nonzero().tolist()
    table.add_row("retrieval heads", f"{cal.seconds.get('retrieval heads', 0):.1f}",
                  f"top 15%: {len(heads)} of {cal.retrieval.numel()} KV heads, (layer, head) " + " ".join(f"{l}.{h}" for l, h in heads))
    table.add_row("query directions", f"{cal.seconds.get('query directions', 0):.1f}", f"{tuple(cal.query_direction.shape)}")
    table.add_row("kvzap surrogate", f"{cal.seconds.get('kvzap surrogate', 0):.1f}",
                  f"Spearman on a held-out context: mean {cal.kvzap_fit.mean():.2f}, min {cal.kvzap_fit.min():.2f} over layers")
    console.print(table)
    return 0


def positive_int(option: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{option} {text!r} is not an integer; give a whole number >= 1") from err
        if value < 1:
            raise argparse.ArgumentTypeError(f"{option} {value} is outside the allowed range [1, inf); give a whole number >= 1")
        return value

    return parse


def cmd_generate(args: argparse.Namespace) -> int:
    from kvforge.generate import answer, build_prompt

    policy = build_policy(args.policy, args.ratio, args.param, args)
    quant = quant_spec(args)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    try:
        if args.prompt_file is None:
            context = ""  # nothing to compress but what is generated
        elif args.prompt_file == "-":
            context = sys.stdin.read()
        else:
            context = Path(args.prompt_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read --prompt-file {args.prompt_file!r}: {err}") from err
    loaded = load(args)
    ensure_calibration(loaded, [policy])
    chat = loaded.is_instruct if args.chat is None else args.chat
    prompt = build_prompt(loaded.tokenizer, context, args.question, chat)
    with err_console.status(f"prefill {len(prompt.ids)} tokens and generate ..."):
        result = answer(loaded, prompt, policy, args.max_new_tokens, args.query_aware, args.prefill_chunk, args.layout, quant)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        console.print(result.text)
        saved = 1 - result.kept_bytes / max(result.dense_cache_bytes, 1)
        err_console.print(
            f"[dim]{result.policy} {policy.setting}: {result.prompt_tokens} prompt tokens, "
            f"{result.generated_tokens} generated, cache {result.cache_bytes / 2**20:.2f} MiB allocated "
            f"({result.kept_bytes / 2**20:.2f} MiB kept, peak {result.peak_cache_bytes / 2**20:.2f} MiB) "
            f"of {result.dense_cache_bytes / 2**20:.2f} MiB dense ({saved:.0%} saved), "
            f"{result.bits_per_element:.2f} bits per element ({result.quant}), {result.seconds:.2f}s[/dim]"
        )
    return 0


def cmd_policies(args: argparse.Namespace) -> int:
    from kvforge.policies import all_policies

    from kvforge.policies.base import BUDGET_FIELDS

    shared = ", ".join(f for f in BUDGET_FIELDS if f != "ratio")
    table = Table(title="kvforge policies", caption=f"every compressing policy also takes {shared} (see `kvforge generate --help`)")
    for col in ("name", "parameters (default)", "description"):
        table.add_column(col)
    for name, cls in all_policies().items():
        own = [(p, d) for p, _, d in cls.parameters() if p == "ratio" or p not in BUDGET_FIELDS]
        params = ", ".join(f"{p}={d!r}" for p, d in own)
        table.add_row(f"{name}:<policy>" if cls.wraps else name, params, cls.description)
    console.print(table)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: one built-in long-context question, full cache vs every method, all derived
    from one prefill of the sample (as the eval does)."""
    from dataclasses import asdict

    from kvforge.eval.runner import SweepStats, run_group
    from kvforge.eval.tasks import make_case
    from kvforge.policies import make_policy, methods

    loaded = load(args)
    case = make_case(loaded.tokenizer, "niah_single", args.length, seed=args.seed, chat=loaded.is_instruct, max_length=loaded.context_length)
    case.max_new_tokens = args.max_new_tokens
    combos = [(name, 0.0 if name == "full" else args.ratio, "none") for name in methods()]
    policies = {(n, r): make_policy(n, ratio=r) for n, r, _ in combos}
    ensure_calibration(loaded, list(policies.values()))
    rows = []
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with Progress(*columns, TimeElapsedColumn(), console=err_console) as progress:
        task = progress.add_task("one prefill, then every method", total=len(combos))
        for row in run_group(loaded, [(0, case)], args.query_aware, combos, policies, SweepStats()):
            rows.append(row)
            progress.update(task, description=f"{row.policy:<20}", advance=1)
    setting = "query-aware" if args.query_aware else "question-agnostic"
    table = Table(
        title=f"{loaded.name}: {rows[0].prompt_tokens}-token needle prompt, {setting}, answer {case.answers[0]}",
        caption=f"one prefill ({rows[0].prefill_seconds:.1f}s) serves every method; s policy: scoring and "
        f"compressing (kvzip's reconstruction passes included); s answer: the question and the answer",
    )
    table.add_column("method", no_wrap=True, min_width=18)
    table.add_column("answer", no_wrap=True, max_width=12)
    for col in ("ratio", "correct", "MiB kept", "saved", "s policy", "s answer"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r.policy,
            r.answer.strip().replace("\n", " ")[:24],
            f"{r.ratio:g}",
            "yes" if r.score == 100 else "no",
            f"{r.cache_bytes / 2**20:.2f}",
            f"{1 - r.cache_bytes / max(r.dense_bytes, 1):.0%}",
            f"{r.compress_seconds:.2f}",
            f"{r.decode_seconds:.1f}",
        )
    console.print(table)
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
    return 0


# A few minutes: the reference, the methods that keep the needle question-agnostic on the default
# model, and the classic baselines (every method: `kvforge demo`, or name them with --policies).
QUICK = dict(
    tasks="niah_single,niah_multikey,vt", ratios="0.5,0.75", length=1024, samples=3,
    policies="full,kvzip,kvzap,razor,keydiff,knorm,streaming,snapkv",
)  # fmt: skip


def split_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def cmd_eval(args: argparse.Namespace) -> int:
    from kvforge.eval.report import write_reports
    from kvforge.eval.runner import EvalConfig, run_eval, total_rows
    from kvforge.calibration import find_calibration, fingerprint
    from kvforge.policies import make_policy, methods

    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    tasks = split_list(args.tasks or ("" if args.task_file else "niah_single"))
    policies = split_list(args.policies) if args.policies else methods()
    ratios = [ratio_arg(r) for r in split_list(args.ratios or "0.5")]
    settings = [False, True] if (args.quick or args.both_settings) else [args.query_aware]
    cfg = EvalConfig(
        model=args.model, tasks=tasks, policies=policies, ratios=ratios, length=args.length or 2048,
        samples=args.samples if args.samples is not None else 20, settings=settings, seed=args.seed,
        task_file=args.task_file, batch=args.batch, prefill_chunk=args.prefill_chunk,
        questions=args.questions_per_context, quant=split_list(args.quant),
        quant_group=args.quant_group, quant_residual=args.quant_residual, quant_split=args.quant_split, dtype=args.dtype,
    )  # fmt: skip
    cfg.validate()
    loaded = load(args)
    made = [make_policy(n) for n in cfg.policies]
    ensure_calibration(loaded, made)
    out = Path(args.out)
    total = total_rows(cfg)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=err_console) as progress:
        bar = progress.add_task("eval", total=total)

        def on_row(row) -> None:
            quant = "" if row.quant == "none" else f" {row.quant}"
            progress.update(bar, description=f"{row.task} #{row.sample} {row.policy} {row.ratio:g}{quant}")
            progress.advance(bar)

        rows, stats = run_eval(loaded, cfg, out, force=args.force, on_row=on_row)
        progress.update(bar, completed=total)
    calibration = find_calibration(fingerprint(loaded.model))
    needed = any(p.needs_calibration for p in made)
    write_reports(out, rows, stats, calibration.seconds if calibration and needed else None)
    print((out / "summary.md").read_text())
    err_console.print(f"results in {out}/: rows.jsonl, summary.json, summary.md, score_vs_ratio.png")
    return 0


def cmd_fidelity(args: argparse.Namespace) -> int:
    from kvforge.eval import corpus
    from kvforge.eval.fidelity import fidelity
    from kvforge.policies import make_policy, methods

    names = split_list(args.policies) if args.policies else [n for n in methods() if n != "full"]
    ratios = [ratio_arg(r) for r in split_list(args.ratios)]
    policies = [make_policy(n, ratio=r) for n in names for r in ([0.0] if n == "full" else ratios)]
    if args.text_file:
        try:
            text = Path(args.text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read --text-file {args.text_file!r}: {err}") from err
    else:
        text = " ".join(corpus.paragraphs())
    loaded = load(args)
    ensure_calibration(loaded, policies)
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"][: args.context + args.continuation]
    quants = quant_specs(args)
    with err_console.status(f"teacher-forcing {args.continuation} tokens for {len(policies) * len(quants)} caches ..."):
        results = fidelity(loaded, ids, args.context, policies, quants)
    table = Table(title=f"fidelity to the full cache: {args.context}-token context, {len(ids) - args.context} tokens teacher-forced")
    for col in ("policy", "ratio", "quant", "KL (nats)", "top-1 agree %", "cache MiB", "kept", "bits"):
        table.add_column(col, justify="left" if col in ("policy", "quant") else "right")
    for r in results:
        table.add_row(
            r.policy, f"{r.ratio:g}", r.quant, f"{r.kl:.4f}", f"{r.top1_agreement:.1f}", f"{r.cache_bytes / 2**20:.2f}",
            f"{r.kept_bytes / max(r.dense_bytes, 1):.0%}", f"{r.bits_per_element:.2f}",
        )  # fmt: skip
    console.print(table)
    if args.json:
        print(json.dumps([r.__dict__ for r in results]))
    return 0


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
        bar = progress.add_task("attention", total=len(lengths) * len(batches) * (1 + len(quants) * len(ratios)))
        rows = run_attention_bench(
            args.shape, lengths, batches, quants, dtype, device, steps=args.steps, ratios=ratios,
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

    names = split_list(args.policies) if args.policies else methods()
    ratio = None if args.budget is not None else args.ratio
    return names, [build_policy(n, None if n == "full" else ratio, [], args) for n in names]


def cmd_fit_bench(args: argparse.Namespace) -> int:
    from kvforge.eval.fit import format_fit_table, run_fit

    lengths, _ = size_lists(args)
    _, policies = bench_policies(args)
    quants = quant_specs(args)
    loaded = load(args)
    ensure_calibration(loaded, policies)
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
    ensure_calibration(loaded, policies)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    per_length = len(set(names) | {"full"}) * (2 if args.prefill_chunk else 1) * len(quants) + len(baselines)
    with Progress(*columns, TimeElapsedColumn(), console=err_console) as progress:
        bar = progress.add_task("bench", total=len(lengths) * per_length)
        rows = run_bench(
            loaded, lengths, policies, decode_tokens=args.decode_tokens, repeats=args.repeats,
            prefill_chunk=args.prefill_chunk, baselines=baselines, on_row=lambda row: progress.advance(bar),
            quants=quants,
        )  # fmt: skip
        batch_rows = []
        if args.batch_compare:
            compare = [p for p in policies if p.name != "full"][:1] or policies
            for policy in [make_policy("full")] + compare:
                progress.update(bar, description=f"batch of {args.batch_compare}, {policy.full_name}")
                batch_rows += run_batch_bench(loaded, lengths[0], args.batch_compare, policy, args.decode_tokens, args.repeats)
    print(f"kvforge bench on {device}, {loaded.name}:")
    print(format_table(rows))
    if batches != [1]:
        from kvforge.eval.batch_decode import format_decode_table, run_batched_decode

        with err_console.status(f"decoding batches of {args.batches} ..."):
            decoded = run_batched_decode(loaded, lengths, batches, policies, quants, args.decode_tokens)
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


def write_json(path: Path, data: object) -> None:
    """Write `data` as JSON atomically: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def ratio_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"ratio {text!r} is not a number; use a value in [0, 1)") from err
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio {value} is outside [0, 1): 0 keeps all, 0.75 keeps a quarter")
    return value


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line (what was wrong and what is allowed), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"kvforge: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seconds {text!r} is not a number; give e.g. 30 or 2.5") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"seconds {value} is outside the allowed range [0, inf)")
    return value


def size_arg(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '1000000' -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    number = text.strip().rstrip("bBiIkKmMgG")
    unit = text.strip()[len(number) :].lower()
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"size {text!r} is not understood; write e.g. 2GiB, 512MiB or a number of bytes") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return int(value)


def cmd_serve(args: argparse.Namespace) -> int:
    from kvforge.engine import Engine, KVSettings
    from kvforge.engine.prefixes import default_limit
    from kvforge.server.app import create_app
    from kvforge.server.limits import ServerLimits, allowed_hosts
    from kvforge.server.run import serve

    policy = build_policy(args.policy, None if args.policy == "full" else args.ratio, [], None)
    quant = quant_spec(args)
    limits = ServerLimits(
        max_body_bytes=args.max_request_size, max_queued=args.max_queued, max_messages=args.max_messages,
        api_key=args.api_key if args.api_key is not None else (os.environ.get("KVFORGE_API_KEY") or None), allowed_hosts=allowed_hosts(args.allowed_hosts, args.host),
        shutdown_timeout=args.shutdown_timeout,
    )  # fmt: skip
    loaded = load(args)
    ensure_calibration(loaded, [policy])
    prefix_memory = args.prefix_memory
    if prefix_memory is None and args.kv_memory is None:  # kept prefixes are bounded either way
        prefix_memory = default_limit(loaded.model.device)
    engine = Engine(
        loaded, KVSettings(args.policy, policy.ratio, quant), args.kv_memory, args.prefill_chunk,
        prefix_memory=prefix_memory, max_waiting=args.max_queued,
    )  # fmt: skip
    engine.check_defaults()
    app = create_app(engine, loaded.name, args.ratio, limits)
    engine.start()
    budget = "no KV memory budget" if args.kv_memory is None else f"KV memory budget {args.kv_memory / 2**20:.0f} MiB"
    prefixes = "" if prefix_memory is None else f", kept prefixes <= {prefix_memory / 2**20:.0f} MiB"
    access = "API key required" if limits.api_key else "no API key"
    hosts = "any Host" if limits.allowed_hosts is None else "Host " + ",".join(limits.allowed_hosts)
    err_console.print(
        f"serving {loaded.name} on http://{args.host}:{args.port}/v1 ({policy.full_name} {policy.ratio:g}, quant {quant.mode}, "
        f"{budget}{prefixes}; {access}, {hosts})"
    )
    return serve(app, engine, args.host, args.port, limits.shutdown_timeout)


def cmd_loadtest(args: argparse.Namespace) -> int:
    from kvforge.client.loadtest import hf_baseline, loadtest, synthetic_prompts, task_prompts

    document = None
    if args.document:
        try:
            document = Path(args.document).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read --document {args.document!r}: {err}") from err
    cases = None
    if args.task:
        from kvforge.models import load_model

        with err_console.status(f"building {args.requests} {args.task} cases ..."):
            prompts, cases = task_prompts(load_model(args.model).tokenizer, args.task, args.requests, args.length)
    else:
        prompts = synthetic_prompts(args.requests, args.words, document)
    extra = {k: v for k, v in (("kv_policy", args.kv_policy), ("kv_ratio", args.kv_ratio), ("kv_quant", args.kv_quant)) if v is not None}
    reports = {}
    with err_console.status(f"{args.requests} requests, {args.clients} clients at a time, against {args.url} ..."):
        api_key = args.api_key or os.environ.get("KVFORGE_API_KEY") or "none"
        reports["server"] = loadtest(args.url, args.model, prompts, args.clients, args.max_tokens, extra, cases, api_key)
    if args.hf_baseline:
        with err_console.status("the same requests one at a time with plain transformers generate ..."):
            reports["transformers, one at a time"] = hf_baseline(args.model, prompts, args.max_tokens)
    table = Table(title=f"loadtest: {args.requests} requests, {args.max_tokens} new tokens each")
    columns = ("run", "clients", "s", "tok/s", "req/s", "TTFT first", "TTFT p50", "TTFT p90", "latency p50", "p90", "p99", "errors", "peak KV MiB", "max running")
    for col in columns:
        table.add_column(col, justify="left" if col == "run" else "right")

    def cell(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for name, r in reports.items():
        table.add_row(
            name, str(r.clients), cell(r.seconds, 1), cell(r.tokens_per_second, 1), cell(r.requests_per_second), cell(r.ttft_first), cell(r.ttft_p50),
            cell(r.ttft_p90), cell(r.latency_p50), cell(r.latency_p90), cell(r.latency_p99), str(r.errors),
            cell(None if r.peak_kv_bytes is None else r.peak_kv_bytes / 2**20, 1), cell(r.max_running, 0),
        )  # fmt: skip
    console.print(table)
    if cases is not None:
        console.print(f"{args.task} score through the server: {reports['server'].score:.1f} (0-100, {len(cases)} cases)")
    for example in reports["server"].error_examples:
        err_console.print(f"[red]error:[/red] {example}")
    if args.json:
        write_json(Path(args.json), {name: r.to_dict() for name, r in reports.items()})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="kvforge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of the library")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer a question about a context file with a compressed cache")
    gen.add_argument("question", help="the question; appended after the compressed context")
    gen.add_argument("--prompt-file", default=None,
                     help="the context (compressed), a UTF-8 text file; - reads standard input; none: no context")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="'default', a local HF checkpoint dir, a .gguf file, or random:<shape> (random weights)")
    gen.add_argument("--policy", default="snapkv", help="compression policy (see `kvforge policies`)")
    gen.add_argument("--ratio", type=ratio_arg, default=None, help="fraction of cached tokens removed, in [0, 1)")
    gen.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="policy hyperparameter")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None, help="apply the chat template")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--query-aware", action="store_true", help="compress after the question (SnapKV setting)")
    add_budget_args(gen, "prefill the compressed part N tokens at a time, compressing after each chunk")
    gen.add_argument("--layout", default="inplace", help="K/V storage layout: inplace (default) or ragged (the reference)")
    add_quant_args(gen)
    add_device_args(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(func=cmd_generate)

    cal = sub.add_parser("calibrate", help="measure once per model what razor, qfilters and kvzap need (cached on disk)")
    cal.add_argument("--model", default=DEFAULT_MODEL)
    cal.add_argument("--force", action="store_true", help="measure again even if the cache holds a calibration")
    add_device_args(cal)
    cal.set_defaults(func=cmd_calibrate)
    pol = sub.add_parser("policies", help="list every policy with its parameters")
    pol.set_defaults(func=cmd_policies)

    demo = sub.add_parser("demo", help="answer a built-in long-context question with every method, from one prefill")
    demo.add_argument("--model", default=DEFAULT_MODEL)
    demo.add_argument("--length", type=int, default=3000, help="prompt tokens of the sample")
    demo.add_argument("--ratio", type=ratio_arg, default=0.5)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.add_argument("--query-aware", action="store_true")
    demo.add_argument("--json", action="store_true")
    add_device_args(demo)
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="score policies on long-context tasks; resumable; writes reports")
    ev.add_argument("--model", default=DEFAULT_MODEL)
    ev.add_argument("--tasks", default=None, help="comma list of: " + "niah_single, niah_multikey, niah_multivalue, niah_multiquery, vt, cwe, niah_prose")
    ev.add_argument("--task-file", default=None, help="JSON lines with context, question, answers")
    ev.add_argument("--policies", default=None, help="comma list (default: every registered policy)")
    ev.add_argument("--ratios", default=None, help="comma list of ratios in [0, 1) (default 0.5)")
    ev.add_argument("--length", type=int, default=None, help="prompt tokens (default 2048)")
    ev.add_argument("--samples", type=int, default=None, help="samples per task (default 20)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--query-aware", action="store_true", help="compress with the question in the prompt")
    ev.add_argument("--both-settings", action="store_true", help="run question-agnostic and query-aware")
    ev.add_argument("--quick", action="store_true", help="a few-minute preset: 3 tasks, 1024 tokens, 3 samples, 8 methods, both settings")
    ev.add_argument("--batch", type=int, default=8, help="samples decoded together (speed only)")
    ev.add_argument("--questions-per-context", type=positive_int("--questions-per-context"), default=1, metavar="N",
                    help="compress each context once, then answer N of its questions, each from a fork of the "
                         "compressed cache (niah_multikey, niah_multiquery; N <= 4)")
    ev.add_argument("--prefill-chunk", type=positive_int("--prefill-chunk"), default=None, metavar="N",
                    help="prefill N tokens at a time, compressing after each chunk (each policy prefills itself)")
    add_quant_args(ev, many=True)
    add_device_args(ev)
    ev.add_argument("--out", default="results/eval")
    ev.add_argument("--force", action="store_true", help="discard results of another configuration in --out")
    ev.set_defaults(func=cmd_eval)

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

    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server whose KV memory kvforge manages")
    srv.add_argument("--model", default=DEFAULT_MODEL)
    srv.add_argument("--policy", default="full", help="default compression policy of requests (kv_policy overrides)")
    srv.add_argument("--ratio", type=ratio_arg, default=0.5, help="default ratio for a compressing policy (kv_ratio overrides)")
    add_quant_args(srv)
    add_device_args(srv)
    srv.add_argument("--kv-memory", type=size_arg, default=None, metavar="SIZE",
                     help="KV cache budget, e.g. 2GiB: requests that do not fit wait (default: none)")
    srv.add_argument("--prefill-chunk", type=positive_int("--prefill-chunk"), default=256, metavar="N",
                     help="prompt tokens prefilled per engine step (default 256)")
    srv.add_argument("--prefix-memory", type=size_arg, default=None, metavar="SIZE",
                     help="memory kept prompt prefixes may hold (default: within --kv-memory, else 1/8 of the memory available at start)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, metavar="KEY",
                     help="require 'Authorization: Bearer KEY' on every route but /health (default: $KVFORGE_API_KEY, else none)")
    srv.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                     help="comma list of Host header names answered, * for any (default: loopback names when bound to loopback, else any)")
    srv.add_argument("--max-request-size", type=size_arg, default=8 * 2**20, metavar="SIZE", help="largest request body (default 8MiB; 413 beyond)")
    srv.add_argument("--max-queued", type=positive_int("--max-queued"), default=256, metavar="N",
                     help="requests waiting for the engine at most (default 256; 429 with Retry-After beyond)")
    srv.add_argument("--max-messages", type=positive_int("--max-messages"), default=1024, metavar="N", help="messages per chat request (default 1024)")
    srv.add_argument("--shutdown-timeout", type=seconds_arg, default=30.0, metavar="S",
                     help="on SIGTERM, wait at most S seconds for requests in flight, then cancel them (default 30; a second signal exits at once)")
    srv.set_defaults(func=cmd_serve)

    lt = sub.add_parser("loadtest", help="drive a running OpenAI-compatible server with the openai client and measure it")
    lt.add_argument("--url", default="http://127.0.0.1:8000")
    lt.add_argument("--api-key", default=None, metavar="KEY", help="the server's --api-key (default: $KVFORGE_API_KEY)")
    lt.add_argument("--model", default=DEFAULT_MODEL, help="model name sent (and loaded by --hf-baseline)")
    lt.add_argument("--clients", type=positive_int("--clients"), default=16, help="requests in flight at once")
    lt.add_argument("--requests", type=positive_int("--requests"), default=64)
    lt.add_argument("--document", default=None, metavar="FILE", help="every request asks another question about this text")
    lt.add_argument("--words", type=positive_int("--words"), default=380, help="words per synthetic prompt (about 512 tokens)")
    lt.add_argument("--max-tokens", type=positive_int("--max-tokens"), default=64)
    lt.add_argument("--kv-policy", default=None)
    lt.add_argument("--kv-ratio", type=ratio_arg, default=None)
    lt.add_argument("--kv-quant", default=None)
    lt.add_argument("--task", default=None, help="send cases of this eval task instead (niah_single, ...) and score the answers")
    lt.add_argument("--length", type=positive_int("--length"), default=1024, help="prompt tokens of each --task case")
    lt.add_argument("--hf-baseline", action="store_true", help="also answer the same requests one at a time with plain transformers")
    lt.add_argument("--json", default=None, metavar="FILE")
    lt.set_defaults(func=cmd_loadtest)

    fid = sub.add_parser("fidelity", help="KL from the full cache and top-1 agreement over a teacher-forced text")
    fid.add_argument("--model", default=DEFAULT_MODEL)
    fid.add_argument("--text-file", default=None, help="UTF-8 text (default: the built-in documentation prose)")
    fid.add_argument("--policies", default=None)
    fid.add_argument("--ratios", default="0.5")
    fid.add_argument("--context", type=int, default=1024, help="tokens prefilled and compressed")
    fid.add_argument("--continuation", type=int, default=64, help="tokens teacher-forced after it")
    add_quant_args(fid, many=True)
    add_device_args(fid)
    fid.add_argument("--json", action="store_true")
    fid.set_defaults(func=cmd_fidelity)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return int(args.func(args))
    except ValueError as err:  # user errors: one line, no traceback
        print(f"kvforge: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
