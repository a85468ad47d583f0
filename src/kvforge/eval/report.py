"""Summaries of an eval run: summary.json, summary.md (policy x ratio -> score per task; the best
configuration per byte budget) and two plots (score against ratio, retention against bytes)."""

from __future__ import annotations

import io
import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from statistics import mean

from kvforge.eval.front import best_within, budget_label, configuration_label, front
from kvforge.eval.runner import SUMMARY, EvalRow, SweepStats, write_atomic
from kvforge.storage.codec import MODES, labelled


# A task counts towards retention where the full cache scores at least this: a task the model
# cannot do uncompressed says nothing about what compression keeps, and would dilute the mean.
INFORMATIVE = 50.0


def retention(scores: dict[str, float], full: dict[str, float]) -> float | None:
    """The policy's score over the full cache's, averaged over the tasks where the full cache
    scores at least INFORMATIVE (None if there is none)."""
    ratios = [scores[t] / full[t] for t in scores if t in full and full[t] >= INFORMATIVE]
    return mean(ratios) if ratios else None


def per_question(rows: list[EvalRow]) -> list[dict]:
    """Per (policy, ratio): the mean score on question i of each context, and its retention
    (over the full cache's score on the same question), i = 0, 1, ..."""
    scores: dict[tuple[str, float, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        scores[(r.policy, r.ratio, r.quant)][r.question].append(r.score)
    full = {q: mean(v) for q, v in scores.get(("full", 0.0, "none"), {}).items()}
    out = []
    for (policy, ratio, quant), by_q in sorted(scores.items(), key=lambda kv: (kv[0][0] != "full", kv[0])):
        means = {q: mean(v) for q, v in sorted(by_q.items())}
        kept = {q: m / full[q] if full.get(q) else None for q, m in means.items()}
        out.append({"policy": labelled(policy, quant), "ratio": ratio, "scores": means, "retention": kept})
    return out


def summarize(rows: list[EvalRow], stats: SweepStats | None = None) -> dict:
    """Per setting, per (policy, ratio): score per task, mean, relative to full, bytes held."""
    tasks = sorted({r.task for r in rows})
    groups: dict[tuple[bool, str, str, float], list[EvalRow]] = defaultdict(list)
    for r in rows:
        groups[(r.query_aware, r.quant, r.policy, r.ratio)].append(r)
    table = []
    order = {mode: i for i, mode in enumerate(MODES)}
    for (aware, quant, policy, ratio), members in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][2] != "full", kv[0][2], kv[0][3], order.get(kv[0][1], 99))
    ):
        per_task = {t: mean(r.score for r in members if r.task == t) for t in tasks if any(r.task == t for r in members)}
        table.append(
            {
                "setting": "query-aware" if aware else "question-agnostic",
                "policy": policy,
                "ratio": ratio,
                "quant": quant,
                "bits_per_element": mean(r.bits_per_element for r in members) if all(r.bits_per_element for r in members) else None,
                "read_fraction": mean(r.read_fraction for r in members) if all(r.read_fraction for r in members) else None,
                "answer_logprob": mean(r.answer_logprob for r in members) if all(r.answer_logprob is not None for r in members) else None,
                "scores": per_task,
                "mean": mean(per_task.values()),
                "samples": len(members),
                "cache_bytes": mean(r.cache_bytes for r in members),
                "kept_fraction": mean(r.cache_bytes / max(r.dense_bytes, 1) for r in members),
                "prefill_seconds": mean(r.prefill_seconds for r in members),
                "compress_seconds": mean(r.compress_seconds for r in members),
                "decode_seconds": mean(r.decode_seconds for r in members),
            }
        )
    for entry in table:
        # The reference is the full cache in full precision (or, without one, at the same quantization).
        fulls = [e for e in table if e["setting"] == entry["setting"] and e["policy"] == "full"]
        full = next((e for e in fulls if e["quant"] == "none"), next((e for e in fulls if e["quant"] == entry["quant"]), None))
        entry["relative_to_full"] = entry["mean"] / full["mean"] if full and full["mean"] > 0 else None
        entry["retention"] = retention(entry["scores"], full["scores"]) if full else None
    informative = {
        e["setting"]: [t for t, v in e["scores"].items() if v >= INFORMATIVE]
        for e in table
        if e["policy"] == "full" and e["quant"] == "none"
    }
    out: dict = {"tasks": tasks, "rows": len(rows), "table": table, "informative_tasks": informative, "front": fronts(table)}
    if any(r.question > 0 for r in rows):
        out["questions"] = per_question(rows)
    if stats is not None:
        out["sweep"] = asdict(stats)
        if stats.per_row_prefill_seconds is not None:
            # What the sweep would have cost with one prefill per row instead of per sample.
            out["sweep"]["estimated_prefill_seconds_per_row"] = stats.per_row_prefill_seconds * stats.rows
    return out


