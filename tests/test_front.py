"""Quality per byte (`kvforge.eval.front`, and the summary's front): hand-made rows, known answers."""

from __future__ import annotations

from kvforge.eval.front import best_within, budget_label, configuration_label, front
from kvforge.eval.report import markdown, summarize
from kvforge.eval.runner import EvalRow

DENSE = 1000


def rows_of(policy: str, ratio: float, quant: str, kept: float, scores: dict[str, float]) -> list[EvalRow]:
    """One row per task: `kept` of the dense bytes held, the task's score."""
    return [
        EvalRow(
            task=task, sample=0, query_aware=False, policy=policy, ratio=ratio, prompt_hash="h", prompt_tokens=10, answer="",
            answers=[], score=score, cache_bytes=int(kept * DENSE), dense_bytes=DENSE, prefill_seconds=0.0, compress_seconds=0.0,
            decode_seconds=0.0, generated_tokens=1, quant=quant,
        )  # fmt: skip
        for task, score in scores.items()
    ]


def made_up() -> list[EvalRow]:
    return [
        *rows_of("full", 0.0, "none", 1.0, {"a": 100, "b": 80}),
        *rows_of("kvzip", 0.5, "none", 0.5, {"a": 100, "b": 80}),  # retention 1.00 at 1/2
        *rows_of("kvzip", 0.5, "int4", 0.139, {"a": 100, "b": 72}),  # 0.95 at 0.139
        *rows_of("kvzip", 0.75, "int4", 0.096, {"a": 90, "b": 56}),  # 0.80 at 0.096
        *rows_of("knorm", 0.75, "int4", 0.07, {"a": 50, "b": 40}),  # 0.50 at 0.07
        *rows_of("streaming", 0.875, "none", 0.125, {"a": 60, "b": 40}),  # 0.55 at 1/8: beaten by a cheaper one
        *rows_of("knorm", 0.5, "none", 0.5, {"a": 60, "b": 40, "c": 10}),  # c: full never ran it, left out
    ]


def test_each_budget_gets_the_best_configuration_holding_at_most_that_many_bytes():
    table = summarize(made_up())["table"]
    best = {budget_label(b["budget"]): b["best"] for b in best_within(table)}
    assert best["1/2"]["policy"] == "kvzip" and (best["1/2"]["ratio"], best["1/2"]["quant"]) == (0.5, "none")
    assert (best["1/4"]["ratio"], best["1/4"]["quant"]) == (0.5, "int4")
    assert (best["1/8"]["policy"], best["1/8"]["ratio"], best["1/8"]["quant"]) == ("kvzip", 0.75, "int4")
    assert (best["1/16"], best["1/32"]) == (None, None)  # nothing this small was measured


def test_the_front_keeps_what_no_cheaper_configuration_beats():
    table = summarize(made_up())["table"]
    shown = [(e["policy"], e["ratio"], e["quant"], round(e["retention"], 2)) for e in front(table)]
    assert shown == [("knorm", 0.75, "int4", 0.5), ("kvzip", 0.75, "int4", 0.8), ("kvzip", 0.5, "int4", 0.95), ("kvzip", 0.5, "none", 1.0)]


def test_the_summary_reports_the_front_by_budget():
    summary = summarize(made_up())
    budgets = summary["front"]["question-agnostic"]["budgets"]
    assert [b["best"] and b["best"]["policy"] for b in budgets] == ["kvzip", "kvzip", "kvzip", None, None]
    md = markdown(summary)
    assert "| 1/8 | kvzip 0.75 + int4 | 0.096 | 0.80 |" in md and "| 1/16 | none measured | - | - |" in md


def test_a_configuration_is_named_by_policy_ratio_and_codec_and_the_full_cache_without_a_ratio():
    label = lambda policy, ratio, quant: configuration_label({"policy": policy, "ratio": ratio, "quant": quant})  # noqa: E731
    assert label("kvzip", 0.75, "int4") == "kvzip 0.75 + int4"
    assert label("kvzip", 0.5, "none") == "kvzip 0.5"
    assert label("full", 0.0, "int4") == "full + int4"


def test_equal_retention_goes_to_the_likelier_answers_then_to_fewer_bytes():
    def entry(policy: str, kept: float, logprob: float | None) -> dict:
        return {"policy": policy, "ratio": 0.75, "quant": "int4", "kept_fraction": kept, "retention": 1.0, "answer_logprob": logprob}

    cheap_unlikely, dear_likely = entry("kvzap", 0.0568, -0.9), entry("kvzip", 0.0570, -0.4)
    unmeasured = entry("snapkv", 0.03, None)
    assert best_within([cheap_unlikely, dear_likely, unmeasured], (1 / 16,))[0]["best"] is dear_likely
    assert best_within([cheap_unlikely, dear_likely], (0.0569,))[0]["best"] is cheap_unlikely  # the likelier one does not fit
    assert best_within([unmeasured, entry("h2o", 0.04, None)], (1 / 16,))[0]["best"] is unmeasured  # neither measured: bytes
    better = {**unmeasured, "retention": 1.01}
    assert best_within([dear_likely, better], (1 / 16,))[0]["best"] is better  # retention first


def test_the_summary_carries_the_answers_likelihood_and_shows_it():
    rows = made_up()
    for r in rows:
        r.answer_logprob = -0.25 if r.policy == "full" else -1.5
    summary = summarize(rows)
    full = summary["table"][0]
    assert full["policy"] == "full" and full["answer_logprob"] == -0.25
    assert "| answer logp |" in markdown(summary) and "| 1.00 | -0.250 |" in markdown(summary)
    assert summarize(made_up())["table"][0]["answer_logprob"] is None and "answer logp" not in markdown(summarize(made_up()))
