"""/metrics in Prometheus text format: requests, KV memory against its budget, tokens, and the
requests the server refused (by status)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from kvforge.engine import Engine

GAUGES = {
    "running": "requests decoding",
    "prefilling": "requests being prefilled",
    "waiting": "requests waiting for KV memory",
    "kv_allocated_bytes": "K/V bytes allocated by every cache (blocks shared by several counted once)",
    "kv_kept_bytes": "K/V bytes of the entries kept",
    "kv_reserved_bytes": "always 0: quantized caches take blocks as they go, as the others (kept for dashboards that read it)",
    "kv_peak_bytes": "the most K/V bytes allocated at once, checked every engine step",
    "kv_budget_bytes": "the KV memory budget (--kv-memory; 0: none)",
    "prefix_cache_entries": "compressed prompt prefixes kept for reuse",
    "prefix_cache_bytes": "K/V bytes of the kept prefixes (shared with running requests, copy on write)",
    "kv_blocks_used": "blocks of the K/V memory in use (a block holds kv_block_size entries of one layer's KV head)",
    "kv_blocks_shared": "blocks in use by more than one row (forks, kept prefixes)",
    "kv_blocks_free": "blocks of the K/V memory free",
    "kv_block_size": "entries per full-precision block (a quantized block holds its codec's number of entries in the same bytes)",
    "kv_pool_capacity_bytes": "bytes of the K/V memory's tensors (--kv-memory, or what it grew to without one)",
}


TIER_COUNTERS = {
    "hits": "store reads that found the entry",
    "misses": "store reads that found nothing",
    "bytes_read": "bytes read",
    "bytes_written": "bytes written",
    "evicted": "entries evicted beyond the tier's size",
}


Labels = tuple[tuple[str, str], ...]  # (name, value) pairs; () for the unlabelled sample
SAME_ON_EVERY_REPLICA = {"kv_block_size"}  # combined by max, not summed


@dataclass
class Metric:
    """One metric and its samples, before it is written as text (so replicas' metrics combine)."""

    name: str  # without the kvforge_ prefix
    kind: str  # "gauge" or "counter"
    help: str
    samples: dict[Labels, float] = field(default_factory=dict)


def collect(engine: Engine) -> list[Metric]:
    """The engine's metrics: requests, KV memory, tokens, kept prefixes, the store."""
    found: list[Metric] = []

    def metric(name: str, kind: str, help_text: str, value: float) -> None:
        found.append(Metric(name, kind, help_text, {(): value}))

    def counters(name: str, help_text: str, label: str, values: dict[str, int]) -> None:
        """One counter with a value per `label` value."""
        found.append(Metric(name, "counter", help_text, {((label, key),): count for key, count in values.items()}))

    for name, value in engine.snapshot().items():
        metric(name, "gauge", GAUGES[name], value)
    stats = engine.stats
    metric("requests_completed_total", "counter", "requests finished", stats.completed)
    metric("requests_cancelled_total", "counter", "requests cancelled (client gone)", stats.cancelled)
    metric("requests_failed_total", "counter", "requests ended by an error inside the engine (the others went on)", stats.failed)
    metric("requests_isolated_total", "counter", "requests recomputed alone after a batched step with them failed", stats.isolated)
    metric("requests_preempted_total", "counter", "times a request's memory was taken back to make room (it was recomputed later)", stats.preempted)
    metric("prompt_tokens_total", "counter", "prompt tokens prefilled", stats.prompt_tokens)
    metric("generated_tokens_total", "counter", "tokens generated", stats.generated_tokens)
    metric("prefix_hits_total", "counter", "requests that started from a kept compressed prefix", stats.prefix_hits)
    metric("prefix_reused_tokens_total", "counter", "prompt tokens not prefilled thanks to kept prefixes", stats.prefix_reused_tokens)
    metric("peak_running", "gauge", "the most requests decoded in one batch so far", stats.peak_running)
    if engine.stored is not None:  # the persistent store of compressed prefixes (--store)
        got = engine.stored.store.stats
        metric("store_hits_total", "counter", "requests that started from a prefix found in the store", got.hits)
        metric("store_misses_total", "counter", "store lookups that found nothing usable", got.misses)
        metric("store_corrupt_total", "counter", "store entries found damaged or foreign, dropped", got.corrupt)
        metric("store_read_bytes_total", "counter", "bytes read from the store", got.bytes_read)
        metric("store_written_bytes_total", "counter", "bytes written to the store", got.bytes_written)
        metric("store_evicted_total", "counter", "store entries evicted beyond --store-size", got.evicted)
        blended = engine.stored.blended
        metric("store_blended_requests_total", "counter", "requests whose kv_document parts were reused from the store wherever they sat", blended.requests)
        metric("store_blended_documents_found_total", "counter", "documents of blended requests found in the store (the others were prefilled alone)", blended.documents_stored)
        metric("store_blend_refreshed_tokens_total", "counter", "tokens of blended documents computed again (--blend-share)", blended.refreshed_tokens)
        tiers = getattr(engine.stored.store, "tiers", [engine.stored.store])
        for name, help_text in TIER_COUNTERS.items():
            per_tier = {tier.name: getattr(tier.stats, name) for tier in tiers}
            counters(f"store_tier_{name}_total", f"{help_text}, per tier (cpu: --cpu-memory; disk or redis: --store)", "tier", per_tier)
    uptime = time.perf_counter() - stats.started
    metric("generated_tokens_per_second", "gauge", "tokens generated per second since start", stats.generated_tokens / max(uptime, 1e-9))
    return found


def refused_metric(refused: Counter[int]) -> Metric:
    samples: dict[Labels, float] = {(("status", str(status)),): count for status, count in sorted(refused.items())}
    return Metric("requests_refused_total", "counter", "requests answered with an error status (4xx, 5xx), by status", samples)


def combine(per_replica: dict[str, list[Metric]]) -> list[Metric]:
    """Replicas' metrics as one server's: each sample summed over the replicas (the block size,
    the same on each, taken once), then each replica's own under a `replica` label."""
    combined: dict[str, Metric] = {}
    for replica, metrics in per_replica.items():
        for m in metrics:
            into = combined.setdefault(m.name, Metric(m.name, m.kind, m.help))
            for labels, value in m.samples.items():
                total = into.samples.get(labels)
                if total is None:
                    into.samples[labels] = value
                else:
                    into.samples[labels] = max(total, value) if m.name in SAME_ON_EVERY_REPLICA else total + value
    for replica, metrics in per_replica.items():  # after every total, so each metric's totals come first
        for m in metrics:
            for labels, value in m.samples.items():
                combined[m.name].samples[(*labels, ("replica", replica))] = value
    return list(combined.values())


def render(metrics: list[Metric]) -> str:
    """Prometheus' text format (version 0.0.4)."""
    lines = []
    for m in metrics:
        lines.extend([f"# HELP kvforge_{m.name} {m.help}", f"# TYPE kvforge_{m.name} {m.kind}"])
        for labels, value in m.samples.items():
            shown = f"{value:.0f}" if float(value).is_integer() else f"{value:.6g}"  # byte counts stay exact
            label_text = "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""
            lines.append(f"kvforge_{m.name}{label_text} {shown}")
    return "\n".join(lines) + "\n"


def prometheus(engine: Engine, refused: Counter[int] | None = None) -> str:
    return render([*collect(engine), refused_metric(refused or Counter())])
