"""How likely a cache makes the reference answers (`kvforge.eval.likelihood`): teacher-forced on a
fork, equal to one plain forward over prompt + answer, the cache left as it was."""

from __future__ import annotations

import torch

from transformers import AutoTokenizer

from kvforge.cache import KVCache
from kvforge.eval.likelihood import answer_ids, answer_logprobs
from kvforge.eval.tasks import Case
from kvforge.generate import prefill
from kvforge.models import default_checkpoint
from kvforge.policies import make_policy


def plain_logprob(reference: torch.nn.Module, prompt: list[int], answer: list[int]) -> float:
    """Mean log-probability per token of `answer` after `prompt`, from one uncached forward."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = reference(input_ids=ids).logits[0].float()  # (len, vocab)
    steps = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)  # rows predicting each answer token
    return float(steps.gather(1, torch.tensor(answer)[:, None]).mean())


@torch.inference_mode()
def test_teacher_forced_answers_match_one_plain_forward_and_leave_the_cache_as_it_was(tiny_model, tiny_reference):
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 60, (n,), generator=gen).tolist() for n in (23, 17)]
    # Row 0: two answers of 3 and 1 tokens; row 1: one answer of 5 (the padded, ragged case).
    answers = [[[5, 9, 11], [7]], [[40, 41, 42, 43, 45]]]
    caches, firsts = [], []
    for ids in prompts:
        cache = KVCache(tiny_model, make_policy("full"))
        firsts.append(prefill(tiny_model, cache, ids))
        caches.append(cache)
    stacked = KVCache.stack(caches)
    before = stacked.seq_nbytes().tolist(), stacked.get_seq_length()
    positions = torch.tensor([len(p) for p in prompts])
    got = answer_logprobs(tiny_model, stacked, torch.stack(firsts), positions, answers)
    want = [
        (plain_logprob(tiny_reference, prompts[0], answers[0][0]) + plain_logprob(tiny_reference, prompts[0], answers[0][1])) / 2,
        plain_logprob(tiny_reference, prompts[1], answers[1][0]),
    ]
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4), (got, want)
    assert all(v < 0 for v in got)
    assert (stacked.seq_nbytes().tolist(), stacked.get_seq_length()) == before  # the fork took the answers


def test_answers_follow_the_answer_prefix_after_a_space():
    tok = AutoTokenizer.from_pretrained(default_checkpoint())
    spaced, bare = tok(" 8815914", add_special_tokens=False).input_ids, tok("8815914", add_special_tokens=False).input_ids
    assert spaced != bare
    assert answer_ids(tok, Case("t", "ctx", "q?", "The number is", ["8815914", "99"])) == [spaced, tok(" 99", add_special_tokens=False).input_ids]
    assert answer_ids(tok, Case("t", "ctx", "q?", "", ["8815914"])) == [bare]  # the assistant's turn starts it
    assert answer_ids(tok, Case("t", "ctx", "q?", "Answer:\n", ["8815914"])) == [bare]


@torch.inference_mode()
def test_a_row_without_answers_has_no_likelihood(tiny_model):
    cache = KVCache(tiny_model, make_policy("full"))
    logits = prefill(tiny_model, cache, [5, 6, 7, 8])
    assert answer_logprobs(tiny_model, cache, logits[None], torch.tensor([4]), [[]]) == [None]
