"""The largest-batch search: the bisection on a known threshold, and real tries on the tiny model."""

from __future__ import annotations

import json

import pytest

from kvforge.cli import main
from kvforge.eval.fit import FitTry, format_fit_table, run_fit, search_largest
from kvforge.models import load_model
from kvforge.policies.registry import make_policy
from kvforge.storage import QuantSpec


def threshold(limit: int):
    return lambda batch: FitTry(batch, batch <= limit, batch)


def test_search_doubles_then_bisects():
    best, tries = search_largest(threshold(37), 1024)
    assert best == 37
    assert [t.batch for t in tries] == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]


@pytest.mark.parametrize(
    "limit, max_batch, best, batches",
    [
        (0, 1024, 0, [1]),  # not even one sequence
        (1, 1024, 1, [1, 2]),
        (100, 5, 5, [1, 2, 4, 5]),  # stopped at max_batch: capped
        (4, 6, 4, [1, 2, 4, 6, 5]),
    ],
)
def test_search_edges(limit, max_batch, best, batches):
    found, tries = search_largest(threshold(limit), max_batch)
    assert found == best and [t.batch for t in tries] == batches


def test_tries_on_the_tiny_model(tiny_checkpoint):
    loaded = load_model(str(tiny_checkpoint))
    policies = [make_policy("full"), make_policy("knorm", ratio=0.5)]
    quants = [QuantSpec(), QuantSpec("int4", group=8, residual=16)]
    rows = run_fit(loaded, [96], policies, quants, limit=64 * 2**30, max_batch=3, steps=2)
    assert [(r.policy, r.quant) for r in rows] == [("full", "none"), ("knorm", "none"), ("full", "int4/g8"), ("knorm", "int4/g8")]
    params = sum(p.nbytes for p in loaded.model.parameters())
    for r in rows:
        assert r.largest_batch == 3 and r.capped  # 64 GiB holds far more than 3 tiny sequences
        assert [t.batch for t in r.tries] == [1, 2, 3] and all(t.fits for t in r.tries)
        assert r.peak_bytes is not None and r.peak_bytes >= params + r.seq_cache_bytes  # measured, weights included
    by = {(r.policy, r.quant): r for r in rows}
    assert by[("knorm", "none")].seq_cache_bytes < by[("full", "none")].seq_cache_bytes
    assert by[("full", "int4/g8")].seq_cache_bytes < by[("full", "none")].seq_cache_bytes
    assert "| 96 | knorm int4/g8 | 0.5 | 64.0 | 3+ (1.00x) |" in format_fit_table(rows)
    # A limit below the weights themselves: no batch fits, after one try.
    (none,) = run_fit(loaded, [96], policies[:1], quants[:1], limit=params // 2, max_batch=8, steps=1)
    assert none.largest_batch == 0 and len(none.tries) == 1 and not none.tries[0].fits
    with pytest.raises(ValueError, match="steps=0 must be at least 1"):
        run_fit(loaded, [96], policies, quants, limit=2**30, steps=0)


def test_cli_prints_the_largest_batch(capsys, tiny_checkpoint, tmp_path):
    out_json = tmp_path / "fit.json"
    code = main(["bench", "--model", str(tiny_checkpoint), "--device", "cpu", "--fit-memory", "16GiB", "--max-batch", "2",
                 "--policies", "full", "--lengths", "64", "--json", str(out_json)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "| 64 | full | 0 | 16.0 | 2+ (1.00x) |" in out
    rows = json.loads(out_json.read_text())["rows"]
    assert rows[0]["largest_batch"] == 2 and [t["batch"] for t in rows[0]["tries"]] == [1, 2]
