"""`kvforge tune`: the configuration for a memory size, chosen on the user's own cases and checked
on cases it was not chosen on; `--config FILE` hands the choice to generate, eval and serve."""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from kvforge.cli.common import (
    add_device_args, add_quant_args, console, err_console, ensure_calibration, load, positive_int, quant_specs, ratio_arg, split_list,
    split_policies,
)  # fmt: skip
from kvforge.eval.front import configuration_label
from kvforge.models import DEFAULT_MODEL

CANDIDATES = "kvzap,kvzip,coverage:kvzip"
RATIOS = "0.25,0.5,0.75,0.875,0.9375"
MODES = "none,int8,int4,int2"


def split_cases(args: argparse.Namespace, work: Path) -> tuple[Path, Path | None]:
    """Write the cases to tune on and those to check on as task files under `work`: --check-file's,
    or a shuffled --holdout share of --task-file's."""
    from kvforge.eval.runner import write_atomic
    from kvforge.eval.tasks import case_line, load_task_file

    cases = load_task_file(args.task_file)
    if args.check_file is not None:
        tune, check = cases, load_task_file(args.check_file)
    else:
        order = list(range(len(cases)))
        random.Random(args.seed).shuffle(order)
        held = round(len(cases) * args.holdout)
        if args.holdout and not 1 <= held < len(cases):
            raise ValueError(
                f"--holdout {args.holdout:g} of {len(cases)} cases leaves none to tune or check on; "
                f"give more cases, or --check-file FILE, or --holdout 0"
            )
        check = [cases[i] for i in sorted(order[:held])]
        tune = [cases[i] for i in sorted(order[held:])]
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, part in (("tune", tune), ("check", check)):
        path = work / f"{name}.jsonl"
        if part:
            write_atomic(path, "".join(case_line(c) + "\n" for c in part).encode())
        paths.append(path if part else None)
    assert paths[0] is not None
    return paths[0], paths[1]


def sweep(loaded: Any, args: argparse.Namespace, task_file: Path, out: Path, policies: list[str], ratios: list[float], modes: list[str]) -> dict:
    """Run the one-prefill sweep on a task file (resumable in `out`) and return its summary."""
    from kvforge.eval.report import write_reports
    from kvforge.eval.runner import EvalConfig, run_eval, total_rows
    from kvforge.eval.tasks import load_task_file

    cases = len(load_task_file(task_file))
    cfg = EvalConfig(
        model=args.model, tasks=[], policies=policies, ratios=ratios, length=0, samples=cases, task_file=str(task_file),
        seed=args.seed, batch=args.batch, quant=modes, quant_group=args.quant_group, quant_residual=args.quant_residual,
        quant_split=args.quant_split, quant_prompt_residual=args.quant_prompt_residual, dtype=args.dtype,
    )  # fmt: skip
    cfg.validate()
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=err_console) as progress:
        bar = progress.add_task(task_file.stem, total=total_rows(cfg))
        rows, stats = run_eval(loaded, cfg, out, force=args.force, on_row=lambda row: progress.advance(bar))
    return write_reports(out, rows, stats)


def agnostic(summary: dict) -> list[dict]:
    return [e for e in summary["table"] if e["setting"] == "question-agnostic"]


def entry_of(entries: list[dict], policy: str, ratio: float, quant: str) -> dict | None:
    return next((e for e in entries if (e["policy"], e["ratio"], e["quant"]) == (policy, ratio, quant)), None)


def wanted_memory(args: argparse.Namespace) -> Any:
    """--memory as a `Memory` (None with --min-retention), after checking the request's values."""
    from kvforge.eval.tune import parse_memory

    if (args.memory is None) == (args.min_retention is None):
        raise ValueError("give what to tune for: --memory 1/8 (or 40MiB), or --min-retention 0.95")
    if args.min_retention is not None and not 0 < args.min_retention <= 1:
        raise ValueError(f"--min-retention {args.min_retention:g} is outside (0, 1]: the share of the full cache's score kept")
    if not 0 <= args.holdout < 1:
        raise ValueError(f"--holdout {args.holdout:g} is outside [0, 1): the share of --task-file's cases kept to check the choice")
    return parse_memory(args.memory) if args.memory is not None else None


