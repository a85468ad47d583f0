"""`kvforge` commands: the OpenAI-compatible server and the load generator that drives one."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from kvforge.cli.common import (
    console,
    err_console,
    build_policy,
    add_quant_args,
    add_device_args,
    load,
    quant_spec,
    ensure_calibration,
    positive_int,
    write_json,
    ratio_arg,
    seconds_arg,
    size_arg,
)
from kvforge.cli.store import add_store_args, open_store
from kvforge.models import DEFAULT_MODEL


def cmd_serve(args: argparse.Namespace) -> int:
    from kvforge.blend import check_share
    from kvforge.engine import Engine, KVSettings
    from kvforge.engine.prefixes import default_limit
    from kvforge.server.app import create_app
    from kvforge.server.limits import ServerLimits, allowed_hosts
    from kvforge.server.run import serve

    check_share(args.blend_share)
    if args.cpu_memory is not None and not args.store:
        raise ValueError(f"--cpu-memory {args.cpu_memory} keeps stored prefixes in host memory: give --store DIR|redis://... too")
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
        prefix_memory=prefix_memory, max_waiting=args.max_queued, store=open_store(args) if args.store else None,
        blend_share=args.blend_share,
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


def register(sub: Any) -> None:
    """Add this group's commands to the `kvforge` parser's subcommands."""
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
    add_store_args(srv, required=False)
    srv.add_argument("--cpu-memory", type=size_arg, default=None, metavar="SIZE",
                     help="with --store: keep the most recently used stored prefixes in host memory too, up to SIZE (e.g. 8GiB)")
    srv.add_argument("--blend-share", type=float, default=0.15, metavar="SHARE",
                     help="with --store: fraction of a request's kv_document tokens computed again with the text before them, in [0, 1] (default 0.15)")
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
