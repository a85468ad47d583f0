"""`kvforge tune`: reading a memory size, choosing from a summary's configurations, the tuned
configuration file (and a damaged one), and the command end to end on a tiny random model, its
choice loaded by generate and eval with --config."""

from __future__ import annotations

import json

import pytest

from kvforge.cli import main
from kvforge.storage import QuantSpec
from kvforge.eval.tune import Memory, TunedConfig, choose, parse_memory
from kvforge.spec import KVSpec
from kvforge.storage import QuantSpec


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("text, memory", [
    ("1/8", Memory(fraction=0.125)), ("0.25", Memory(fraction=0.25)), ("1", Memory(fraction=1.0)),
    ("40MiB", Memory(nbytes=40 * 2**20)), ("512KiB", Memory(nbytes=512 * 1024)), ("1.5GB", Memory(nbytes=1_500_000_000)),
])  # fmt: skip
def test_memory_sizes(text, memory):
    assert parse_memory(text) == memory


@pytest.mark.parametrize("text, needle", [("1.5", "outside (0, 1]"), ("0/8", "outside"), ("1/0", "not understood"), ("40 parsecs", "not understood"), ("-1", "outside")])
def test_bad_memory_sizes_say_what_to_give(text, needle):
    with pytest.raises(ValueError) as err:
        parse_memory(text)
    assert needle in str(err.value) and "40MiB" in str(err.value) and "\n" not in str(err.value)


def entry(policy: str, ratio: float, quant: str, fraction: float, retention: float | None) -> dict:
    return {"policy": policy, "ratio": ratio, "quant": quant, "kept_fraction": fraction, "cache_bytes": fraction * 2**20, "retention": retention}


ENTRIES = [
    entry("full", 0.0, "none", 1.0, 1.0),
    entry("kvzip", 0.5, "none", 0.5, 1.0),
    entry("kvzip", 0.5, "int4", 0.1, 0.97),
    entry("kvzip", 0.75, "int4", 0.06, 0.9),
    entry("knorm", 0.75, "int4", 0.06, 0.95),
    entry("kvzip", 0.75, "int2", 0.03, 0.5),
    entry("broken", 0.9, "int2", 0.01, None),
]