def configuration(entry: dict) -> dict:
    return {k: entry[k] for k in ("policy", "ratio", "quant", "kept_fraction", "retention", "answer_logprob")}


def fronts(table: list[dict]) -> dict:
    """Per setting: the best configuration within each byte budget, and the front (`front.py`)."""
    out = {}
    for setting in dict.fromkeys(e["setting"] for e in table):
        entries = [e for e in table if e["setting"] == setting]
        out[setting] = {
            "budgets": [{"budget": b["budget"], "best": None if b["best"] is None else configuration(b["best"])} for b in best_within(entries)],
            "front": [configuration(e) for e in front(entries)],
        }
    return out


def front_markdown(summary: dict) -> list[str]:
    lines = []
    for setting, got in summary.get("front", {}).items():
        lines += [
            f"### quality per byte ({setting})", "",
            "The best configuration measured within each budget of bytes held (over the dense bytes "
            "of the model's dtype), by retention.", "",
            "| budget | configuration | bytes / dense | retention |", "|---|---|---|---|",
        ]  # fmt: skip
        for b in got["budgets"]:
            e = b["best"]
            if e is None:
                lines.append(f"| {budget_label(b['budget'])} | none measured | - | - |")
            else:
                lines.append(f"| {budget_label(b['budget'])} | {configuration_label(e)} | {e['kept_fraction']:.3f} | {e['retention']:.2f} |")
        lines.append("")
    return lines