def check_choice(
    loaded: Any, args: argparse.Namespace, check_file: Path, work: Path, chosen: dict, sweep_all: tuple[list[str], list[float], list[str]], memory: Any
) -> dict[str, Any]:
    """The chosen configuration measured on the check cases (`measured`'s fields); with
    --check-all, every candidate too, and the best there within the same memory and the gap."""
    from kvforge.eval.report import configuration
    from kvforge.eval.tune import choose, measured

    policies, ratios, modes = sweep_all
    if not args.check_all:
        policies = list(dict.fromkeys(["full", chosen["policy"]]))
        ratios, modes = [chosen["ratio"] or ratios[0]], list(dict.fromkeys(["none", chosen["quant"]]))
    checked = agnostic(sweep(loaded, args, check_file, work / "check", policies, ratios, modes))
    mine = entry_of(checked, chosen["policy"], chosen["ratio"], chosen["quant"])
    check = {"cases": str(args.check_file or f"{args.holdout:g} of {args.task_file}"), **measured(mine or {})}
    best = choose(checked, memory, args.min_retention) if args.check_all else None
    if best is not None and mine is not None and mine.get("retention") is not None:
        check["best"] = configuration(best)
        check["gap"] = best["retention"] - mine["retention"]
    return check


def cmd_tune(args: argparse.Namespace) -> int:
    from kvforge.eval.tune import TunedConfig, choose, measured
    from kvforge.spec import KVSpec

    memory = wanted_memory(args)
    candidates = [p for p in split_policies(args.policies) if p != "full"]
    ratios = [ratio_arg(r) for r in split_list(args.ratios)]
    modes = split_list(args.quant)
    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_name(out.name + ".runs")
    tune_file, check_file = split_cases(args, work)
    loaded = load(args)
    specs, policies = quant_specs(args), [KVSpec.named(p).build() for p in candidates]
    check_holds_sinks(loaded, memory, policies, specs, tune_file)
    ensure_calibration(loaded, policies, specs)
    tuned = agnostic(sweep(loaded, args, tune_file, work / "tune", ["full", *candidates], ratios, modes))
    chosen = choose(tuned, memory, args.min_retention)
    wanted = f"--memory {memory.label}" if memory is not None else f"--min-retention {args.min_retention:g}"
    print_choices(tuned, chosen, memory)
    if chosen is None:
        raise ValueError(f"nothing measured meets {wanted}; results in {work}/tune. Give more memory, or more --ratios or --quant modes")
    check = None
    if check_file is not None:
        check = check_choice(loaded, args, check_file, work, chosen, (["full", *candidates], ratios, modes), memory)
    quant = next(q for q in specs if q.label == chosen["quant"])
    spec = KVSpec.named(chosen["policy"], chosen["ratio"], quant)
    chosen_for = {"memory": memory.label} if memory is not None else {"min_retention": args.min_retention}
    config = TunedConfig(spec, loaded.name, chosen_for, {"cases": args.task_file, **measured(chosen)}, check)
    config.save(out)
    name = configuration_label(chosen)
    print(f"chosen for {wanted}: {name}, {chosen['kept_fraction']:.3f} of the dense bytes, retention {chosen['retention']:.2f} on {chosen['samples']} cases")
    if check is not None and check.get("retention") is not None:
        gap = f"; the best there: {configuration_label(check['best'])} at {check['best']['retention']:.2f}" if "best" in check else ""
        print(f"checked on {check['samples']} other cases: retention {check['retention']:.2f}, {check['kept_fraction']:.3f} of the dense bytes{gap}")
    print(f"wrote {out}: use it with --config {out} (generate, eval, serve)")
    return 0


