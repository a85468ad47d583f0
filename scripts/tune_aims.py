"""Measure `kvforge tune` (issue 23): choose on one task file, check on another of the same kind.

Writes two task files of a built-in task (different seeds), runs `kvforge tune --task-file A
--check-file B --check-all --memory M` and prints how far the choice is, on B, from the best
configuration measured on B within the same memory (the aim: within 0.03 of retention).

    .venv/bin/python scripts/tune_aims.py [--task niah_prose] [--length 1024] [--cases 8] [--memory 1/8] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from kvforge.eval.tasks import case_line, make_case
from kvforge.models import DEFAULT_MODEL, load_text_side


def write_cases(path: Path, task: str, length: int, cases: int, first_seed: int) -> None:
    text = load_text_side(DEFAULT_MODEL)
    lines = [case_line(make_case(text.tokenizer, task, length, seed=first_seed + s, chat=True)) for s in range(cases)]
    path.write_text("".join(line + "\n" for line in lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="niah_prose")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--memory", default="1/8")
    parser.add_argument("--policies", default="kvzip,coverage:kvzip")
    parser.add_argument("--ratios", default="0.5,0.75,0.875")
    parser.add_argument("--quant", default="none,int4")
    parser.add_argument("--work", default="results/tune_aims")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    chosen_on, checked_on = work / "a.jsonl", work / "b.jsonl"
    write_cases(chosen_on, args.task, args.length, args.cases, 1000)
    write_cases(checked_on, args.task, args.length, args.cases, 2000)
    out = work / "tuned.json"
    command = [
        sys.executable, "-m", "kvforge.cli", "tune", "--task-file", str(chosen_on), "--check-file", str(checked_on), "--check-all",
        "--memory", args.memory, "--policies", args.policies, "--ratios", args.ratios, "--quant", args.quant, "--out", str(out),
    ]  # fmt: skip
    subprocess.run(command, check=True)
    tuned = json.loads(out.read_text())
    check = tuned["check"]
    print(json.dumps({"chosen": [tuned["policy"], tuned["ratio"], tuned["quant"]["mode"]], "on_a": tuned["measured"]["retention"],
                      "on_b": check.get("retention"), "best_on_b": check.get("best"), "gap": check.get("gap")}, indent=2))


if __name__ == "__main__":
    main()
