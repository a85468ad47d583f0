"""What every `kvforge` command shares: the consoles, option types and groups, loading the model,
building policies and quantization specs from options."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from kvforge.models import DEFAULT_MODEL

console = Console()
err_console = Console(stderr=True)


def parse_param(text: str) -> tuple[str, Any]:
    """'window=32' -> ('window', 32); values are read as JSON when they parse, else as strings."""
    from kvforge.policies.names import parse_value

    if "=" not in text:
        raise ValueError(f"--param {text!r} must look like NAME=VALUE, e.g. --param window=32")
    name, raw = text.split("=", 1)
    return name.strip(), parse_value(raw)


def build_policy(name: str, ratio: float | None, params: list[str], args: argparse.Namespace | None = None) -> Any:
    """A policy from the command line: its name (parameters in brackets too: `snapkv[window=32]`),
    --ratio, --param NAME=VALUE and the budget options (--budget, --decode-budget, --evict-every)
    where the command has them."""
    return cli_spec(name, ratio, params, args).build()


def cli_spec(name: str, ratio: float | None, params: list[str], args: argparse.Namespace | None = None) -> Any:
    """The KV setting (`kvforge.spec.KVSpec`) the command line names: see `build_policy`."""
    from kvforge.policies.names import parse_name
    from kvforge.spec import KVSpec

    name, written = parse_name(name)
    own = {**dict(written), **dict(parse_param(p) for p in params)}
    budget = None
    if args is not None and name != "full":
        budget = getattr(args, "budget", None)
        if budget is not None and ratio is not None:
            raise ValueError("give either --ratio or --budget, not both")
        if getattr(args, "coverage", None) is not None:
            if ratio is not None or budget is not None:
                raise ValueError("--coverage sets how much each head keeps: give it without --ratio or --budget")
            name, ratio = covered(name, args.coverage)
        for option in ("decode_budget", "evict_every"):
            if getattr(args, option, None) is not None:
                own[option] = getattr(args, option)
    ratio = 0.0 if ratio is None or budget is not None else ratio
    return KVSpec(name, ratio, budget=budget, params=tuple(own.items()))


def covered(name: str, share: float) -> tuple[str, float]:
    """--coverage SHARE on policy `name`: the policy `coverage:<name>` and the ratio (1 - SHARE,
    the share of each head's score mass it may give up; policies/coverage.py)."""
    return (name if name.startswith("coverage:") else f"coverage:{name}"), round(1.0 - share, 12)


def coverage_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--coverage {text!r} is not a number; give a share in (0, 1), e.g. 0.95") from err
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(
            f"--coverage {value:g} is outside (0, 1): the share of each head's score mass kept, e.g. 0.95"
        )
    return value


def add_coverage_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coverage", type=coverage_arg, default=None, metavar="SHARE",
                        help="instead of --ratio: each head keeps the fewest entries holding SHARE of its score mass "
                             "(kvzip, kvzap; the policy becomes coverage:<policy>)")


def add_budget_args(parser: argparse.ArgumentParser, chunk_help: str) -> None:
    """The options that bound memory, shared by generate and bench."""
    parser.add_argument("--budget", type=positive_int("--budget"), default=None, metavar="TOKENS",
                        help="instead of --ratio: keep at most TOKENS entries per sequence and KV head")
    add_coverage_arg(parser)
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
    parser.add_argument("--quant", default="none", help=f"K/V quantization ({what}): {', '.join(MODES)}; then "
                        "/g16 sets that mode's group (default --quant-group), "
                        "/r32 holds 32 low-rank coordinates per head (/think32: keys as their 32 best channels), "
                        "/centroid0.125 or /quest0.125 reads that fraction of each row's pages per decoding step "
                        "(e.g. int4/centroid0.125)")
    parser.add_argument("--quant-group", type=int, default=32, metavar="G",
                        help="tokens per key group and channels per value group (must divide head_dim; default 32)")
    parser.add_argument("--quant-residual", type=int, default=0, metavar="R",
                        help="entries appended after the prompt (question, generated tokens) kept in full precision "
                             "per row beyond its open key group (default 0: quantized once their key group is "
                             "complete; KIVI keeps 128)")
    parser.add_argument("--quant-prompt-residual", action="store_true",
                        help="keep a compressed prompt's last R entries in full precision too, as KIVI does "
                             "(default: a compressed prompt is quantized whole, all but each row's open key group)")
    parser.add_argument("--quant-split", type=float, default=0.25, metavar="F",
                        help="mixed: the fraction of entries held in int4, those the policy scores highest "
                             "(the others in int2; default 0.25)")


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="TUNED.json",
                        help="a configuration `kvforge tune` wrote: its policy, ratio and quantization "
                             "replace --policy, --ratio, --coverage and --quant*")


