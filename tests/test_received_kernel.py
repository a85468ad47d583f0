"""The Triton kernel of the attention each held entry received (H2O's accumulated attention,
SnapKV's observation window) against the torch reference, `attention_probs_sum`: compiled on a
GPU, under Triton's interpreter on the CPU. Skipped only where Triton cannot be imported."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")  # conftest sets TRITON_INTERPRET=1 where there is no GPU

from kvforge.reading import attention_probs_sum, causal_allowed, received_attention  # noqa: E402
from kvforge.reading.kernels import calls  # noqa: E402
from kvforge.reading.kernels.received import received_padded, received_rows  # noqa: E402
from kvforge.reading.rows import key_rows  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Triton's interpreter computes bfloat16 wrongly (numpy has no bfloat16): it is checked compiled only.
HALF = [torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
START = 100  # position of a chunk's first query: held entries lie below it


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    # Half inputs: the same products, summed in float32 in another order (tl.dot's, not einsum's).
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-4)


def chunk_after_held(batch, kv_heads, group, dim, held, t, pad, dtype, seed, shuffle=False):
    """What a storage holds after appending a chunk of t queries, as a padded picture: each row
    (b, h) holds held[b][h] older entries at distinct random positions below START, then the
    chunk's real tokens (the first pad[b] of sequence b are padding: not stored, weight 0).
    With `shuffle` each row's entries are out of time order. Padding slots hold large garbage
    keys, which must never count. Returns the reference's and the kernel's arguments."""
    gen = torch.Generator().manual_seed(seed)
    q_pos = torch.arange(START, START + t)
    def row(b: int, h: int) -> torch.Tensor:
        older = torch.randperm(START, generator=gen)[: held[b][h]].sort().values
        return torch.cat([older, q_pos[pad[b] :]])

    rows = [[row(b, h) for h in range(kv_heads)] for b in range(batch)]
    width = max(len(r) for seq in rows for r in seq)
    positions = torch.zeros(batch, kv_heads, width, dtype=torch.long)
    valid = torch.zeros(batch, kv_heads, width, dtype=torch.bool)
    for b, seq in enumerate(rows):
        for h, row in enumerate(seq):
            if shuffle:
                row = row[torch.randperm(len(row), generator=gen)]
            positions[b, h, : len(row)], valid[b, h, : len(row)] = row, True
    keys = torch.randn(batch, kv_heads, width, dim, generator=gen).masked_fill(~valid[..., None], 30.0)
    query = torch.randn(batch, kv_heads * group, t, dim, generator=gen)
    weight = 0.25 + 0.75 * torch.rand(batch, t, generator=gen)  # fractional weights
    for b, n in enumerate(pad):
        weight[b, :n] = 0.0
    return tuple(x.to(DEVICE) for x in (query.to(dtype), keys.to(dtype), positions, valid, q_pos, weight))


def reference(query, keys, positions, valid, q_pos, weight, scaling):
    return attention_probs_sum(query, keys, causal_allowed(positions, valid, q_pos), weight, scaling)


CASES = [  # (batch, kv_heads, group, head_dim, held entries per (sequence, KV head), T, padding queries per sequence)
    (2, 2, 1, 64, [[0, 1], [37, 5]], 5, [0, 2]),
    (1, 3, 3, 64, [[0, 20, 64]], 17, [0]),  # T > 16: blocks of 64 queries; rows of two key blocks
    (2, 1, 8, 128, [[70], [0]], 3, [1, 0]),
    (2, 2, 3, 64, [[0, 1], [0, 9]], 1, [0, 1]),  # T = 1: rows of 1 and 0 entries (a padding query)
]


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("batch, kv_heads, group, dim, held, t, pad", CASES)
def test_a_chunk_after_held_entries_matches_the_reference(batch, kv_heads, group, dim, held, t, pad, dtype):
    args = chunk_after_held(batch, kv_heads, group, dim, held, t, pad, dtype, seed=dim + group + t)
    _, _, _, valid, _, weight = args
    got = received_padded(*args, scaling=dim**-0.5)
    want = reference(*args, scaling=dim**-0.5)
    assert got.dtype == torch.float32 and got.shape == valid.shape
    torch.testing.assert_close(got, want, **tolerance(dtype))
    assert bool((got[~valid] == 0).all())  # padding slots receive nothing
    # Every counted query reads at least its own key and spreads its weight over the row.
    torch.testing.assert_close(got.sum(-1), weight.sum(-1)[:, None].expand(batch, kv_heads), **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_an_observation_window_matches_the_reference(dtype):
    """SnapKV's view: the last w queries of the chunk over everything held, the chunk included."""
    query, keys, positions, valid, q_pos, weight = chunk_after_held(2, 2, 3, 64, [[30, 3], [0, 12]], 12, [0, 3], dtype, seed=7)
    w = 5
    window = (query[:, :, -w:], keys, positions, valid, q_pos[-w:], weight[:, -w:])
    got = received_padded(*window, scaling=0.125)
    torch.testing.assert_close(got, reference(*window, scaling=0.125), **tolerance(dtype))
    # The window's first query reads nothing of the chunk after it: those entries get less than from all queries.
    whole = received_padded(query, keys, positions, valid, q_pos, weight, 0.125)
    assert bool((whole[valid] >= got[valid] - 1e-6).all()) and not torch.allclose(whole, got)


def test_keys_out_of_time_order_give_the_same_result():
    """Skipping block pairs by position is exact for any order of the entries in a row."""
    args = chunk_after_held(1, 2, 3, 64, [[90, 40]], 20, [0], torch.float32, seed=11, shuffle=True)
    got = received_padded(*args, scaling=0.125)
    torch.testing.assert_close(got, reference(*args, scaling=0.125), rtol=1e-4, atol=1e-5)
    assert float(got.max()) > 0.01


