"""The `kvforge` command: generate with a compressed cache, list policies, run the demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
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


def build_policy(name: str, ratio: float | None, params: list[str]) -> Any:
    from kvforge.policies import make_policy

    kwargs = dict(parse_param(p) for p in params)
    if ratio is not None:
        kwargs["ratio"] = ratio
    return make_policy(name, **kwargs)


def cmd_generate(args: argparse.Namespace) -> int:
    from kvforge.generate import answer, build_prompt
    from kvforge.models import load_model

    policy = build_policy(args.policy, args.ratio, args.param)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    try:
        context = Path(args.prompt_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read --prompt-file {args.prompt_file!r}: {err}") from err
    with err_console.status(f"loading {args.model} ..."):
        loaded = load_model(args.model)
    chat = loaded.is_instruct if args.chat is None else args.chat
    prompt = build_prompt(loaded.tokenizer, context, args.question, chat)
    with err_console.status(f"prefill {len(prompt.ids)} tokens and generate ..."):
        result = answer(loaded, prompt, policy, args.max_new_tokens, args.query_aware)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        console.print(result.text)
        saved = 1 - result.cache_bytes / max(result.dense_cache_bytes, 1)
        err_console.print(
            f"[dim]{result.policy} ratio {result.ratio}: {result.prompt_tokens} prompt tokens, "
            f"{result.generated_tokens} generated, cache {result.cache_bytes / 2**20:.2f} MiB held "
            f"of {result.dense_cache_bytes / 2**20:.2f} MiB dense ({saved:.0%} saved), {result.seconds:.2f}s[/dim]"
        )
    return 0


def cmd_policies(args: argparse.Namespace) -> int:
    from kvforge.policies import all_policies

    table = Table(title="kvforge policies")
    for col in ("name", "parameters (default)", "description"):
        table.add_column(col)
    for name, cls in all_policies().items():
        params = ", ".join(f"{p}={d!r}" for p, _, d in cls.parameters())
        table.add_row(name, params, cls.description)
    console.print(table)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: one built-in long-context question, full cache vs every policy."""
    from kvforge.eval.niah import is_correct, needle_case
    from kvforge.generate import build_prompt
    from kvforge.generate import answer as run_answer
    from kvforge.models import load_model
    from kvforge.policies import all_policies, make_policy

    with err_console.status(f"loading {args.model} (the first run converts the default model once) ..."):
        loaded = load_model(args.model)
    case = needle_case(loaded.tokenizer, args.length, seed=args.seed)
    prompt = build_prompt(loaded.tokenizer, case.context, case.question, loaded.is_instruct, case.answer_prefix)
    names = ["full"] + [n for n in all_policies() if n != "full"]
    rows = []
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with Progress(*columns, TimeElapsedColumn(), console=err_console) as progress:
        task = progress.add_task("policies", total=len(names))
        for name in names:
            progress.update(task, description=f"{name:<10}")
            policy = make_policy(name) if name == "full" else make_policy(name, ratio=args.ratio)
            rows.append(run_answer(loaded, prompt, policy, args.max_new_tokens, args.query_aware))
            progress.advance(task)
    setting = "query-aware" if args.query_aware else "question-agnostic"
    table = Table(title=f"{loaded.name}: {len(prompt.ids)}-token needle prompt, {setting}, answer {case.answers[0]}")
    for col in ("policy", "ratio", "answer", "correct", "cache MiB", "saved", "seconds"):
        table.add_column(col, justify="left" if col in ("policy", "answer") else "right")
    for r in rows:
        saved = 1 - r.cache_bytes / max(r.dense_cache_bytes, 1)
        table.add_row(
            r.policy,
            f"{r.ratio:g}",
            r.text.strip().replace("\n", " ")[:40],
            "yes" if is_correct(r.text, case.answers) else "no",
            f"{r.cache_bytes / 2**20:.2f}",
            f"{saved:.0%}",
            f"{r.seconds:.1f}",
        )
    console.print(table)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows]))
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="kvforge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of the library")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer a question about a context file with a compressed cache")
    gen.add_argument("question", help="the question; appended after the compressed context")
    gen.add_argument("--prompt-file", required=True, help="the context (compressed), a UTF-8 text file")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="'default', a local HF checkpoint dir, or a .gguf file")
    gen.add_argument("--policy", default="snapkv", help="compression policy (see `kvforge policies`)")
    gen.add_argument("--ratio", type=ratio_arg, default=None, help="fraction of cached tokens removed, in [0, 1)")
    gen.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="policy hyperparameter")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None, help="apply the chat template")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--query-aware", action="store_true", help="compress after the question (SnapKV setting)")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(func=cmd_generate)

    pol = sub.add_parser("policies", help="list every policy with its parameters")
    pol.set_defaults(func=cmd_policies)

    demo = sub.add_parser("demo", help="answer a built-in long-context question with every policy")
    demo.add_argument("--model", default=DEFAULT_MODEL)
    demo.add_argument("--length", type=int, default=3000, help="context tokens of the sample")
    demo.add_argument("--ratio", type=ratio_arg, default=0.5)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.add_argument("--query-aware", action="store_true")
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(func=cmd_demo)
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
