"""`kvforge prefill --store DIR` (compress a document once and keep it) and `kvforge store
ls|rm|stats` (what a store directory holds)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from kvforge.cli.common import (
    add_budget_args, add_device_args, add_quant_args, cli_spec, console, ensure_calibration, err_console, load, quant_spec, ratio_arg,
    size_arg,
)  # fmt: skip
from kvforge.models import DEFAULT_MODEL


def read_context(path: str | None) -> str:
    """The --prompt-file text ('' without one; - reads standard input)."""
    try:
        if path is None:
            return ""
        return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read --prompt-file {path!r}: {err}") from err


def open_store(args: argparse.Namespace) -> Any:
    from kvforge.store import open_store as opened

    return opened(args.store, getattr(args, "store_size", None), getattr(args, "cpu_memory", None))


def command_spec(args: argparse.Namespace) -> Any:
    """The full KV setting of the command line: policy, ratio or budget, quantization."""
    return dataclasses.replace(cli_spec(args.policy, args.ratio, args.param, args), quant=quant_spec(args))


def cmd_prefill(args: argparse.Namespace) -> int:
    from kvforge.blend import document_ids
    from kvforge.generate import build_prompt
    from kvforge.store.documents import cached_prefill

    spec = command_spec(args)
    policy = spec.build()
    store = open_store(args)
    context = read_context(args.prompt_file)
    if not context.strip():
        raise ValueError("--prompt-file is empty: give the document to prefill and store")
    loaded = load(args)
    ensure_calibration(loaded, [policy])
    chat = loaded.is_instruct if args.chat is None else args.chat
    if args.blend:  # alone, from position 0: how `generate --blend` reuses it anywhere in a prompt
        tokens = document_ids(loaded.tokenizer, context)
    else:  # the context's tokens do not depend on the question
        tokens = build_prompt(loaded.tokenizer, context, "?", chat).context_ids
    start = time.perf_counter()
    with err_console.status(f"prefill and compress {len(tokens)} tokens ..."):
        cache, found = cached_prefill(store, loaded, policy, spec, tokens, args.prefill_chunk)
    seconds = time.perf_counter() - start
    result = {"tokens": len(tokens), "already_stored": found, "cache_bytes": cache.nbytes, "store_bytes": store.nbytes, "seconds": seconds}
    if args.json:
        print(json.dumps(result))
    else:
        what = "found in the store already" if found else "prefilled and stored"
        console.print(f"{len(tokens)} tokens {what}: cache {cache.nbytes / 2**20:.2f} MiB, {seconds:.2f}s; store {args.store} holds {store.nbytes / 2**20:.2f} MiB")
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    store = open_store(args)
    if hasattr(store, "reachable") and not store.reachable():
        raise ValueError(f"--store {args.store}: the Redis server cannot be reached; start it or check the URL")
    if args.action == "rm":
        if not args.keys:
            raise ValueError("store rm: give the keys (or their first characters) of the entries to remove; `kvforge store ls` lists them")
        entries = store.entries()
        for prefix in args.keys:
            matched = [e.key for e in entries if e.key.startswith(prefix)]
            if len(matched) != 1:
                raise ValueError(f"store rm: {prefix!r} names {len(matched)} entries; give enough of a key to name one")
            store.delete(matched[0])
        return 0
    entries = store.entries()
    if args.action == "stats":
        print(json.dumps({"entries": len(entries), "bytes": sum(e.size for e in entries), "store": str(args.store)}))
        return 0
    table = Table(title=f"{args.store}: {len(entries)} entries, {sum(e.size for e in entries) / 2**20:.2f} MiB")
    for column in ("key", "settings", "tokens", "MiB", "last use"):
        table.add_column(column)
    for e in entries:
        table.add_row(e.key[:16], e.settings, str(e.tokens), f"{e.size / 2**20:.2f}", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used)))
    console.print(table)
    return 0


def add_store_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--store", required=required, default=None, metavar="DIR|redis://HOST:PORT/DB",
                        help="where compressed documents are kept: a directory (made if missing) or a Redis server")
    parser.add_argument("--store-size", type=size_arg, default=None, metavar="SIZE", help="evict the least recently used entries beyond this (e.g. 20GiB)")


def register(sub: Any) -> None:
    pre = sub.add_parser("prefill", help="prefill and compress a document once and keep it in a store")
    pre.add_argument("--prompt-file", required=True, help="the document, a UTF-8 text file; - reads standard input")
    pre.add_argument("--model", default=DEFAULT_MODEL, help="'default', a local HF checkpoint dir, a .gguf file, or random:<shape>")
    pre.add_argument("--policy", default="kvzip", help="compression policy (see `kvforge policies`)")
    pre.add_argument("--ratio", type=ratio_arg, default=None, help="fraction of cached tokens removed, in [0, 1)")
    pre.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="policy hyperparameter")
    pre.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None, help="apply the chat template (as generate does)")
    pre.add_argument("--blend", action="store_true", help="store the document alone, to be reused anywhere in a prompt (generate --blend)")
    add_budget_args(pre, "prefill N tokens at a time, compressing after each chunk")
    add_quant_args(pre)
    add_device_args(pre)
    add_store_args(pre, required=True)
    pre.add_argument("--json", action="store_true", help="print one JSON object")
    pre.set_defaults(func=cmd_prefill)

    st = sub.add_parser("store", help="what a store of compressed documents holds: ls, rm KEY..., stats")
    st.add_argument("action", choices=["ls", "rm", "stats"])
    st.add_argument("keys", nargs="*", help="rm: keys (or their first characters) of the entries to remove")
    st.add_argument("--store", required=True, metavar="DIR|redis://HOST:PORT/DB", help="the store")
    st.set_defaults(func=cmd_store)
