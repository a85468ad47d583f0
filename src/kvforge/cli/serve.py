"""`kvforge` commands: the OpenAI-compatible server and the load generator that drives one."""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from kvforge.cli.common import (
    console,
    err_console,
    build_policy,
    add_coverage_arg,
    add_quant_args,
    add_config_arg,
    apply_config,
    covered,
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

if TYPE_CHECKING:
    from kvforge.engine import Engine
    from kvforge.server.limits import ServerLimits


def serve_limits(args: argparse.Namespace) -> ServerLimits:
    from kvforge.server.limits import ServerLimits, allowed_hosts

    return ServerLimits(
        max_body_bytes=args.max_request_size, max_queued=args.max_queued, max_messages=args.max_messages,
        api_key=args.api_key if args.api_key is not None else (os.environ.get("KVFORGE_API_KEY") or None), allowed_hosts=allowed_hosts(args.allowed_hosts, args.host),
        shutdown_timeout=args.shutdown_timeout,
    )  # fmt: skip


def serve_engine(args: argparse.Namespace) -> Engine:
    """The engine the `serve` flags describe (model loaded, calibrations measured when missing),
    not started: the server's own, or each replica's."""
    from kvforge.engine import Engine, KVSettings
    from kvforge.engine.prefixes import default_limit

    name, ratio = default_setting(args)
    policy = build_policy(name, None if name == "full" else ratio, [], None)
    loaded = load(args)
    ensure_calibration(loaded, [policy])
    prefix_memory = args.prefix_memory
    if prefix_memory is None and args.kv_memory is None:  # kept prefixes are bounded either way
        prefix_memory = default_limit(loaded.model.device)
    engine = Engine(
        loaded, KVSettings.named(name, policy.ratio, quant_spec(args)), args.kv_memory, args.prefill_chunk,
        prefix_memory=prefix_memory, max_waiting=args.max_queued, store=open_store(args) if args.store else None,
        blend_share=args.blend_share,
    )  # fmt: skip
    engine.check_defaults()
    return engine


def default_setting(args: argparse.Namespace) -> tuple[str, float]:
    """(policy, ratio) of requests that name none: --policy and --ratio, or what --coverage makes
    of them (`coverage:<policy>`, the share of mass it may give up as the ratio)."""
    if args.coverage is None or args.policy == "full":
        return args.policy, args.ratio
    return covered(args.policy, args.coverage)


def cmd_serve(args: argparse.Namespace) -> int:
    from kvforge.blend import check_share
    from kvforge.server.app import create_app
    from kvforge.server.run import serve

    check_share(args.blend_share)
    apply_config(args)
    if args.cpu_memory is not None and not args.store:
        raise ValueError(f"--cpu-memory {args.cpu_memory} keeps stored prefixes in host memory: give --store DIR|redis://... too")
    if args.replica_threads is not None and args.replicas is None:
        raise ValueError(f"--replica-threads {args.replica_threads} sets each replica's threads: give --replicas N too")
    name, ratio = default_setting(args)
    build_policy(name, None if name == "full" else ratio, [], None)  # a bad --policy: one line, before anything starts
    if quant_spec(args).rank is not None:
        raise ValueError(f"--quant {args.quant}: the server holds entries in the paged layout, which does not take a rank yet")
    limits = serve_limits(args)
    access = "API key required" if limits.api_key else "no API key"
    hosts = "any Host" if limits.allowed_hosts is None else "Host " + ",".join(limits.allowed_hosts)
    budget = "no KV memory budget" if args.kv_memory is None else f"KV memory budget {args.kv_memory / 2**20:.0f} MiB"
    settings = f"{name}{'' if name == 'full' else f' {ratio:g}'}, quant {quant_spec(args).mode}"
    if args.replicas is not None or args.ray_address is not None:
        return serve_on_ray(args, limits, f"{settings}, {budget} each; {access}, {hosts}")
    engine = serve_engine(args)
    app = create_app(engine, engine.loaded.name, args.ratio, limits)
    engine.start()
    prefix_memory = engine.prefix_memory
    prefixes = "" if prefix_memory is None else f", kept prefixes <= {prefix_memory / 2**20:.0f} MiB"
    err_console.print(f"serving {engine.loaded.name} on http://{args.host}:{args.port}/v1 ({settings}, {budget}{prefixes}; {access}, {hosts})")
    return serve(app, engine.stop, args.host, args.port, limits.shutdown_timeout)


def serve_on_ray(args: argparse.Namespace, limits: ServerLimits, described: str) -> int:
    """`serve --replicas N [--ray-address ...]`: the engines on Ray Serve, this process their front."""
    from kvforge.cluster import require_ray
    from kvforge.models import load_text_side
    from kvforge.server.replicas.launch import Replicas, start_front
    from kvforge.server.run import serve

    require_ray("--replicas", serving=True)  # before anything loads: one line when Ray is missing
    count = args.replicas or 1
    text = load_text_side(args.model)  # a model that cannot be read stops here, not in every replica
    if count > 1 and not args.store:
        err_console.print("[yellow]note:[/yellow] without --store, replicas share no prefixes: a prompt another replica prefilled is prefilled again")
    replicas = Replicas(count, args.ray_address, args.replica_threads, f"kvforge-{args.port}")
    where = "a local Ray cluster" if args.ray_address is None else f"the Ray cluster at {args.ray_address}"
    with err_console.status(f"starting {count} engine replicas on {where} (each loads the model) ..."):
        app, stop = start_front(replicas, functools.partial(serve_engine, args), text, args.ratio, limits)
    err_console.print(f"serving {text.name} on http://{args.host}:{args.port}/v1 from {count} replicas on {where} ({described})")
    return serve(app, stop, args.host, args.port, limits.shutdown_timeout)


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
    add_coverage_arg(srv)
    add_quant_args(srv)
    add_config_arg(srv)
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
    srv.add_argument("--replicas", type=positive_int("--replicas"), default=None, metavar="N",
                     help="run N engine replicas on Ray Serve behind this endpoint, routed by prompt prefix (needs kvforge[distributed]; default: one engine in this process)")
    srv.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                     help="with --replicas: run them on this Ray cluster (default: start a local one)")
    srv.add_argument("--replica-threads", type=positive_int("--replica-threads"), default=None, metavar="N",
                     help="with --replicas: torch threads (and Ray CPUs) per replica (default: the cluster's CPUs shared out)")
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
