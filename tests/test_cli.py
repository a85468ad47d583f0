"""The `kvforge` command on a tiny local checkpoint: output shape and every user error."""

from __future__ import annotations

import io
import json

import pytest

from kvforge.cli import main
from kvforge.storage import QuantSpec


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(" ".join(f"w{i % 100}" for i in range(200)))
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse rejects bad option values itself
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json(capsys, tiny_checkpoint, doc):
    code, out, _ = run(
        capsys, "generate", "--model", str(tiny_checkpoint), "--policy", "snapkv", "--ratio", "0.5",
        "--max-new-tokens", "5", "--prompt-file", str(doc), "--json", "w1 w2 w3",
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)
    for key in ("text", "prompt_tokens", "generated_tokens", "policy", "ratio", "cache_bytes", "dense_cache_bytes", "seconds"):
        assert key in result
    assert result["policy"] == "snapkv" and result["ratio"] == 0.5 and result["query_aware"] is False
    assert 1 <= result["generated_tokens"] <= 5
    # 200 context words are compressed to 100; the question and template tokens stay whole.
    assert result["kept_bytes"] < 0.6 * result["dense_cache_bytes"]
    assert result["kept_bytes"] <= result["cache_bytes"] <= result["peak_cache_bytes"] <= result["dense_cache_bytes"]


def test_generate_json_says_what_a_page_reader_read(capsys, tiny_checkpoint, doc):
    argv = ["generate", "--model", str(tiny_checkpoint), "--policy", "full", "--max-new-tokens", "4",
            "--prompt-file", str(doc), "--json", "w1 w2 w3"]  # fmt: skip
    plain = json.loads(run(capsys, *argv)[1])
    reading = json.loads(run(capsys, *argv, "--quant", "centroid0.25")[1])
    assert plain["read_fraction"] is None and reading["quant"] == "centroid0.25"
    assert 0.2 < reading["read_fraction"] < 0.5  # a quarter of the pages, the first and last always
    assert reading["cache_bytes"] > plain["cache_bytes"]  # the page sums are held too
    code, _, err = run(capsys, *argv, "--quant", "centroid1.5")
    assert code != 0 and "centroid1.5" in err and "(0, 1)" in err


def test_fidelity_table_names_each_configuration_whole_within_80_columns(capsys, tiny_checkpoint, doc):
    code, out, _ = run(
        capsys, "fidelity", "--model", str(tiny_checkpoint), "--text-file", str(doc), "--policies", "full,knorm",
        "--ratios", "0.875", "--context", "150", "--continuation", "6", "--quant", "none,int4/centroid0.125",
        "--quant-group", "16",
    )  # fmt: skip
    assert code == 0
    assert "knorm 0.875 int4/g16/centroid0.125" in out and "full int4/g16/centroid0.125" in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_fidelity_measures_a_low_rank_cache_once_its_bases_are(capsys, tiny_checkpoint, doc, tmp_path, monkeypatch):
    monkeypatch.setenv("KVFORGE_CACHE", str(tmp_path))  # no bases yet: fidelity measures them
    code, out, _ = run(
        capsys, "fidelity", "--model", str(tiny_checkpoint), "--text-file", str(doc), "--policies", "full",
        "--context", "150", "--continuation", "6", "--quant", "none,r8,think8",
    )  # fmt: skip
    assert code == 0 and "full think8" in out and "full r8" in out
    assert list(tmp_path.glob("lowrank-*.safetensors"))


def test_generate_in_bfloat16_holds_half_the_bytes(capsys, tiny_checkpoint, doc):
    argv = ["generate", "--model", str(tiny_checkpoint), "--policy", "knorm", "--ratio", "0.5", "--max-new-tokens", "3",
            "--prompt-file", str(doc), "--json", "--device", "cpu", "w1 w2 w3"]  # fmt: skip
    f32 = json.loads(run(capsys, *argv)[1])
    bf16 = json.loads(run(capsys, *argv, "--dtype", "bfloat16")[1])
    assert bf16["kept_bytes"] * 2 == f32["kept_bytes"] and bf16["dense_cache_bytes"] * 2 == f32["dense_cache_bytes"]
    assert bf16["bits_per_element"] == 16 and bf16["generated_tokens"] >= 1


