"""How much a policy changes the model: next-token KL from the full cache and top-1 agreement.

Over a teacher-forced continuation of a real text: the context is prefilled once (recorded), each
policy's cache is derived from it (a low-rank one prefills the context itself), then the same
continuation tokens are fed one at a time to the full and to the compressed cache. Decoding-time
budgets apply as in generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.cache import KVCache
from kvforge.generate import prefill, settle
from kvforge.models import LoadedModel
from kvforge.policies import make_policy
from kvforge.policies.base import Policy
from kvforge.storage import QuantSpec


@dataclass
class Fidelity:
    policy: str
    ratio: float
    kl: float  # mean KL(full || compressed) of the next-token distribution, nats
    top1_agreement: float  # share of positions where both caches predict the same token, 0-100
    positions: int
    quant: str  # how the entries were held
    bits_per_element: float  # effective, at the end
    cache_bytes: int  # K/V bytes allocated at the end
    kept_bytes: int  # K/V bytes of the entries kept at the end
    dense_bytes: int


def teacher_forced_logprobs(model: torch.nn.Module, cache: KVCache, first: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """(len(tokens), vocab) log-probs: after the prompt, then after each fed token but the last."""
    out = [first.float().log_softmax(-1)]
    for token in tokens[:-1]:
        logits = model(input_ids=torch.tensor([[token]], device=model.device), past_key_values=cache, use_cache=True).logits
        out.append(logits[0, -1].float().log_softmax(-1))
    return torch.stack(out)


def own_cache(
    loaded: LoadedModel, base: KVCache, policy: Policy, spec: QuantSpec, context: list[int], first: torch.Tensor
) -> tuple[KVCache, torch.Tensor]:
    """`policy`'s cache of `context` held as `spec` says, and the (vocab,) logits after it: derived
    from the recorded `base` (whose logits are `first`), or, for a low-rank spec, whose prompt
    attends its own coordinates (later layers see other inputs), prefilled anew."""
    if spec.rank is None:
        cache = base.derive(policy, quant=spec)
        after = first
    else:
        cache = KVCache(loaded.model, policy, tokenizer=loaded.tokenizer, quant=spec)
        after = prefill(loaded.model, cache, context)
    settle(loaded.model, cache, [context], torch.tensor([len(context)]))
    return cache, after


@torch.inference_mode()
def fidelity(
    loaded: LoadedModel, ids: list[int], context_tokens: int, policies: list[Policy], quants: list[QuantSpec] | None = None
) -> list[Fidelity]:
    """Score each policy (once per quantization mode of `quants`, default full precision) against
    the full-precision full cache on ids[:context_tokens] + the rest, teacher-forced."""
    if not 0 < context_tokens < len(ids):
        raise ValueError(f"context of {context_tokens} tokens must be shorter than the text ({len(ids)} tokens)")
    model = loaded.model
    base = KVCache(model, make_policy("full"), record_prefill=True, tokenizer=loaded.tokenizer)
    first = prefill(model, base, ids[:context_tokens])
    continuation = ids[context_tokens:]
    reference = teacher_forced_logprobs(model, base.derive(make_policy("full")), first, continuation)
    results = []
    for spec, policy in ((q, p) for q in (quants or [QuantSpec()]) for p in policies):
        cache, after = own_cache(loaded, base, policy, spec, ids[:context_tokens], first)
        logprobs = teacher_forced_logprobs(model, cache, after, continuation)
        kl = (reference.exp() * (reference - logprobs)).sum(-1).clamp(min=0)  # (positions,)
        agree = (reference.argmax(-1) == logprobs.argmax(-1)).float()
        results.append(
            Fidelity(
                policy.written_name, policy.ratio, float(kl.mean()), 100 * float(agree.mean()), len(continuation),
                spec.label, cache.bits_per_element, cache.nbytes, cache.kept_nbytes, cache.dense_nbytes,
            )  # fmt: skip
        )
    return results