def test_the_choice_is_the_best_within_the_memory_or_the_cheapest_keeping_the_retention():
    def named(e):
        return None if e is None else (e["policy"], e["ratio"], e["quant"])

    assert named(choose(ENTRIES, Memory(fraction=1 / 8))) == ("kvzip", 0.5, "int4")
    assert named(choose(ENTRIES, Memory(fraction=1 / 16))) == ("knorm", 0.75, "int4")
    assert named(choose(ENTRIES, Memory(nbytes=2**20 // 2))) == ("kvzip", 0.5, "none")  # retention ties: fewer bytes
    assert named(choose(ENTRIES, Memory(fraction=1 / 64))) is None  # only an unscored one fits
    assert named(choose(ENTRIES, min_retention=0.95)) == ("knorm", 0.75, "int4")
    assert named(choose(ENTRIES, min_retention=0.99)) == ("kvzip", 0.5, "none")
    assert choose(ENTRIES, min_retention=1.01) is None


def test_a_tuned_configuration_round_trips_and_a_damaged_one_is_refused(tmp_path):
    spec = KVSpec("kvzip", 0.75, QuantSpec("int4", group=16, prompt_residual=True))
    path = tmp_path / "tuned.json"
    TunedConfig(spec, "m", {"memory": "1/8"}, {"retention": 0.9}).save(path)
    assert TunedConfig.load(path).spec == spec
    text = path.read_text()
    for damage, needle in [
        (text[: len(text) // 2], "is damaged (not JSON"),
        (json.dumps({"kind": "something else"}), "is not a tuned configuration"),
        (text.replace('"policy": "kvzip"', '"policy": "nonesuch"'), "unknown policy 'nonesuch'"),
        (text.replace('"mode": "int4"', '"mode": "int3"'), "unknown mode 'int3'"),
        (text.replace('"ratio": 0.75', '"rate": 0.75'), "is damaged (missing or wrong field 'ratio')"),
    ]:
        path.write_text(damage)
        with pytest.raises(ValueError) as err:
            TunedConfig.load(path)
        assert needle in str(err.value) and str(path) in str(err.value)
    assert list(tmp_path.iterdir()) == [path]  # saving left no temporary file behind


@pytest.fixture
def cases(tmp_path):
    # A random model answers nothing, but an empty answer is in every text: every configuration
    # keeps the full cache's score, so the choice is the fewest bytes within the memory.
    path = tmp_path / "cases.jsonl"
    lines = [{"context": " ".join(f"w{(i * 7 + j) % 50}" for j in range(150)), "question": f"q{i}?", "answers": [""], "max_new_tokens": 3} for i in range(4)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_tune_writes_a_choice_that_generate_and_eval_reproduce(capsys, tmp_path, cases):
    out = tmp_path / "tuned.json"
    code, printed, err = run(
        capsys, "tune", "--model", "random:tiny", "--task-file", str(cases), "--memory", "1/4", "--policies", "knorm,streaming",
        "--ratios", "0.5,0.75", "--quant", "none,int4", "--quant-group", "8", "--out", str(out), "--batch", "2", "--check-all",
    )  # fmt: skip
    assert code == 0, err
    tuned = json.loads(out.read_text())
    summary = json.loads((tmp_path / "tuned.json.runs" / "tune" / "summary.json").read_text())
    fitting = [e for e in summary["table"] if e["kept_fraction"] <= 0.25]
    cheapest = min(fitting, key=lambda e: (e["kept_fraction"], e["policy"], e["ratio"]))
    assert (tuned["policy"], tuned["ratio"], QuantSpec(**tuned["quant"]).label) == (cheapest["policy"], cheapest["ratio"], cheapest["quant"])
    assert tuned["measured"]["samples"] == 2 and tuned["check"]["samples"] == 2  # half held out
    assert tuned["check"]["gap"] == 0.0 and tuned["check"]["best"]["retention"] == 1.0  # every row keeps the (empty) answer
    assert "chosen" in printed and f"--config {out}" in printed

    code, printed, err = run(capsys, "generate", "--model", "random:tiny", "--config", str(out), "--max-new-tokens", "2", "--json", "q?")
    assert code == 0, err
    got = json.loads(printed)
    assert (got["policy"], got["ratio"], got["quant"]) == (tuned["policy"], tuned["ratio"], QuantSpec(**tuned["quant"]).label)

    again = tmp_path / "again"
    code, _, err = run(capsys, "eval", "--model", "random:tiny", "--config", str(out), "--task-file", str(tmp_path / "tuned.json.runs" / "tune.jsonl"),
                       "--batch", "2", "--out", str(again))  # fmt: skip
    assert code == 0, err
    rows = json.loads((again / "summary.json").read_text())["table"]
    row = next(e for e in rows if (e["policy"], e["ratio"], e["quant"]) == (tuned["policy"], tuned["ratio"], QuantSpec(**tuned["quant"]).label))
    assert row["kept_fraction"] == tuned["measured"]["kept_fraction"] and row["mean"] == tuned["measured"]["mean"]


@pytest.mark.parametrize("argv, needle", [
    (["--memory", "1/8", "--min-retention", "0.9"], "give what to tune for"),
    ([], "give what to tune for"),
    (["--memory", "2"], "--memory '2' is outside (0, 1]"),
    (["--min-retention", "1.5"], "--min-retention 1.5 is outside (0, 1]"),
    (["--memory", "1/8", "--holdout", "0.9"], "leaves none to tune or check on"),
    (["--memory", "1/4096", "--policies", "streaming"], "every candidate keeps at least 5 (its sinks): give more memory"),
    (["--memory", "10B", "--policies", "knorm", "--quant", "none,int4", "--quant-group", "8"], "holds at most 0.2 entries per KV head"),
])  # fmt: skip
def test_bad_tune_requests_are_one_line_errors(capsys, tmp_path, cases, argv, needle):
    code, _, err = run(capsys, "tune", "--model", "random:tiny", "--task-file", str(cases), "--out", str(tmp_path / "t.json"), *argv)
    assert code == 2 and needle in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, needle", [
    (["--coverage", "1.5"], "--coverage 1.5 is outside (0, 1)"),
    (["--coverage", "0.9", "--ratio", "0.5"], "give it without --ratio or --budget"),
    (["--coverage", "0.9", "--policy", "snapkv"], "coverage:snapkv needs scores that are shares of attention"),
])  # fmt: skip
def test_bad_coverage_flags_are_one_line_errors(capsys, argv, needle):
    code, _, err = run(capsys, "generate", "--model", "random:tiny", "--policy", "kvzip", *argv, "q?")
    assert code == 2 and needle in err and err.count("\n") == 1


def test_a_configuration_with_parameters_reaches_generate_and_eval(capsys, tmp_path, cases):
    path = tmp_path / "tuned.json"
    TunedConfig(KVSpec("snapkv", 0.5, QuantSpec(), params=(("window", 4),)), "random:tiny", {"memory": "1/2"}, {}).save(path)
    argv = ["generate", "--model", "random:tiny", "--max-new-tokens", "3", "--json", "q?"]
    code, printed, err = run(capsys, *argv, "--config", str(path))
    assert code == 0, err
    by_flags = json.loads(run(capsys, *argv, "--policy", "snapkv", "--ratio", "0.5", "--param", "window=4")[1])
    assert json.loads(printed)["policy"] == by_flags["policy"] == "snapkv[window=4]"
    out = tmp_path / "eval"
    code, _, err = run(capsys, "eval", "--model", "random:tiny", "--config", str(path), "--task-file", str(cases), "--batch", "2", "--out", str(out))
    assert code == 0, err
    assert {e["policy"] for e in json.loads((out / "summary.json").read_text())["table"]} == {"full", "snapkv[window=4]"}