def test_cuda_without_a_cuda_device_is_a_clear_error(capsys, tiny_checkpoint, doc):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    code, _, err = run(capsys, "generate", "--model", str(tiny_checkpoint), "--device", "cuda", "q")
    assert code == 2 and "torch sees no CUDA device; use --device cpu" in err


def test_generate_query_aware_compresses_the_whole_prompt(capsys, tiny_checkpoint, doc):
    argv = ["generate", "--model", str(tiny_checkpoint), "--policy", "knorm", "--ratio", "0.5", "--max-new-tokens", "1",
            "--prompt-file", str(doc), "--json", "w1 w2 w3"]  # fmt: skip
    agnostic = json.loads(run(capsys, *argv)[1])
    aware = json.loads(run(capsys, *argv, "--query-aware")[1])
    assert aware["query_aware"] is True
    assert aware["cache_bytes"] < agnostic["cache_bytes"]  # the question was compressed too


def test_policies_lists_every_policy_with_parameters(capsys):
    from kvforge import all_policies

    code, out, _ = run(capsys, "policies")
    assert code == 0
    for name in all_policies():
        assert name in out
    assert "window=64" in out and "sinks=4" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--policy", "nope"], "unknown policy 'nope'; known policies: adakv, cake, chunk"),
        (["--ratio", "1.0"], "outside [0, 1)"),
        (["--ratio", "-0.1"], "outside [0, 1)"),
        (["--max-new-tokens", "0"], "--max-new-tokens=0 must be at least 1"),
        (["--policy", "full", "--ratio", "0.5"], "ratio=0.5 is outside the allowed range [0.0, 0.0]"),
        (["--param", "window=0"], "window=0 is outside the allowed range [1, inf)"),
        (["--param", "bogus=1"], "has no parameter 'bogus'"),
        (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
        (["--device", "mps"], "--device 'mps': kvforge runs on cpu or cuda"),
        (["--device", "gpu0"], "--device 'gpu0' is not a device; use cpu, cuda or cuda:N"),
    ],
)
def test_bad_arguments_give_one_line_errors(capsys, tiny_checkpoint, doc, argv, message):
    code, _, err = run(capsys, "generate", "--model", str(tiny_checkpoint), "--prompt-file", str(doc), *argv, "q")
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_generate_without_a_context_and_from_standard_input(capsys, monkeypatch, tiny_checkpoint, doc):
    code, out, _ = run(capsys, "generate", "--model", str(tiny_checkpoint), "--max-new-tokens", "4", "--json", "w5 w6")
    assert code == 0 and json.loads(out)["generated_tokens"] >= 1  # nothing to compress but the template
    args = ("generate", "--model", str(tiny_checkpoint), "--max-new-tokens", "4", "--json", "--policy", "knorm", "--ratio", "0.5")
    from_file = json.loads(run(capsys, *args, "--prompt-file", str(doc), "q")[1])
    monkeypatch.setattr("sys.stdin", io.StringIO(doc.read_text()))
    from_stdin = json.loads(run(capsys, *args, "--prompt-file", "-", "q")[1])
    assert from_stdin["text"] == from_file["text"] and from_stdin["prompt_tokens"] == from_file["prompt_tokens"]


