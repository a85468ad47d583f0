"""`kvforge` commands: generate with a compressed cache, calibrate a model, list the policies."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.table import Table

from kvforge.cli.common import (
    console,
    err_console,
    add_budget_args,
    add_quant_args,
    add_config_arg,
    apply_config,
    add_device_args,
    load,
    ensure_calibration,
    ratio_arg,
)
from kvforge.cli.store import add_store_args, command_spec, open_store, read_context
from kvforge.models import DEFAULT_MODEL


def cmd_generate(args: argparse.Namespace) -> int:
    from kvforge.blend import answer_blended, build_blend_prompt, check_share
    from kvforge.generate import answer, build_prompt

    apply_config(args)
    spec = command_spec(args)
    policy, quant = spec.build(), spec.quant
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    if args.blend and (args.store is None or args.prompt_file is not None or args.query_aware):
        raise ValueError("--blend FILE reuses stored documents anywhere in the prompt: give --store, and no --prompt-file or --query-aware")
    check_share(args.blend_share)
    context = read_context(args.prompt_file)  # none: nothing to compress but what is generated
    documents = [read_context(path) for path in args.blend]
    store = open_store(args) if args.store is not None else None
    loaded = load(args)
    ensure_calibration(loaded, [policy], [quant])
    chat = loaded.is_instruct if args.chat is None else args.chat
    if documents:
        blended = build_blend_prompt(loaded.tokenizer, documents, args.question, chat)
        with err_console.status(f"blend {len(documents)} documents into {len(blended.ids)} tokens and generate ..."):
            result = answer_blended(loaded, blended, policy, spec, store, args.max_new_tokens, args.blend_share, args.prefill_chunk)
    else:
        prompt = build_prompt(loaded.tokenizer, context, args.question, chat)
        with err_console.status(f"prefill {len(prompt.ids)} tokens and generate ..."):
            result = answer(loaded, prompt, policy, args.max_new_tokens, args.query_aware, args.prefill_chunk, args.layout, quant, store, spec)
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
            f"{result.bits_per_element:.2f} bits per element ({result.quant}), {result.seconds:.2f}s"
            + ("" if result.stored is None else f"; context {'from the store' if result.stored else 'prefilled and stored'}")
            + ("" if result.refreshed_tokens is None else f", {result.refreshed_tokens} reused tokens refreshed")
            + "[/dim]"
        )
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from kvforge.calibration.measure import calibrate, calibrate_lowrank
    from kvforge.calibration import calibration_path
    from kvforge.policies.razor import retrieval_heads

    loaded = load(args)
    with err_console.status(f"calibrating {loaded.name} (retrieval heads, query directions, kvzap surrogate, low-rank bases) ..."):
        cal = calibrate(loaded, force=args.force)
        bases = calibrate_lowrank(loaded, force=args.force)
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
    half = bases.keys.shape[-1] // 2
    keys, values = bases.kept_energy(half)
    table.add_row("low-rank bases", "", f"rank {half} of {2 * half} holds {keys:.1%} of the keys' energy, {values:.1%} of the values'")
    table.add_row("key channels (ThinK)", "", f"the best {half} of {2 * half} hold {bases.kept_channel_share(half):.1%} of the query-key score")
    console.print(table)
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


def register(sub: Any) -> None:
    """Add this group's commands to the `kvforge` parser's subcommands."""
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
    gen.add_argument("--layout", default="inplace", help="K/V storage layout: inplace (default), paged (blocks of one pool) or ragged (the reference)")
    add_quant_args(gen)
    add_config_arg(gen)
    add_device_args(gen)
    add_store_args(gen, required=False)
    gen.add_argument("--blend", action="append", default=[], metavar="FILE",
                     help="a document reused from --store wherever it sits in the prompt (repeatable, in prompt order; CacheBlend)")
    gen.add_argument("--blend-share", type=float, default=0.15, metavar="SHARE",
                     help="fraction of the reused tokens computed again with the text before them, in [0, 1] (default 0.15)")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(func=cmd_generate)

    cal = sub.add_parser("calibrate", help="measure once per model what razor, qfilters and kvzap need (cached on disk)")
    cal.add_argument("--model", default=DEFAULT_MODEL)
    cal.add_argument("--force", action="store_true", help="measure again even if the cache holds a calibration")
    add_device_args(cal)
    cal.set_defaults(func=cmd_calibrate)

    pol = sub.add_parser("policies", help="list every policy with its parameters")
    pol.set_defaults(func=cmd_policies)
