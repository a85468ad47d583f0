"""scripts/gpu-bench.sh, the one prepared GPU run: its every command still parses, its test files
exist, and its budget bounds the stages (its dry run prints what it would run)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from kvforge.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-bench.sh"


def dry_run(mode: str, **env: str) -> list[str]:
    done = subprocess.run(
        ["bash", str(SCRIPT), mode, "/tmp/kvforge-dry"], env={**os.environ, "DRY_RUN": "1", **env},
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if line.startswith("== ")]


@pytest.mark.parametrize("mode", ["run", "smoke"])
def test_every_stage_command_parses(mode):
    stages = dry_run(mode)
    assert [line.split()[1] for line in stages] == ["tests", "attention-aim", "model-aim", "fit", "attention-sweep", "model-sweep"]
    for line in stages:
        argv = shlex.split(line.split(": ", 1)[1])
        if argv[1:3] == ["-m", "kvforge.cli"]:
            args = build_parser().parse_args(argv[3:])  # exits (fails the test) on an unknown option or bad value
            assert args.command == "bench"
        else:
            assert argv[1:3] == ["-m", "pytest"]
            assert all((ROOT / a).is_file() for a in argv if a.startswith("tests/"))


def test_budget_and_from_pick_the_stages():
    assert [line.split()[1:3] for line in dry_run("run", FROM="fit")][:4] == [
        ["tests:", "skipped"], ["attention-aim:", "skipped"], ["model-aim:", "skipped"], ["fit", "(at"]
    ]  # fmt: skip
    assert all("skipped, " in line for line in dry_run("run", BUDGET="20"))