def test_prompt_longer_than_the_context(capsys, tiny_checkpoint, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text(" ".join(["w5"] * 600))
    code, _, err = run(capsys, "generate", "--model", str(tiny_checkpoint), "--prompt-file", str(long), "q")
    assert code == 2
    assert "the prompt is 607 tokens" in err and "the model's context is 512 tokens" in err


@pytest.mark.parametrize("model", ["/no/such/dir", "README.md"])
def test_unreadable_model(capsys, doc, model):
    code, _, err = run(capsys, "generate", "--model", model, "--prompt-file", str(doc), "q")
    assert code == 2 and f"cannot read model {model!r}" in err


def test_unreadable_prompt_file(capsys, tiny_checkpoint, tmp_path):
    code, _, err = run(capsys, "generate", "--model", str(tiny_checkpoint), "--prompt-file", str(tmp_path / "x"), "q")
    assert code == 2 and "cannot read --prompt-file" in err



def test_demo_runs_every_policy_and_reports_kept_bytes(capsys, tiny_checkpoint):
    from kvforge.cli.evaluate import FRONT
    from kvforge.policies import methods

    code, out, err = run(capsys, "demo", "--model", str(tiny_checkpoint), "--length", "300", "--max-new-tokens", "2", "--json")
    assert code == 0, err
    rows = json.loads(out.strip().splitlines()[-1])
    front = [r for r in rows if r["quant"] != "none"]  # the front's configurations, after every method
    rows = [r for r in rows if r["quant"] == "none"]
    assert [r["policy"] for r in rows] == methods()
    int4 = QuantSpec("int4", group=16).label  # the default group where it divides the tiny model's head_dim
    assert {(r["policy"], r["ratio"], r["quant"]) for r in front} == {(p, r, int4) for p, r in FRONT}
    assert "quality per byte on this sample" in out
    full = rows[0]
    assert full["cache_bytes"] == full["dense_bytes"]
    assert all(r["cache_bytes"] < 0.7 * r["dense_bytes"] for r in rows[1:])
    assert len({r["prefill_seconds"] for r in rows}) == 1  # one prefill served every method
    table = out.strip().splitlines()[:-1]  # printed at rich's 80 columns (not a terminal): nothing cut
    assert "…" not in "\n".join(table) and max(len(line) for line in table) <= 80


def test_the_demo_table_fits_80_columns_with_large_figures():
    import io

    from rich.console import Console

    from kvforge.cli.evaluate import demo_table
    from kvforge.eval.runner import EvalRow

    row = EvalRow(
        task="niah_single", sample=0, query_aware=False, policy="expected_attention", ratio=0.875, prompt_hash="h", prompt_tokens=4096,
        answer="a long answer\nover lines", answers=["x"], score=100.0, cache_bytes=int(156.25 * 2**20), dense_bytes=int(312.5 * 2**20),
        prefill_seconds=99.9, compress_seconds=124.95, decode_seconds=100.5, generated_tokens=8,
    )  # fmt: skip
    out = io.StringIO()
    Console(file=out, width=80).print(demo_table("title", [row]))
    text = out.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert "expected_attention" in text and "156.25" in text and "124.95" in text and "100.5" in text and "50%" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shape", "gpt-9"], "--shape 'gpt-9' is not known; use one of llama-3.1-8b, default"),
        (["--batches", "0"], "--lengths and --batches must be positive integers"),
        (["--lengths", "1k"], "must be comma-separated integers"),
    ],
)
def test_attention_bench_errors(capsys, argv, message):
    code, _, err = run(capsys, "bench", "--attention-only", "--device", "cpu", *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_attention_bench_prints_a_table(capsys):
    code, out, _ = run(capsys, "bench", "--attention-only", "--device", "cpu", "--shape", "default", "--lengths", "64",
                       "--batches", "1", "--quant", "none,int8", "--quant-residual", "0", "--steps", "1")  # fmt: skip
    assert code == 0 and "| default | 64 | 1 | kvforge int8 | torch |" in out and "| sdpa | torch |" in out


def test_bench_batches_must_be_positive(capsys, tiny_checkpoint):
    code, _, err = run(capsys, "bench", "--model", str(tiny_checkpoint), "--device", "cpu", "--batches", "1,0")
    assert code == 2 and "--batches '1,0' must be positive integers, e.g. 1,8,32" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--api-key", ""], "the API key is empty, or holds spaces, control or non-ASCII characters"),
        (["--api-key", "two words"], "the API key is empty, or holds spaces"),
        (["--api-key", "clé"], "choose a printable ASCII token"),
        (["--max-queued", "0"], "--max-queued 0 is outside the allowed range [1, inf)"),
        (["--max-messages", "x"], "--max-messages 'x' is not an integer"),
        (["--max-request-size", "big"], "size 'big' is not understood"),
        (["--shutdown-timeout", "-1"], "seconds -1.0 is outside the allowed range [0, inf)"),
        (["--shutdown-timeout", "nan"], "seconds nan is outside the allowed range [0, inf)"),
        (["--allowed-hosts", "localhost,,x"], "--allowed-hosts 'localhost,,x' names an empty host"),
        (["--cpu-memory", "1GiB"], "--cpu-memory 1073741824 keeps stored prefixes in host memory: give --store"),
    ],
)
def test_bad_serve_flags_give_one_line_errors_before_loading_the_model(capsys, argv, message):
    code, _, err = run(capsys, "serve", "--model", "/nonexistent", *argv)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_document_prefilled_once_is_found_by_generate_and_answers_the_same(capsys, tiny_checkpoint, doc, tmp_path):
    store = str(tmp_path / "store")
    settings = ["--model", str(tiny_checkpoint), "--policy", "knorm", "--ratio", "0.5", "--quant", "int4", "--quant-group", "4", "--prompt-file", str(doc)]
    code, out, _ = run(capsys, "prefill", *settings, "--store", store, "--json")
    assert code == 0 and json.loads(out)["already_stored"] is False
    code, out, _ = run(capsys, "generate", *settings, "--store", store, "--max-new-tokens", "6", "--json", "w1 w2 w3")
    found = json.loads(out)
    assert code == 0 and found["stored"] is True
    # The same question without the store, in the same (paged) layout: the same answer.
    code, out, _ = run(capsys, "generate", *settings, "--layout", "paged", "--max-new-tokens", "6", "--json", "w1 w2 w3")
    assert code == 0 and json.loads(out)["text"] == found["text"]
    code, out, _ = run(capsys, "store", "ls", "--store", store)
    assert code == 0 and "knorm 0.5 int4" in out
    code, out, _ = run(capsys, "store", "stats", "--store", store)
    assert json.loads(out)["entries"] == 1
    # Other settings are another document: prefilled and stored beside it.
    code, out, _ = run(capsys, "generate", *settings[:-2], "--prompt-file", str(doc), "--ratio", "0.25", "--store", store, "--json", "w1")
    assert code == 0 and json.loads(out)["stored"] is False
    code, _, err = run(capsys, "store", "rm", "zz", "--store", store)
    assert code == 2 and "names 0 entries" in err
    from kvforge.store import LocalStore

    keys = [e.key for e in LocalStore(store).entries()]
    assert len(keys) == 2
    code, _, _ = run(capsys, "store", "rm", keys[0][:12], "--store", store)
    assert code == 0 and [e.key for e in LocalStore(store).entries()] == keys[1:]
    code, _, err = run(capsys, "store", "ls", "--store", "redis://127.0.0.1:1/0")
    assert code == 2 and "cannot be reached" in err


