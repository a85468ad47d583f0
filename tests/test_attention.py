"""attention_probs_sum (H2O's observation) against the softmax it stands for, written plainly."""

import torch

from kvforge.reading import attention_probs_sum, causal_allowed


def reference(query, keys, allowed, weight, scaling):
    group = query.shape[1] // keys.shape[1]
    expanded = keys.repeat_interleave(group, dim=1)
    logits = torch.einsum("bhtd,bhld->bhtl", query, expanded) * scaling
    mask = allowed.repeat_interleave(group, dim=1) if allowed.shape[1] > 1 else allowed
    probs = torch.nan_to_num(logits.masked_fill(~mask, float("-inf")).softmax(-1))
    summed = (probs * weight[:, None, :, None]).sum(2)  # (batch, q_heads, L)
    return summed.unflatten(1, (keys.shape[1], group)).mean(2)


def test_matches_plain_softmax_on_a_padded_causal_batch():
    torch.manual_seed(0)
    batch, kv_heads, group, length, dim = 2, 2, 3, 70, 8
    query = torch.randn(batch, kv_heads * group, length, dim)
    keys = torch.randn(batch, kv_heads, length, dim)
    positions = torch.arange(length).expand(batch, 1, length).clone()
    valid = torch.ones(batch, 1, length, dtype=torch.bool)
    valid[1, :, :9] = False  # left padding of the second row
    allowed = causal_allowed(positions, valid, torch.arange(length))
    weight = valid[:, 0].float()
    got = attention_probs_sum(query, keys, allowed, weight, 0.3, chunk=16)
    assert got.shape == (batch, kv_heads, length)
    torch.testing.assert_close(got, reference(query, keys, allowed, weight, 0.3), rtol=1e-5, atol=1e-5)
    # Each counted query spreads exactly 1 over the keys: the sum is the number of counted queries.
    torch.testing.assert_close(got.sum(-1), weight.sum(-1)[:, None].expand(batch, kv_heads))
    assert got[1, :, :9].abs().max() == 0  # padding keys received nothing


def test_a_query_that_may_read_nothing_counts_zero_not_nan():
    query, keys = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)
    allowed = torch.tril(torch.ones(4, 4, dtype=torch.bool))[None, None].clone()
    allowed[..., 0, :] = False
    got = attention_probs_sum(query, keys, allowed, torch.ones(1, 4), 1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(), torch.tensor(3.0))
