"""Task generators, scoring, the resumable sweep, reports and fidelity."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from kvforge.eval.fidelity import fidelity
from kvforge.eval.report import markdown, retention, summarize, write_reports
from kvforge.eval.runner import ROWS, EvalConfig, read_rows, run_eval
from kvforge.eval.tasks import TASKS, Case, load_task_file, make_case, prompt_length, score
from kvforge.models import default_checkpoint, load_model
from kvforge.policies import make_policy


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(default_checkpoint())


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_model(str(tiny_checkpoint))


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [512, 2048])
def test_task_prompt_has_the_requested_length(tok, task, length):
    case = make_case(tok, task, length, seed=1)
    assert length - 10 <= prompt_length(tok, case, chat=True) <= length


@pytest.mark.parametrize("task", list(TASKS))
def test_tasks_are_deterministic_per_seed(tok, task):
    a, b, c = (make_case(tok, task, 1024, seed=s) for s in (4, 4, 5))
    assert a == b
    assert a.context != c.context or a.answers != c.answers


@pytest.mark.parametrize("task", [t for t in TASKS if t != "cwe"])
def test_needles_sit_at_their_depth_and_answers_are_in_the_prompt(tok, task):
    case = make_case(tok, task, 2048, seed=2)
    body = case.context.split("\n", 1)[1]  # the haystack, after the instruction line
    for needle, depth in zip(case.needles, case.depths):
        assert body.count(needle) == 1
        assert body.index(needle) / len(body) == pytest.approx(depth, abs=0.03)
    for answer in case.answers:
        assert answer in case.context


def test_vt_chain_resolves_to_the_answers(tok):
    case = make_case(tok, "vt", 1024, seed=3)
    assigned = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", case.context))
    value = re.search(r"value (\d+)", case.question).group(1)

    def resolve(name: str) -> str:
        target = assigned[name]
        return resolve(target[4:]) if target.startswith("VAR ") else target

    assert sorted(n for n in assigned if resolve(n) == value) == sorted(case.answers)


def test_cwe_answers_are_the_most_common_words(tok):
    case = make_case(tok, "cwe", 2048, seed=3)
    counts = Counter(re.findall(r"^\d+\. (\w+)$", case.context, flags=re.M))
    top = [w for w, _ in counts.most_common(10)]
    assert sorted(top) == sorted(case.answers)
    assert counts.most_common(11)[-1][1] < counts.most_common(10)[-1][1]  # a clear margin


def test_scoring_on_hand_made_strings():
    case = Case("t", "", "", "", ["1234567", "7654321"])
    assert score(" 1234567 and 7654321.", case) == 100
    assert score(" 1234567 only", case) == 50
    assert score(" nothing", case) == 0
    anycase = Case("t", "", "", "", ["Paris", "paris, france"], match="any")
    assert score("It is PARIS.", anycase) == 100
    assert score("Rome", anycase) == 0


def test_bad_task_and_length(tok):
    with pytest.raises(ValueError, match="unknown task 'nope'; known tasks: niah_single"):
        make_case(tok, "nope", 1024, seed=0)
    with pytest.raises(ValueError, match="exceeds the model's context of 8192 tokens"):
        make_case(tok, "niah_single", 9000, seed=0, max_length=8192)


def test_task_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"context": "a b", "question": "q?", "answers": ["x", "y"]}) + "\n\n")
    (case,) = load_task_file(path)
    assert case.task == "mine" and case.match == "any"
    path.write_text('{"context": "a"}\n')
    with pytest.raises(ValueError, match="mine.jsonl:1: each line must be a JSON object with 'context'"):
        load_task_file(path)


def test_task_file_cases_carry_answer_prefix_and_max_new_tokens(tmp_path):
    path = tmp_path / "ruler.jsonl"
    lines = [
        {"context": "a", "question": "q", "answers": ["x"]},  # before any file default: 64 tokens, no prefix
        {"answer_prefix": " The answer is", "max_new_tokens": 16},  # file default for the cases after it
        {"context": "b", "question": "q", "answers": ["x"]},
        {"context": "c", "question": "q", "answers": ["x"], "max_new_tokens": 8, "answer_prefix": ""},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    cases = load_task_file(path)
    assert [(c.answer_prefix, c.max_new_tokens) for c in cases] == [("", 64), (" The answer is", 16), ("", 8)]
    path.write_text(json.dumps({"context": "a", "question": "q", "answers": ["x"], "max_new_tokens": 0}))
    with pytest.raises(ValueError, match=r"ruler.jsonl:1: max_new_tokens=0 is outside the allowed range \[1, 4096\]"):
        load_task_file(path)
    path.write_text(json.dumps({"answer_prefix": 3}))
    with pytest.raises(ValueError, match="'answer_prefix' must be a str, got 3"):
        load_task_file(path)


def test_retention_counts_only_tasks_the_full_cache_can_do():
    full = {"a": 80.0, "b": 40.0, "c": 100.0}
    assert retention({"a": 40.0, "b": 40.0, "c": 100.0}, full) == pytest.approx((0.5 + 1.0) / 2)
    assert retention({"b": 10.0}, full) is None


def config(**kw) -> EvalConfig:
    base = dict(model="tiny", tasks=["niah_single"], policies=["full", "knorm"], ratios=[0.5], length=256, samples=2)
    base.update(kw)
    return EvalConfig(**base)


def test_config_errors():
    for kw, msg in [
        (dict(tasks=["x"]), "unknown task 'x'"),
        (dict(policies=["full", "y"]), "unknown policy 'y'; known policies: adakv, cake, chunk"),
        (dict(samples=0), "--samples 0 must be at least 1"),
        (dict(ratios=[1.5]), "ratio 1.5 is outside [0, 1)"),
        (dict(policies=["snapkv[windw=4]"]), "policy 'snapkv[windw=4]' has no parameter 'windw'; its parameters:"),
        (dict(policies=["snapkv[window]"]), "parameter 'window' must look like NAME=VALUE"),
    ]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            config(**kw).validate()


def count_prefills(model, min_tokens: int) -> tuple[list[int], object]:
    """Count forward passes of at least `min_tokens` tokens (prefills) with a forward pre-hook."""
    calls: list[int] = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] >= min_tokens:
            calls.append(ids.shape[1])

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_sweep_resume_and_reports(tiny, tmp_path):
    out = tmp_path / "run"
    cfg = config(settings=[False, True])
    calls, handle = count_prefills(tiny.model, 150)
    try:
        rows, stats = run_eval(tiny, cfg, out)
    finally:
        handle.remove()
    assert len(rows) == 2 * 2 * 2  # samples x settings x (full, knorm 0.5)
    # One prefill per sample and setting, plus one measured per-row prefill for the report.
    assert len(calls) == 2 * 2 + 1 and stats.prefills == 4
    lines = (out / ROWS).read_text().splitlines()
    assert len(lines) == 8 and {json.loads(l)["query_aware"] for l in lines} == {False, True}
    full_rows = [r for r in rows if r.policy == "full"]
    assert all(r.cache_bytes == r.dense_bytes for r in full_rows)
    assert all(r.cache_bytes < 0.7 * r.dense_bytes for r in rows if r.policy == "knorm")
    assert all(r.answer_logprob is not None and r.answer_logprob < 0 for r in rows)  # the needle teacher-forced

    # Resume: nothing left to do.
    seen: list = []
    again, stats2 = run_eval(tiny, cfg, out, on_row=seen.append)
    assert seen == [] and len(again) == 8 and stats2.prefills == 0

    # An interrupted write leaves a torn last line: it is dropped and only that row is redone.
    text = (out / ROWS).read_text()
    (out / ROWS).write_text(text[: len(text) - 40])
    redone: list = []
    final, _ = run_eval(tiny, cfg, out, on_row=redone.append)
    assert len(redone) == 1 and len(read_rows(out / ROWS)) == 8

    summary = write_reports(out, final, stats)
    md = (out / "summary.md").read_text()
    assert "| knorm | 0.5 |" in md and "question-agnostic" in md and "query-aware" in md
    assert (out / "score_vs_ratio.png").read_bytes()[:8] == (out / "score_vs_bytes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text())["rows"] == 8
    assert summary["sweep"]["estimated_prefill_seconds_per_row"] > 0

    # Fewer samples report only theirs, computing nothing; more samples (or policies) extend the run.
    fewer, stats3 = run_eval(tiny, config(samples=1, settings=[False, True]), out)
    assert len(fewer) == 4 and stats3.prefills == 0
    more, stats4 = run_eval(tiny, config(samples=3, settings=[False, True], batch=1), out)
    assert len(more) == 12 and stats4.prefills == 2  # sample 2, both settings
    wider, _ = run_eval(tiny, config(samples=3, settings=[False, True], batch=1, policies=["full", "knorm", "streaming"]), out)
    assert len(wider) == 18 and len(read_rows(out / ROWS)) == 18
    assert len(run_eval(tiny, config(settings=[False, True]), out)[0]) == 8  # asks for full and knorm only
    # Another task extends the directory too, and the first task alone is still reported alone.
    two_tasks, stats5 = run_eval(tiny, config(samples=1, settings=[False, True], tasks=["niah_single", "vt"]), out)
    assert {r.task for r in two_tasks} == {"niah_single", "vt"} and stats5.prefills == 2  # vt, both settings
    assert {r.task for r in run_eval(tiny, config(settings=[False, True]), out)[0]} == {"niah_single"}

    # Another configuration in the same --out is refused, unless forced.
    with pytest.raises(ValueError, match="holds results of a different configuration"):
        run_eval(tiny, config(length=300), out)
    forced, _ = run_eval(tiny, config(samples=1), out, force=True)
    assert len(forced) == 2 and len(read_rows(out / ROWS)) == 2


def test_fidelity_of_full_is_exact_and_compression_diverges(tiny):
    ids = torch.randint(5, 128, (96,), generator=torch.Generator().manual_seed(0)).tolist()
    full, knorm = fidelity(tiny, ids, 64, [make_policy("full"), make_policy("knorm", ratio=0.75)])
    assert full.kl == 0 and full.top1_agreement == 100 and full.positions == 32
    assert knorm.kl > 0 and knorm.cache_bytes < full.cache_bytes


def test_two_runs_never_write_one_out_dir(tiny, tmp_path):
    from kvforge.eval.runner import lock_out

    held = lock_out(tmp_path / "busy")
    try:
        with pytest.raises(ValueError, match="another kvforge eval is writing to"):
            run_eval(tiny, config(samples=1), tmp_path / "busy")
    finally:
        held.close()
    rows, _ = run_eval(tiny, config(samples=1), tmp_path / "busy")  # free again
    assert len(rows) == 2


def test_chunked_sweep_prefills_every_policy_itself(tiny, tmp_path):
    cfg = config(prefill_chunk=64)
    calls, handle = count_prefills(tiny.model, 64)
    try:
        rows, stats = run_eval(tiny, cfg, tmp_path / "chunked")
    finally:
        handle.remove()
    # Each (policy, ratio) prefills each sample itself, 64 tokens at a time.
    assert stats.prefills == 2 * 2 and len(calls) >= 2 * 2 * 2 and max(calls) == 64
    one_shot, _ = run_eval(tiny, config(), tmp_path / "one-shot")
    key = lambda r: (r.sample, r.policy)  # noqa: E731
    for a, b in zip(sorted(rows, key=key), sorted(one_shot, key=key)):
        if a.policy == "full":
            assert a.answer == b.answer  # ratio 0: chunking changes nothing
        else:
            assert a.cache_bytes == b.cache_bytes  # the same ratio of the same prompt is kept
            assert a.compress_seconds > 0  # the compressions inside the chunked prefills


def test_questions_per_context_answer_from_one_compression(tiny, tmp_path):
    cfg = config(tasks=["niah_multikey"], policies=["full", "kvzip"], questions=3, samples=2, length=300)
    calls, handle = count_prefills(tiny.model, 200)
    try:
        rows, stats = run_eval(tiny, cfg, tmp_path / "multi")
    finally:
        handle.remove()
    assert len(rows) == 2 * 2 * 3  # samples x (full, kvzip 0.5) x questions
    assert stats.prefills == 2  # one prefill per context serves every policy and every question
    by_question = {q: [r for r in rows if r.question == q and r.policy == "kvzip"] for q in range(3)}
    assert all(r.cache_bytes < 0.7 * r.dense_bytes for q in by_question.values() for r in q)
    answers = {(r.sample, r.question): r.answers for r in rows if r.policy == "full"}
    assert answers[(0, 0)] != answers[(0, 1)] != answers[(0, 2)]
    summary = write_reports(tmp_path / "multi", rows, stats)
    assert [e["policy"] for e in summary["questions"]] == ["full", "kvzip"]
    assert "retention q3" in (tmp_path / "multi" / "summary.md").read_text()
    with pytest.raises(ValueError, match="needs tasks with several keyed needles"):
        config(tasks=["niah_single"], questions=2).validate()
    with pytest.raises(ValueError, match=r"--questions-per-context 5 is outside the allowed range \[1, 4\]"):
        config(tasks=["niah_multikey"], questions=5).validate()


def test_a_policy_at_ratio_0_is_a_row_mixed_holds_by_its_score(tiny, tmp_path):
    """Ratio 0 keeps every entry; with --quant mixed the policy's score still decides the bits
    (MiKV's form: the entries eviction would drop held in int2 instead)."""
    rows, _ = run_eval(tiny, config(policies=["full", "knorm"], ratios=[0.0], quant=["mixed"], quant_group=4), tmp_path / "mikv")
    kept = {r.policy: r for r in rows if r.sample == 0}
    assert set(kept) == {"full", "knorm"} and kept["knorm"].ratio == 0.0
    assert kept["knorm"].cache_bytes == kept["full"].cache_bytes  # nothing evicted, the same bits
    assert 2 < kept["knorm"].bits_per_element < 32


def test_quant_modes_are_rows_derived_from_the_same_prefill(tiny, tmp_path):
    out = tmp_path / "quant"
    run_eval(tiny, config(), out)  # an earlier run in full precision
    calls, handle = count_prefills(tiny.model, 150)
    try:
        rows, stats = run_eval(tiny, config(quant=["none", "int8", "int2"], quant_group=8, quant_residual=16), out)
    finally:
        handle.remove()
    assert len(rows) == 2 * 2 * 3  # samples x (full, knorm 0.5) x modes; "none" rows reused
    assert stats.prefills == 2 and len(calls) == 2 + 1  # one prefill per sample serves every mode
    by = {(r.sample, r.policy, r.quant): r for r in rows}
    for s in range(2):
        for policy in ("full", "knorm"):
            none, int8, int2 = (by[(s, policy, m)] for m in ("none", "int8/g8", "int2/g8"))
            assert none.cache_bytes > int8.cache_bytes > int2.cache_bytes
            assert 32 == none.bits_per_element > int8.bits_per_element > int2.bits_per_element
    md = markdown(summarize(rows))
    assert "| policy | ratio | quant | bits |" in md and "| knorm | 0.5 | int2/g8 |" in md
    with pytest.raises(ValueError, match="--quant-group 6 does not divide"):
        run_eval(tiny, config(quant=["int4"], quant_group=6), tmp_path / "bad")


def test_rows_name_their_policy_parameters_and_key_group(tiny, tmp_path):
    """Settings that differ only in a parameter or a key group are rows of their own in one
    directory (and one report): the names carry them."""
    out = tmp_path / "named"
    policies = ["full", "snapkv", "snapkv[window=4]", "smooth:snapkv[kernel=5,pool=max]"]
    rows, _ = run_eval(tiny, config(policies=policies, quant=["int4", "int4/g8"], quant_group=16), out)
    names = {(r.policy, r.quant) for r in rows}
    assert names == {(p, q) for p in ("full", "snapkv", "snapkv[window=4]", "smooth:snapkv[kernel=5,pool=max]") for q in ("int4/g16", "int4/g8")}
    by = {(r.sample, r.policy, r.quant): r for r in rows}
    # --quant-group 16 is what a mode without its own group gets; int4/g8 holds twice the scales.
    assert by[(0, "full", "int4/g8")].bits_per_element > by[(0, "full", "int4/g16")].bits_per_element
    md = markdown(summarize(rows))
    assert "| snapkv[window=4] | 0.5 | int4/g8 |" in md and "| smooth:snapkv[kernel=5,pool=max] | 0.5 | int4/g16 |" in md
    seen: list = []
    run_eval(tiny, config(policies=policies, quant=["int4", "int4/g8"], quant_group=16), out, on_row=seen.append)
    assert seen == []  # resumed by name: nothing redone


def test_rows_written_before_labels_named_their_group_are_renamed_once(tiny, tmp_path):
    out = tmp_path / "old"
    run_eval(tiny, config(quant=["int4"], quant_group=8), out)
    # What an older kvforge wrote: `int4` for groups of 8, and no group_labels in the config.
    rows = [json.loads(line) for line in (out / ROWS).read_text().splitlines()]
    (out / ROWS).write_text("".join(json.dumps({**r, "quant": "int4"}) + "\n" for r in rows))
    stored = json.loads((out / "config.json").read_text())
    del stored["group_labels"]
    (out / "config.json").write_text(json.dumps(stored))
    seen: list = []
    again, _ = run_eval(tiny, config(quant=["int4"], quant_group=8), out, on_row=seen.append)
    assert seen == [] and {r.quant for r in again} == {"int4/g8"}  # renamed, resumed, nothing redone
    # Afterwards rows of another group join the directory; the renamed rows keep their name.
    both, _ = run_eval(tiny, config(quant=["int4", "int4/g8"], quant_group=16), out)
    assert {r.quant for r in both} == {"int4/g16", "int4/g8"} and len(both) == 2 * 2 * 2
    assert {r["quant"] for r in map(json.loads, (out / ROWS).read_text().splitlines())} == {"int4/g16", "int4/g8"}


def test_labels_of_one_setting_are_one_row_and_a_group_label_still_says_mixed(tiny, tmp_path):
    assert [c.key for c in config(quant=["int4/g8", "int4"], quant_group=8).combos()] == [
        ("full", 0.0, "int4/g8"), ("knorm", 0.5, "int4/g8")
    ]
    out = tmp_path / "mixed"
    run_eval(tiny, config(quant=["mixed/g8"], samples=1), out)
    with pytest.raises(ValueError, match="holds results of a different configuration"):
        run_eval(tiny, config(quant=["mixed/g8"], samples=1, quant_split=0.5), out)  # the split matters to mixed
