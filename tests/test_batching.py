"""A running batch that sequences join and leave between decoding steps (continuous batching):
every sequence decodes as it would alone, and one leaving frees its memory."""

from __future__ import annotations

import pytest
import torch

from conftest import left_padded
from kvforge import KVCache, QuantSpec, make_policy
from kvforge.generate import DECODE, feed, prefill

LENGTHS = {"a": 20, "b": 14, "c": 9}
SETUPS = [
    ("inplace", None, "full"),
    ("inplace", None, "knorm"),
    ("ragged", None, "h2o"),
    ("paged", None, "h2o"),
    ("paged", None, "full"),
    ("paged", None, "streaming"),
    ("paged", None, "knorm"),
    ("inplace", QuantSpec("int4", group=4, residual=4), "knorm"),
    ("inplace", QuantSpec("mixed", group=2, residual=0), "streaming"),
]


def prompt(name: str) -> list[int]:
    return left_padded([LENGTHS[name]], seed=len(name) + LENGTHS[name])[0][0].tolist()


def new_cache(model, layout: str, quant, policy: str) -> KVCache:
    made = make_policy(policy) if policy == "full" else make_policy(policy, ratio=0.5, evict_every=2)
    return KVCache(model, made, layout=layout, quant=quant)


def alone(model, name: str, steps: int, setup) -> list[int]:
    """Greedy tokens of one sequence decoded by itself."""
    cache = new_cache(model, *setup)
    logits = prefill(model, cache, prompt(name))[None]
    positions, out = torch.tensor([LENGTHS[name]]), []
    for _ in range(steps):
        out.append(int(logits[0].argmax()))
        logits, positions = feed(model, cache, [[out[-1]]], positions, DECODE)
    return out


@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: f"{s[0]}-{s[1].mode if s[1] else 'none'}-{s[2]}")
def test_sequences_join_and_leave_a_running_batch(tiny_model, setup):
    with torch.inference_mode():
        caches, logits = {}, {}
        for name in ("a", "b", "c"):
            caches[name] = new_cache(tiny_model, *setup)
            logits[name] = prefill(tiny_model, caches[name], prompt(name))
        names = ["a", "b"]
        batch = KVCache.stack([caches["a"], caches["b"]], take=True)
        step_logits = torch.stack([logits["a"], logits["b"]])
        positions = torch.tensor([LENGTHS["a"], LENGTHS["b"]])
        tokens: dict[str, list[int]] = {"a": [], "b": [], "c": []}

        def step() -> None:
            nonlocal step_logits, positions
            chosen = step_logits.argmax(-1).tolist()
            for n, t in zip(names, chosen):
                tokens[n].append(t)
            step_logits, positions = feed(tiny_model, batch, [[t] for t in chosen], positions, DECODE)

        for _ in range(3):
            step()
        # c joins the running batch (its prompt is shorter than what the batch has seen)
        batch = KVCache.stack([batch, caches["c"]], take=True)
        names.append("c")
        step_logits = torch.cat([step_logits, logits["c"][None]])
        positions = torch.cat([positions, torch.tensor([LENGTHS["c"]])])
        for _ in range(3):
            step()
        # b leaves; its memory goes with it
        before = batch.nbytes
        batch = batch.select([0, 2])
        names.remove("b")
        step_logits, positions = step_logits[[0, 2]], positions[[0, 2]]
        assert batch.nbytes < before and batch.kept_lengths(0).shape[0] == 2
        for _ in range(3):
            step()
    assert tokens["a"] == alone(tiny_model, "a", 9, setup)
    assert tokens["b"] == alone(tiny_model, "b", 6, setup)
    assert tokens["c"] == alone(tiny_model, "c", 6, setup)