def apply_config(args: argparse.Namespace) -> None:
    """--config FILE: the tuned setting in place of the flags that name one (eval: its rows beside
    the full cache's, the reference of retention)."""
    if getattr(args, "config", None) is None:
        return
    from kvforge.eval.tune import TunedConfig

    spec = TunedConfig.load(args.config).spec
    quant = spec.quant
    args.quant_group, args.quant_residual, args.quant_split = quant.group, quant.residual, quant.split
    args.quant_prompt_residual = quant.prompt_residual
    if hasattr(args, "policies"):  # eval
        if spec.budget is not None:
            raise ValueError(f"--config {args.config}: eval sweeps ratios; this configuration sets a budget ({spec.budget} entries)")
        args.policies = ",".join(dict.fromkeys(["full", spec.name]))
        args.ratios = f"{spec.ratio:g}" if spec.ratio else None
        args.quant = ",".join(dict.fromkeys(["none", quant.label]))
        return
    args.policy, args.quant, args.coverage = spec.name, quant.label, None  # parameters in the name's brackets
    args.ratio = None if spec.budget is not None else spec.ratio
    if hasattr(args, "budget"):
        args.budget = spec.budget
    elif spec.budget is not None:
        raise ValueError(f"--config {args.config}: this command takes a policy and a ratio; the configuration sets a budget ({spec.budget} entries)")


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

    options = dict(group=args.quant_group, residual=args.quant_residual, split=args.quant_split, prompt_residual=args.quant_prompt_residual)
    return [QuantSpec.parse(label, **options) for label in split_list(args.quant)]


def quant_spec(args: argparse.Namespace) -> Any:
    specs = quant_specs(args)
    if len(specs) != 1:
        raise ValueError(f"--quant takes one mode here, got {args.quant!r}")
    return specs[0]


def ensure_calibration(loaded: Any, policies: list[Any], quants: tuple[Any, ...] | list[Any] = ()) -> None:
    """Measure the model's calibration once (kept on disk) when one of `policies` needs it, and
    its low-rank bases when one of `quants` (QuantSpec) has a rank."""
    from kvforge.calibration.measure import calibrate, calibrate_lowrank
    from kvforge.calibration import find_calibration, fingerprint
    from kvforge.calibration.lowrank import find_bases

    if any(q.rank is not None for q in quants) and not find_bases(fingerprint(loaded.model)):
        with err_console.status(f"measuring {loaded.name}'s low-rank bases once ..."):
            calibrate_lowrank(loaded)
    if not any(p.needs_calibration for p in policies) or find_calibration(fingerprint(loaded.model)):
        return
    with err_console.status(f"calibrating {loaded.name} once (retrieval heads, query directions, kvzap surrogate) ..."):
        calibration = calibrate(loaded)
    err_console.print(f"[dim]calibrated {loaded.name} in {sum(calibration.seconds.values()):.0f}s (once per model)[/dim]")


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


def split_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def split_policies(text: str) -> list[str]:
    """--policies: commas inside a policy's brackets (`smooth:kvzap[kernel=5,pool=max]`) stay."""
    from kvforge.policies.names import split_top

    return split_top(text)


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
