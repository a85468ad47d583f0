"""Budgets by coverage (`coverage:<policy>`): the fewest entries holding a share of each head's
score mass, on made-up scores with known answers, and on the tiny model."""

from __future__ import annotations

import pytest
import torch

from conftest import left_padded
from kvforge import make_policy
from kvforge.policies.base import StepContext
from kvforge.policies.coverage import covering_counts, score_mass
from kvforge.storage import make_storage
from test_policy_matrix import prefill_logits

# Slot 0 is kvzip's sink (always kept); the others' made-up kvzip scores, each row summing to 1.
PEAKED = [0.5, 0.2, 0.12, 0.08, 0.06, 0.04]  # 0.8 of the mass: slots 1, 2, 3
FLAT = [0.2, 0.19, 0.18, 0.16, 0.14, 0.13]  # 0.8 of the mass: slots 1 .. 5


def test_covering_counts_are_the_fewest_entries_reaching_the_share():
    mass = torch.tensor([[[0.5, 0.3, 0.1, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]])
    assert [covering_counts(mass, s)[0, 0].item() for s in (0.5, 0.8, 0.81, 0.9, 1.0)] == [1, 2, 3, 3, 4]
    assert covering_counts(mass, 0.9)[0, 1].item() == 0  # no mass: nothing covers it
    assert covering_counts(torch.tensor([[[0.1, 0.7, 0.2]]]), 0.7).tolist() == [[1]]  # order does not matter


def test_log_scores_weigh_by_their_exponential_and_infinite_ones_carry_no_mass():
    scores = torch.tensor([[[0.0, -1.0, float("inf"), float("-inf")]]])
    mass = score_mass(scores, "log")
    torch.testing.assert_close(mass, torch.tensor([[[1.0, torch.e**-1, 0.0, 0.0]]]))
    torch.testing.assert_close(score_mass(torch.tensor([[[0.3, -0.1, float("inf")]]]), "linear"), torch.tensor([[[0.3, 0.0, 0.0]]]))


def made_up_context(policy) -> StepContext:
    storage = make_storage("inplace", 1, 2, 16, torch.float32, torch.device("cpu"), ("kvzip",))
    n = 1 + len(PEAKED)
    storage.append(torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16), torch.arange(n), torch.ones(1, n, dtype=torch.bool))
    view = storage.view()
    storage.set_aux("kvzip", view, torch.tensor([[[1.0, *PEAKED], [1.0, *FLAT]]]))
    ctx = StepContext(0, storage, None, torch.zeros(0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.bool), 1.0)
    ctx.target = policy.prefill_budget(torch.tensor([n]), storage.lengths)
    return ctx


@pytest.mark.parametrize("policy, kept", [
    # 0.8 of the mass, at most floor(7 x 0.8) = 5 entries (the ratio's)
    (make_policy("coverage:kvzip", ratio=0.2, sinks=1), [[0, 1, 2, 3], [0, 1, 2, 3, 4]]),
    (make_policy("coverage:kvzip", ratio=0.0, mass=0.8, sinks=1), [[0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]),
    (make_policy("coverage:kvzip", ratio=0.5, mass=0.8, sinks=1), [[0, 1, 2], [0, 1, 2]]),  # at most floor(7 / 2)
    (make_policy("coverage:kvzip", ratio=0.0, mass=0.5, sinks=1), [[0, 1], [0, 1, 2, 3]]),
])  # fmt: skip
def test_each_head_keeps_exactly_the_fewest_entries_covering_the_mass(policy, kept):
    ctx = made_up_context(policy)
    (target,) = policy.layer_budgets([ctx])
    assert target.tolist() == [[len(k) for k in kept]]
    ctx.budget = target
    index, mask = policy.select(ctx)
    assert [sorted(index[0, h][mask[0, h]].tolist()) for h in range(2)] == kept


def test_a_higher_share_keeps_more_and_heads_keep_what_their_scores_need(tiny_model):
    ids, mask = left_padded([40])
    totals, rows = [], set()
    for share in (0.5, 0.9, 0.99):
        cache, _ = prefill_logits(tiny_model, make_policy("coverage:kvzip", ratio=0.0, mass=share, chunk=8), ids, mask)
        totals.append(cache.entries())
        rows |= {n for layer in range(len(cache.layers)) for n in cache.kept_lengths(layer).flatten().tolist()}
    assert totals[0] < totals[1] < totals[2] <= 40 * 2 * 2
    assert len(rows) > 2  # rows of one prompt keep different counts


@pytest.mark.parametrize("name, kwargs, needle", [
    ("coverage:snapkv", {}, "wrap kvzip or kvzap"),
    ("coverage:kvzip", {"mass": 1.5}, "mass=1.5 is outside the allowed range [0.0, 1.0]"),
    ("coverage:kvzip", {"mass": 0.0}, "give a share in (0, 1]"),
])  # fmt: skip
def test_bad_coverage_is_refused_in_one_line(name, kwargs, needle):
    with pytest.raises(ValueError) as err:
        make_policy(name, **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)