def test_rows_read_where_they_lie():
    """The in-place layout's rows: one buffer each, with spare room after what is held."""
    query, keys, positions, valid, q_pos, weight = chunk_after_held(1, 3, 1, 64, [[4, 0, 50]], 6, [0], torch.float32, seed=3)
    lengths = valid.sum(-1).flatten().tolist()
    k_rows = [torch.cat([keys[0, h, :n], torch.full((9, 64), float("nan"), device=DEVICE)]) for h, n in enumerate(lengths)]
    p_rows = [torch.cat([positions[0, h, :n], torch.zeros(9, dtype=torch.long, device=DEVICE)]).int() for h, n in enumerate(lengths)]
    got = received_rows(query, key_rows(k_rows, p_rows, lengths, DEVICE), q_pos, weight, 3, 0.125)
    assert got.shape == (3, max(lengths))
    torch.testing.assert_close(got, reference(query, keys, positions, valid, q_pos, weight, 0.125)[0], rtol=1e-4, atol=1e-5)


def test_no_queries_or_no_keys_give_zeros():
    query, keys, positions, valid, q_pos, weight = chunk_after_held(2, 2, 2, 64, [[3, 1], [2, 0]], 2, [0, 0], torch.float32, seed=5)
    none = received_padded(query[:, :, :0], keys, positions, valid, q_pos[:0], weight[:, :0], 0.125)
    assert none.shape == valid.shape and bool((none == 0).all())
    empty = received_padded(query, keys[:, :, :0], positions[..., :0], valid[..., :0], q_pos, weight, 0.125)
    assert empty.shape == (2, 2, 0)


def test_the_dispatcher_takes_the_kernel_only_where_enabled(monkeypatch):
    args = chunk_after_held(1, 2, 2, 64, [[10, 3]], 4, [1], torch.float32, seed=9)
    before = calls["received"]
    monkeypatch.setenv("KVFORGE_KERNELS", "0")
    torch_path = received_attention(*args, scaling=0.125)
    assert calls["received"] == before
    assert torch.equal(torch_path, reference(*args, scaling=0.125))  # the torch path exactly as before
    monkeypatch.setenv("KVFORGE_KERNELS", "1")  # the kernel, interpreted where there is no GPU
    kernel_path = received_attention(*args, scaling=0.125)
    assert calls["received"] == before + 1
    torch.testing.assert_close(kernel_path, torch_path, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout, quant, policy", [("inplace", None, "h2o"), ("ragged", None, "h2o"), ("inplace", "int4", "h2o"), ("inplace", None, "snapkv")])
def test_a_chunked_prefill_and_decoding_keep_what_the_torch_path_keeps(tiny_model, monkeypatch, layout, quant, policy):
    """The whole path of the tiny model (head_dim 16, GQA groups of 2): a padded batch prefilled 8
    tokens at a time, each chunk after held entries and compressed at once, then decoding."""
    from conftest import held_positions, left_padded, word_tokenizer

    from kvforge import KVCache, make_policy
    from kvforge.generate import DECODE, PREFILL, feed
    from kvforge.storage.codec import QuantSpec

    # The prompt's recent entries kept in full precision (as before prompts were sealed whole), so
    # every chunk is observed over a full-precision tail: the path the kernel serves.
    spec = QuantSpec(quant, group=8, residual=4, prompt_residual=True) if quant else None
    lengths = [24, 17]
    rows = [left_padded([n], seed=n)[0][0].tolist() for n in lengths]
    params = {"window": 4} if policy == "snapkv" else {}
    results = []
    for flag in ("0", "1"):
        monkeypatch.setenv("KVFORGE_KERNELS", flag)
        cache = KVCache(tiny_model, make_policy(policy, ratio=0.5, **params), tokenizer=word_tokenizer(), layout=layout, quant=spec)
        before = calls["received"]
        with torch.inference_mode():
            positions = torch.zeros(len(rows), dtype=torch.long)
            logits, positions = feed(tiny_model, cache, rows, positions, PREFILL, chunk=8)
            prefilled = calls["received"] - before
            logits_after_prefill = logits
            state = [layer.storage.view() for layer in cache.layers]
            state = [v.aux["h2o_attention"].masked_fill(~v.valid, 0) if policy == "h2o" else v.positions for v in state]
            held = [held_positions(layer.storage) for layer in cache.layers]
            steps = []
            before = calls["received"], calls["decode"]
            for _ in range(3):
                logits, positions = feed(tiny_model, cache, [[int(t)] for t in logits.argmax(-1)], positions, DECODE)
                steps.append(logits)
            decoded = calls["received"] - before[0], calls["decode"] - before[1]
        results.append((logits_after_prefill, state, held, steps, [held_positions(layer.storage) for layer in cache.layers]))
        if flag == "0":
            assert prefilled == 0 and decoded == (0, 0)
        elif policy == "h2o":
            assert prefilled == 3 * 2  # 3 chunks x 2 layers, each observed by one kernel call
            if (layout, quant) == ("inplace", None):
                # A decoding step of H2O: its state from the received kernel, its output from the decoding kernel.
                assert decoded == (3 * 2, 3 * 2)
        else:
            assert prefilled > 0  # SnapKV scores a compressing chunk's window through it
    (logits_t, state_t, held_t, steps_t, after_t), (logits_k, state_k, held_k, steps_k, after_k) = results
    assert held_k == held_t and after_k == after_t  # the same entries kept, after prefill and decoding
    torch.testing.assert_close(logits_k, logits_t, rtol=1e-4, atol=1e-4)
    for a, b in zip(state_k, state_t):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(steps_k, steps_t):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