def check_holds_sinks(loaded: Any, memory: Any, policies: list[Any], specs: list[Any], tune_file: Path) -> None:
    """Refuse, before any sweep, a memory that cannot hold even the entries every candidate keeps
    (its sinks) of the shortest case at the cheapest candidate codec (scales not counted)."""
    from kvforge.cache import head_dim
    from kvforge.eval.tasks import load_task_file, prompt_length
    from kvforge.eval.tune import most_entries

    if memory is None:
        return
    config, dim = loaded.model.config, head_dim(loaded.model)
    dense_bits = 8 * next(loaded.model.parameters()).element_size()
    rows = config.num_hidden_layers * config.num_key_value_heads
    tokens = min(prompt_length(loaded.tokenizer, c, loaded.is_instruct) for c in load_task_file(tune_file))

    def bits(spec: Any) -> float:
        per = dense_bits if not spec.enabled else 2 if spec.mode == "mixed" else spec.bits
        return per * (spec.rank / dim if spec.rank else 1)

    cheapest = min(specs, key=bits)
    most = most_entries(memory, tokens, dense_bits, bits(cheapest), rows, dim)
    least = min(max(getattr(p, "sinks", 0), p.min_budget()) for p in policies)
    if most < least:
        raise ValueError(
            f"--memory {memory.label} holds at most {most:.1f} entries per KV head of the shortest case ({tokens} tokens), "
            f"even at {cheapest.label}; every candidate keeps at least {least} (its sinks): give more memory"
        )


def print_choices(entries: list[dict], chosen: dict | None, memory: Any) -> None:
    """The front of the tune cases (the configurations no cheaper one beats) and the choice, marked
    (a choice off the front ties in retention with a cheaper one and makes the answers likelier)."""
    from kvforge.eval.front import front

    table = Table(title="the front on the tune cases", box=None)
    for column in ("configuration", "bytes/dense", "MiB", "retention", "logp", ""):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    shown = front(entries)
    if chosen is not None and all(e is not chosen for e in shown):
        shown = sorted([*shown, chosen], key=lambda e: (e["kept_fraction"], -e["retention"]))
    for e in shown:
        mark = "chosen" if chosen is not None and e is chosen else ""
        logprob = "-" if e.get("answer_logprob") is None else f"{e['answer_logprob']:.2f}"
        table.add_row(
            configuration_label(e), f"{e['kept_fraction']:.3f}", f"{e['cache_bytes'] / 2**20:.1f}", f"{e['retention']:.2f}", logprob, mark
        )  # fmt: skip
    console.print(table)


def register(sub: Any) -> None:
    """Add `tune` to the `kvforge` parser's subcommands."""
    tune = sub.add_parser("tune", help="choose the configuration for a memory size on your own cases; writes a --config file")
    tune.add_argument("--model", default=DEFAULT_MODEL)
    tune.add_argument("--task-file", required=True, help="JSON lines with context, question, answers (as eval's)")
    tune.add_argument("--check-file", default=None, help="other cases of the same kind to check the choice on "
                      "(default: a --holdout share of --task-file's)")
    tune.add_argument("--holdout", type=float, default=0.5, metavar="SHARE",
                      help="without --check-file: the share of --task-file's cases held out to check the choice (0: none)")
    tune.add_argument("--memory", default=None, metavar="SIZE",
                      help="what the cache may hold: a fraction of the dense bytes (1/8) or bytes per sequence (40MiB)")
    tune.add_argument("--min-retention", type=float, default=None, metavar="R",
                      help="instead of --memory: the fewest bytes keeping at least R of the full cache's score")
    tune.add_argument("--policies", default=CANDIDATES, help=f"candidate policies (default {CANDIDATES})")
    tune.add_argument("--ratios", default=RATIOS, help=f"candidate ratios (default {RATIOS})")
    add_quant_args(tune, many=True)
    tune.set_defaults(quant=MODES)
    tune.add_argument("--check-all", action="store_true",
                      help="sweep every candidate on the check cases too, and report how far the choice is from the best there")
    tune.add_argument("--batch", type=positive_int("--batch"), default=8, help="cases decoded together (speed only)")
    tune.add_argument("--seed", type=int, default=0, help="how --holdout shuffles the cases")
    tune.add_argument("--out", required=True, help="the tuned configuration to write (JSON)")
    tune.add_argument("--work", default=None, help="where the sweeps' results go (default: OUT.runs next to --out)")
    tune.add_argument("--force", action="store_true", help="discard results of another configuration in --work")
    add_device_args(tune)
    tune.set_defaults(func=cmd_tune)