def markdown(summary: dict) -> str:
    tasks = summary["tasks"]
    lines = []
    for setting in ("question-agnostic", "query-aware"):
        entries = [e for e in summary["table"] if e["setting"] == setting]
        if not entries:
            continue
        lines += [f"### {setting}", ""]
        kept_tasks = summary.get("informative_tasks", {}).get(setting, [])
        # Rows that teacher-forced the reference answers: their mean log-probability per token.
        likely = any(e.get("answer_logprob") is not None for e in entries)
        lines.append(
            f"Retention: the score over the full cache's, averaged over the tasks where the full cache scores "
            f"at least {INFORMATIVE:g} ({', '.join(kept_tasks) or 'none'}). Seconds per sample: prefill, "
            f"the policy's own work (reconstruction passes included), decoding."
            + (" Answer logp: the reference answers' mean log-probability per token, each teacher-forced "
               "after the prompt; it breaks ties in retention in the front below." if likely else "")
        )
        lines.append("")
        # Quantized runs add how entries were held and the effective bits per element; runs that
        # read less (quest), what each decoding step read of the entries held.
        quantized = any(e["quant"] != "none" for e in entries)
        reading = any(e.get("read_fraction") is not None for e in entries)
        extra = (("quant", "bits") if quantized else ()) + (("read",) if reading else ())
        lines.append("| policy | ratio | " + "".join(f"{c} | " for c in extra) + " | ".join(tasks)
                     + " | mean | vs full | retention | " + ("answer logp | " if likely else "")
                     + "cache MiB | kept | s prefill | s policy | s decode |")
        lines.append("|---|---|" + "---|" * (len(extra) + len(tasks) + likely) + "---|---|---|---|---|---|---|---|")
        for e in entries:
            scores = " | ".join(f"{e['scores'][t]:.1f}" if t in e["scores"] else "-" for t in tasks)
            rel = "-" if e["relative_to_full"] is None else f"{e['relative_to_full']:.2f}"
            ret = "-" if e["retention"] is None else f"{e['retention']:.2f}"
            bits = "-" if e["bits_per_element"] is None else f"{e['bits_per_element']:.2f}"
            held = f"{e['quant']} | {bits} | " if quantized else ""
            if reading:
                held += "100% | " if e.get("read_fraction") is None else f"{e['read_fraction']:.0%} | "
            if likely:
                ret += " | -" if e.get("answer_logprob") is None else f" | {e['answer_logprob']:.3f}"
            lines.append(
                f"| {e['policy']} | {e['ratio']:g} | {held}{scores} | {e['mean']:.1f} | {rel} | {ret} | "
                f"{e['cache_bytes'] / 2**20:.1f} | {e['kept_fraction']:.0%} | {e['prefill_seconds']:.2f} | "
                f"{e['compress_seconds']:.2f} | {e['decode_seconds']:.2f} |"
            )
        lines.append("")
    lines += front_markdown(summary)
    questions = summary.get("questions")
    if questions:
        count = max(len(e["scores"]) for e in questions)
        lines += [
            "### questions per context",
            "",
            "Each context compressed once; question i answered from its own fork of the compressed cache. "
            "Retention on question i: the score over the full cache's on the same question.",
            "",
            "| policy | ratio | " + " | ".join(f"q{i + 1}" for i in range(count)) + " | "
            + " | ".join(f"retention q{i + 1}" for i in range(count)) + " |",
            "|---|---|" + "---|" * (2 * count),
        ]
        for e in questions:
            scores = " | ".join(f"{e['scores'].get(i, float('nan')):.1f}" for i in range(count))
            kept = " | ".join("-" if e["retention"].get(i) is None else f"{e['retention'][i]:.2f}" for i in range(count))
            lines.append(f"| {e['policy']} | {e['ratio']:g} | {scores} | {kept} |")
        lines.append("")
    calibration = summary.get("calibration_seconds")
    if calibration:
        parts = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in calibration.items())
        lines += [f"Calibration, once per model (`kvforge calibrate`, for razor, qfilters, kvzap): {parts}.", ""]
    sweep = summary.get("sweep")
    if sweep:
        est = sweep.get("estimated_prefill_seconds_per_row")
        lines.append(
            f"Sweep: {sweep['rows']} rows in {sweep['seconds']:.0f}s with {sweep['prefills']} prefills "
            f"({sweep['prefill_seconds']:.0f}s of prefill)"
            + (f"; one prefill per row would have spent ~{est:.0f}s on prefill alone "
               f"({sweep['per_row_prefill_seconds']:.2f}s measured on one sample with "
               f"{sweep['per_row_prefill_policy']})." if est else ".")
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict) -> bytes:
    """PNG: mean score against kept fraction, one line per policy, full as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in ("question-agnostic", "query-aware") if any(e["setting"] == s for e in summary["table"])]
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        entries = [e for e in summary["table"] if e["setting"] == setting]
        for policy, quant in sorted({(e["policy"], e["quant"]) for e in entries if e["policy"] != "full"}):
            pts = sorted((1 - e["ratio"], e["mean"]) for e in entries if (e["policy"], e["quant"]) == (policy, quant))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=labelled(policy, quant))
        full = next((e for e in entries if e["policy"] == "full" and e["quant"] == "none"), None)
        if full:
            ax.axhline(full["mean"], color="black", linestyle="--", label="full")
        ax.set(title=setting, xlabel="kept fraction of the cache (1 - ratio)", ylabel="mean score (0-100)", ylim=(-2, 102))
        ax.grid(alpha=0.3)
        ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def plot_bytes(summary: dict) -> bytes:
    """PNG: retention against bytes held over dense bytes, every configuration a point, the front
    a line, the budgets dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(summary.get("front", {}))
    fig, axes = plt.subplots(1, max(len(settings), 1), figsize=(6 * max(len(settings), 1), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        entries = [e for e in summary["table"] if e["setting"] == setting and e["retention"] is not None]
        for policy, quant in sorted({(e["policy"], e["quant"]) for e in entries}):
            pts = [(e["kept_fraction"], e["retention"]) for e in entries if (e["policy"], e["quant"]) == (policy, quant)]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=labelled(policy, quant), s=24)
        line = summary["front"][setting]["front"]
        ax.step([e["kept_fraction"] for e in line], [e["retention"] for e in line], where="post", color="black", label="front")
        for budget in (b["budget"] for b in summary["front"][setting]["budgets"]):
            ax.axvline(budget, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set(title=setting, xlabel="bytes held / dense bytes", ylabel="retention (score over the full cache's)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_reports(
    out: Path, rows: list[EvalRow], stats: SweepStats | None, calibration_seconds: dict[str, float] | None = None
) -> dict:
    """summary.json, summary.md, score_vs_ratio.png, score_vs_bytes.png; `calibration_seconds`: what the model's
    calibration cost (once per model), reported when a policy of the run needed it."""
    summary = summarize(rows, stats)
    if calibration_seconds:
        summary["calibration_seconds"] = calibration_seconds
    write_atomic(out / SUMMARY, json.dumps(summary, indent=2).encode())
    write_atomic(out / "summary.md", markdown(summary).encode())
    write_atomic(out / "score_vs_ratio.png", plot(summary))
    write_atomic(out / "score_vs_bytes.png", plot_bytes(summary))
    return summary
