"""How likely a compressed cache makes the reference answers: a finer signal than the score.

A needle task's score is 0 or 100 per case, so on a handful of cases two configurations often tie;
which of them makes the right answer more likely is what breaks the tie (`front._rank`). Each
reference answer is teacher-forced right after the prompt, on a fork of the cache (the cache
itself stays as it was, for the greedy answer), and scored as its mean log-probability per token.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from kvforge.cache import KVCache
from kvforge.eval.tasks import Case
from kvforge.generate import feed_every


def answer_ids(tokenizer: PreTrainedTokenizerBase, case: Case) -> list[list[int]]:
    """Each reference answer's tokens as the model would write them after the prompt: after a
    space where the prompt ends in an answer prefix's last word ("... the text is" -> " 8815914").
    An empty answer has nothing to score and is left out."""
    lead = " " if case.answer_prefix and not case.answer_prefix[-1].isspace() else ""
    return [tokenizer(lead + a, add_special_tokens=False).input_ids for a in case.answers if a]


def answer_logprobs(
    model: torch.nn.Module,
    cache: KVCache,
    logits: torch.Tensor,  # (batch, vocab) next-token logits after each row's prompt
    positions: torch.Tensor,  # (batch,) rotary position of each row's next token
    answers: list[list[list[int]]],  # per row, its reference answers' token ids (each non-empty)
) -> list[float | None]:
    """Per row: the mean over its answers of each answer's mean log-probability per token (nats,
    at most 0; None for a row without answers), every answer teacher-forced alone after the
    prompt. One fork and one forward per answer index (answer i of every row together); `cache`
    is not changed."""
    first = torch.log_softmax(logits.float(), dim=-1)  # (batch, vocab)
    per_row: list[list[float]] = [[] for _ in answers]
    for i in range(max((len(a) for a in answers), default=0)):
        wanted = [a[i] if i < len(a) else [] for a in answers]
        # The first token is predicted by the prompt's logits; the rest by the answer's own prefix.
        fed = [ids[:-1] for ids in wanted]
        later = None
        if any(fed):
            later = torch.log_softmax(feed_every(model, cache.fork(), fed, positions).float(), dim=-1)  # (batch, width, vocab)
        for b, ids in enumerate(wanted):
            if not ids:
                continue
            total = first[b, ids[0]]
            if len(ids) > 1:
                assert later is not None
                width = later.shape[1]
                # Row b's fed tokens sit at the right end: position width-(n-1)+j predicts ids[j+1].
                steps = later[b, width - len(fed[b]) :]  # (n-1, vocab)
                total = total + steps.gather(1, torch.tensor(ids[1:], device=steps.device)[:, None]).sum()
            per_row[b].append(float(total) / len(ids))
    return [sum(v) / len(v) if v else None for v in per_row]