def test_documents_stored_alone_are_blended_anywhere_in_a_prompt(capsys, tiny_checkpoint, tmp_path):
    store = str(tmp_path / "store")
    docs = []
    for i in range(2):
        docs.append(tmp_path / f"doc{i}.txt")
        docs[-1].write_text(" ".join(f"w{(7 * j + 31 * i) % 100 + 5}" for j in range(40)), encoding="utf-8")
    settings = ["--model", str(tiny_checkpoint), "--policy", "knorm", "--ratio", "0.5", "--store", store]
    code, out, _ = run(capsys, "prefill", *settings, "--blend", "--prompt-file", str(docs[1]), "--json")
    assert code == 0 and json.loads(out)["tokens"] == 40  # the document alone: no template around it
    blend = ["--blend", str(docs[0]), "--blend", str(docs[1]), "--blend-share", "0.25", "--max-new-tokens", "4", "--json"]
    code, out, _ = run(capsys, "generate", *settings, *blend, "w1 w2")
    first = json.loads(out)
    assert code == 0 and first["stored"] is False and first["refreshed_tokens"] == 20  # doc0 was prefilled then
    code, out, _ = run(capsys, "generate", *settings, *blend, "w1 w2")
    again = json.loads(out)
    assert again["stored"] is True and again["text"] == first["text"]  # both found, the same answer
    code, _, err = run(capsys, "generate", *settings, *blend[:4], "--blend-share", "2", "w1")
    assert code == 2 and "blend share 2.0 must be in [0, 1]" in err
    code, _, err = run(capsys, "generate", *settings[:-2], *blend[:4], "w1")
    assert code == 2 and "give --store" in err
