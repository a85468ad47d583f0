"""`kvforge` commands: the demo, the task sweep (eval) and fidelity against the full cache."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from kvforge.cli.common import (
    console,
    err_console,
    add_quant_args,
    add_config_arg,
    apply_config,
    add_device_args,
    load,
    quant_specs,
    ensure_calibration,
    positive_int,
    split_list,
    split_policies,
    ratio_arg,
)
from kvforge.models import DEFAULT_MODEL

if TYPE_CHECKING:
    from kvforge.eval.runner import EvalRow


# A few minutes: the reference, the methods that keep the needle question-agnostic on the default
# model, and the classic baselines (every method: `kvforge demo`, or name them with --policies).
QUICK = dict(
    tasks="niah_single,niah_multikey,vt", ratios="0.5,0.75", length=1024, samples=3,
    policies="full,kvzip,kvzap,razor,keydiff,knorm,streaming,snapkv",
)  # fmt: skip
# The demo's quality per byte: the methods that keep most, composed with int4, at higher ratios.
FRONT = tuple((policy, ratio) for policy in ("kvzip", "kvzap", "coverage:kvzip") for ratio in (0.5, 0.75, 0.875))


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: one built-in long-context question, full cache vs every method, all derived
    from one prefill of the sample (as the eval does)."""
    from dataclasses import asdict

    from kvforge.eval.runner import SweepStats, built, run_group
    from kvforge.eval.tasks import make_case
    from kvforge.policies import methods
    from kvforge.cache import head_dim
    from kvforge.spec import KVSpec
    from kvforge.storage import QuantSpec

    loaded = load(args)
    case = make_case(loaded.tokenizer, "niah_single", args.length, seed=args.seed, chat=loaded.is_instruct, max_length=loaded.context_length)
    case.max_new_tokens = args.max_new_tokens
    combos = [KVSpec(name, 0.0 if name == "full" else args.ratio) for name in methods()]
    int4 = QuantSpec("int4", group=math.gcd(32, head_dim(loaded.model)))  # the default group where it divides head_dim
    combos += [KVSpec(name, ratio, int4) for name, ratio in FRONT]
    policies = built(combos)
    ensure_calibration(loaded, list(policies.values()))
    rows = []
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with Progress(*columns, TimeElapsedColumn(), console=err_console) as progress:
        task = progress.add_task("one prefill, then every method", total=len(combos))
        for row in run_group(loaded, [(0, case)], args.query_aware, combos, policies, SweepStats()):
            rows.append(row)
            progress.update(task, description=f"{row.policy:<20}", advance=1)
    setting = "query-aware" if args.query_aware else "question-agnostic"
    title = f"{loaded.name}: {rows[0].prompt_tokens}-token needle prompt, {setting}, answer {case.answers[0]}"
    console.print(demo_table(title, [r for r in rows if r.quant == "none"]))
    console.print(front_table(rows))
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
    return 0


def front_table(rows: list[EvalRow]) -> Table:
    """The best configuration the demo measured within each budget of the dense bytes (its answer
    right, then the fewest bytes): eval's budget table on one sample."""
    from kvforge.eval.front import best_within, budget_label, configuration_label

    full = next((r for r in rows if r.policy == "full" and r.quant == "none"), None)
    entries = [
        {"policy": r.policy, "ratio": r.ratio, "quant": r.quant, "kept_fraction": r.cache_bytes / max(r.dense_bytes, 1),
         "retention": r.score / full.score if full is not None and full.score else None}
        for r in rows
    ]  # fmt: skip
    table = Table(
        title="quality per byte on this sample", box=None, pad_edge=False, header_style="bold",
        caption="the best configuration within each share of the dense bytes (kvforge eval measures it over tasks)",
    )  # fmt: skip
    for col in ("budget", "configuration", "bytes/dense", "answer"):
        table.add_column(col, justify="left" if col == "configuration" else "right", no_wrap=True)
    for b in best_within(entries):
        e = b["best"]
        if e is None:
            table.add_row(budget_label(b["budget"]), "none measured", "-", "-")
            continue
        table.add_row(budget_label(b["budget"]), configuration_label(e), f"{e['kept_fraction']:.3f}", "right" if e["retention"] >= 1 else "wrong")
    return table


def demo_table(title: str, rows: list[EvalRow]) -> Table:
    """The demo's table, whole within 80 columns (printed to a file, rich takes 80) even at 100+
    MiB and seconds: no rules between columns, short headers, the answer's start."""
    table = Table(
        title=title, box=None, pad_edge=False, header_style="bold",
        caption=f"one prefill ({rows[0].prefill_seconds:.1f}s) serves every method; MiB: K/V kept; s pol.: scoring and "
        f"compressing (kvzip's reconstruction passes included); s ans.: the question and the answer",
    )  # fmt: skip
    table.add_column("method", no_wrap=True)
    table.add_column("answer", no_wrap=True, max_width=10)
    for col in ("ratio", "ok", "MiB", "saved", "s pol.", "s ans."):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(
            r.policy,
            r.answer.strip().replace("\n", " ")[:10],
            f"{r.ratio:g}",
            "yes" if r.score == 100 else "no",
            f"{r.cache_bytes / 2**20:.2f}",
            f"{1 - r.cache_bytes / max(r.dense_bytes, 1):.0%}",
            f"{r.compress_seconds:.2f}",
            f"{r.decode_seconds:.1f}",
        )
    return table


