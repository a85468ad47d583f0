"""An eval sweep on Ray actors (`kvforge eval --workers N`): a local cluster of this test's own,
the tiny random-weight model loaded by every actor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import ray

from kvforge.eval.runner import EvalConfig, Workers, read_rows, run_eval
from kvforge.models import load_model

FIELDS = ("prompt_hash", "prompt_tokens", "answer", "score", "cache_bytes", "dense_bytes", "generated_tokens", "bits_per_element")


@pytest.fixture(scope="module")
def cluster():  # type: ignore[no-untyped-def]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def loaded():  # type: ignore[no-untyped-def]
    return load_model("random:tiny")


def config(samples: int = 4) -> EvalConfig:
    return EvalConfig(model="random:tiny", tasks=["niah_single"], policies=["full", "knorm", "streaming"], ratios=[0.5], length=160, samples=samples, batch=2)


def table(rows) -> dict:  # type: ignore[no-untyped-def]
    """What a row says, by its key (seconds left out: they are each process's own)."""
    return {r.key: tuple(getattr(r, f) for f in FIELDS) for r in rows}


@pytest.fixture(scope="module")
def in_process(loaded, tmp_path_factory):  # type: ignore[no-untyped-def]
    rows, _ = run_eval(loaded, config(), tmp_path_factory.mktemp("in-process"))
    return table(rows)


def test_rows_of_two_workers_equal_the_rows_run_in_process(cluster, loaded, in_process, tmp_path):
    rows, stats = run_eval(loaded, config(), tmp_path, workers=Workers(2))
    assert len(rows) == len(in_process) == 4 * 3 and table(rows) == in_process
    assert stats.prefills == 4 and len(read_rows(tmp_path / "rows.jsonl")) == 12  # each row written once


def test_a_worker_killed_mid_run_has_its_unit_run_again(cluster, loaded, in_process, tmp_path):
    killed: list[int] = []

    def kill_one(row) -> None:  # type: ignore[no-untyped-def]
        if not killed:  # the first row is in: kill a worker while the others' units run
            pids = subprocess.run(["pgrep", "-f", "ray::Worker"], capture_output=True, text=True).stdout.split()
            killed.append(int(pids[0]))
            os.kill(killed[0], signal.SIGKILL)

    rows, _ = run_eval(loaded, config(), tmp_path, on_row=kill_one, workers=Workers(2))
    assert killed and table(rows) == in_process
    written = read_rows(tmp_path / "rows.jsonl")
    assert len(written) == len({r.key for r in written}) == 12  # nothing written twice


def test_an_interrupted_sweep_resumes_where_it_stopped(cluster, loaded, in_process, tmp_path):
    seen: list[object] = []

    def stop_after_four(row) -> None:  # type: ignore[no-untyped-def]
        seen.append(row)
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_eval(loaded, config(), tmp_path, on_row=stop_after_four, workers=Workers(2))
    assert len(read_rows(tmp_path / "rows.jsonl")) == 4
    rows, stats = run_eval(loaded, config(), tmp_path, workers=Workers(2))
    assert table(rows) == in_process and stats.rows == 8  # only what was missing


def test_without_ray_workers_are_refused_in_one_line(tmp_path):
    # A Python where `import ray` fails, running the command.
    code = "import sys; sys.modules['ray'] = None; from kvforge.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["eval", "--model", "random:tiny", "--policies", "full", "--samples", "1", "--workers", "2", "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "pip install 'kvforge[distributed]'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not any(tmp_path.iterdir())
