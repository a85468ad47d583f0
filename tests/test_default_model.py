"""A few checks on the real embedded model (SmolLM2-135M-Instruct), float32 on CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvforge import KVCache, make_policy
from kvforge.eval.tasks import make_case, score
from kvforge.generate import answer, build_prompt
from kvforge.models import default_checkpoint

pytestmark = pytest.mark.model


def test_full_generation_equals_plain_transformers(default_model):
    tok = default_model.tokenizer
    prompt = build_prompt(tok, "Paris is the capital of France. Rome is the capital of Italy.", "What is the capital of Italy?", chat=True)
    ids = torch.tensor([prompt.ids])
    kw = dict(max_new_tokens=24, do_sample=False, temperature=None, top_p=None, top_k=None)
    ours = default_model.model.generate(ids, past_key_values=KVCache(default_model.model, make_policy("full")), **kw)
    plain = AutoModelForCausalLM.from_pretrained(default_checkpoint(), dtype=torch.float32).eval()
    ref = plain.generate(ids, **kw)
    assert ours.tolist() == ref.tolist()


def test_make_run_sample_is_answered_with_the_full_cache(default_model):
    case = make_case(default_model.tokenizer, "niah_single", 3000, seed=0)  # what `kvforge demo` asks
    prompt = build_prompt(default_model.tokenizer, case.context, case.question, True, case.answer_prefix)
    result = answer(default_model, prompt, make_policy("full"), max_new_tokens=16)
    assert score(result.text, case) == 100, result.text
    assert result.kept_bytes == result.dense_cache_bytes  # nothing evicted, nothing padded
    assert result.kept_bytes <= result.cache_bytes <= 1.25 * result.kept_bytes  # spare room for decoding


def test_full_scores_at_least_90_on_niah_single_at_2048_tokens(default_model, tmp_path):
    from kvforge.eval.runner import EvalConfig, run_eval

    cfg = EvalConfig(model="default", tasks=["niah_single"], policies=["full"], ratios=[], length=2048, samples=10, batch=10)
    rows, stats = run_eval(default_model, cfg, tmp_path / "niah")
    assert len(rows) == 10 and stats.prefills == 10
    assert all(2038 <= r.prompt_tokens <= 2048 for r in rows)
    assert sum(r.score for r in rows) / len(rows) >= 90, [r.answer for r in rows]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy, quant", [("full", "none"), ("knorm", "none"), ("knorm", "int4")])
def test_cuda_float32_answers_as_the_cpu_does(default_model, policy, quant):
    """Greedy output on the GPU (Triton kernels when Triton is present) equals the CPU's."""
    from kvforge.models import load_model
    from kvforge.storage.codec import QuantSpec

    prompt = build_prompt(default_model.tokenizer, "Paris is the capital of France. Rome is the capital of Italy.", "What is the capital of Italy?", chat=True)
    made = make_policy(policy) if policy == "full" else make_policy(policy, ratio=0.5)
    cpu = answer(default_model, prompt, made, max_new_tokens=16, quant=QuantSpec(quant))
    gpu = answer(load_model("default", device="cuda"), prompt, made, max_new_tokens=16, quant=QuantSpec(quant))
    assert gpu.text == cpu.text and gpu.kept_bytes == cpu.kept_bytes