def cmd_eval(args: argparse.Namespace) -> int:
    from kvforge.eval.report import write_reports
    from kvforge.eval.runner import EvalConfig, Workers, run_eval, total_rows
    from kvforge.calibration import find_calibration, fingerprint
    from kvforge.policies import methods
    from kvforge.spec import KVSpec

    apply_config(args)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    tasks = split_list(args.tasks or ("" if args.task_file else "niah_single"))
    policies = split_policies(args.policies) if args.policies else methods()
    ratios = [ratio_arg(r) for r in split_list(args.ratios or "0.5")]
    settings = [False, True] if (args.quick or args.both_settings) else [args.query_aware]
    cfg = EvalConfig(
        model=args.model, tasks=tasks, policies=policies, ratios=ratios, length=args.length or 2048,
        samples=args.samples if args.samples is not None else 20, settings=settings, seed=args.seed,
        task_file=args.task_file, batch=args.batch, prefill_chunk=args.prefill_chunk,
        questions=args.questions_per_context, quant=split_list(args.quant),
        quant_group=args.quant_group, quant_residual=args.quant_residual, quant_split=args.quant_split,
        quant_prompt_residual=args.quant_prompt_residual, dtype=args.dtype,
    )  # fmt: skip
    cfg.validate()
    workers = None
    if args.workers is not None:
        from kvforge.cluster import require_ray

        require_ray("--workers")  # before the model loads: one line when Ray is missing
        workers = Workers(args.workers, args.ray_address, args.device)
    elif args.ray_address is not None:
        raise ValueError(f"--ray-address {args.ray_address} names the cluster --workers run on: give --workers N too")
    loaded = load(args)
    made = [KVSpec.named(n).build() for n in cfg.policies]
    ensure_calibration(loaded, made, list(cfg.specs().values()))
    out = Path(args.out)
    total = total_rows(cfg)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=err_console) as progress:
        bar = progress.add_task("eval", total=total)

        def on_row(row) -> None:
            quant = "" if row.quant == "none" else f" {row.quant}"
            progress.update(bar, description=f"{row.task} #{row.sample} {row.policy} {row.ratio:g}{quant}")
            progress.advance(bar)

        rows, stats = run_eval(loaded, cfg, out, force=args.force, on_row=on_row, workers=workers)
        progress.update(bar, completed=total)
    calibration = find_calibration(fingerprint(loaded.model))
    needed = any(p.needs_calibration for p in made)
    write_reports(out, rows, stats, calibration.seconds if calibration and needed else None)
    print((out / "summary.md").read_text())
    err_console.print(f"results in {out}/: rows.jsonl, summary.json, summary.md, score_vs_ratio.png, score_vs_bytes.png")
    return 0


def cmd_fidelity(args: argparse.Namespace) -> int:
    from kvforge.eval import corpus
    from kvforge.eval.fidelity import fidelity
    from kvforge.storage.codec import labelled
    from kvforge.policies import methods
    from kvforge.spec import KVSpec

    names = split_policies(args.policies) if args.policies else [n for n in methods() if n != "full"]
    ratios = [ratio_arg(r) for r in split_list(args.ratios)]
    policies = [KVSpec.named(n, r).build() for n in names for r in ([0.0] if n == "full" else ratios)]
    if args.text_file:
        try:
            text = Path(args.text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read --text-file {args.text_file!r}: {err}") from err
    else:
        text = " ".join(corpus.paragraphs())
    loaded = load(args)
    quants = quant_specs(args)
    ensure_calibration(loaded, policies, quants)
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"][: args.context + args.continuation]
    with err_console.status(f"teacher-forcing {args.continuation} tokens for {len(policies) * len(quants)} caches ..."):
        results = fidelity(loaded, ids, args.context, policies, quants)
    # One configuration column, never cut (an 80-column terminal holds "kvzip 0.875 int4/centroid0.125").
    table = Table(title=f"fidelity to the full cache: {args.context}-token context, {len(ids) - args.context} tokens teacher-forced")
    for col in ("configuration", "KL nats", "top-1 %", "MiB", "kept", "bits"):
        table.add_column(col, justify="left" if col == "configuration" else "right", no_wrap=True)
    for r in results:
        name = r.policy if r.ratio == 0 else f"{r.policy} {r.ratio:g}"
        table.add_row(
            labelled(name, r.quant), f"{r.kl:.4f}", f"{r.top1_agreement:.1f}", f"{r.cache_bytes / 2**20:.2f}",
            f"{r.kept_bytes / max(r.dense_bytes, 1):.0%}", f"{r.bits_per_element:.2f}",
        )  # fmt: skip
    console.print(table)
    if args.json:
        print(json.dumps([r.__dict__ for r in results]))
    return 0


def register(sub: Any) -> None:
    """Add this group's commands to the `kvforge` parser's subcommands."""
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
    ev.add_argument("--policies", default=None, help="comma list (default: every registered policy); parameters in "
                    "brackets, e.g. 'kvzap,smooth:kvzap[kernel=5,pool=max]' (each a set of rows)")
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
    add_config_arg(ev)
    add_device_args(ev)
    ev.add_argument("--out", default="results/eval")
    ev.add_argument("--force", action="store_true", help="discard results of another configuration in --out")
    ev.add_argument("--workers", type=positive_int("--workers"), default=None, metavar="N",
                    help="run the sweep on N Ray actors, each loading the model once (pip install 'kvforge[distributed]')")
    ev.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                    help="with --workers: join this Ray cluster (default: start a local one)")
    ev.set_defaults(func=cmd_eval)

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
