"""Low-rank storage (`--quant int4/r8`): coordinates in the model's bases, exact bytes, attention
taken in coordinates equal to attention over the reconstructions, every policy composing with it,
key channels pruned by ThinK's score (`int4/think8`), and the errors."""

from __future__ import annotations

import pytest
import torch

from conftest import left_padded
from kvforge import KVCache, make_policy
from kvforge.calibration import fingerprint
from kvforge.calibration.lowrank import channel_columns, find_bases, principal, require_bases, think_channels
from kvforge.reading import attend as dense_attend
from kvforge.storage import QuantSpec, make_storage
from kvforge.storage.lowrank import Basis, LowRankKV
from test_policy_matrix import COMPRESSING, build, decode, prefill_logits

DIM, RANK, HEADS = 16, 8, 2


def orthonormal(seed: int) -> torch.Tensor:
    """(HEADS, DIM, RANK) orthonormal columns."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(HEADS, DIM, RANK, generator=g)).Q


def storage(layout: str = "ragged", quant: QuantSpec | None = None) -> LowRankKV:
    basis = Basis(orthonormal(1), orthonormal(2))
    out = make_storage(layout, 1, HEADS, DIM, torch.float32, torch.device("cpu"), (), quant or QuantSpec(rank=RANK), basis=basis)
    assert isinstance(out, LowRankKV)
    return out


def test_entries_in_the_subspace_come_back_exactly_and_hold_rank_over_head_dim_of_the_bytes():
    held = storage()
    n = 12
    z = torch.randn(1, HEADS, n, RANK)
    keys = torch.einsum("bhtr,hdr->bhtd", z, held.basis.keys)  # in the keys' subspace
    values = torch.einsum("bhtr,hdr->bhtd", z, held.basis.values)
    held.append(keys, values, torch.arange(n), torch.ones(1, n, dtype=torch.bool), exact=True)
    view = held.view()
    torch.testing.assert_close(view.keys, keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(view.values, values, rtol=1e-5, atol=1e-5)
    assert held.allocated_nbytes == HEADS * n * 2 * RANK * 4  # coordinates of K and V, float32
    assert held.kept_nbytes == held.allocated_nbytes and held.entry_nbytes == 2 * RANK * 4


@pytest.mark.parametrize("quant", [QuantSpec(rank=RANK), QuantSpec("int8", group=4, residual=0, rank=RANK)])
def test_attention_in_coordinates_is_attention_over_the_reconstructions(quant):
    held = storage("inplace", quant)
    n = 20
    keys, values = torch.randn(1, HEADS, n, DIM), torch.randn(1, HEADS, n, DIM)
    held.append(keys, values, torch.arange(n), torch.ones(1, n, dtype=torch.bool))
    held.seal(prompt=True)
    query = torch.randn(1, 2 * HEADS, 1, DIM)  # two query heads per KV head
    got = held.attend(query, torch.tensor([n - 1]), torch.ones(1, 1, dtype=torch.bool), 0.25)
    view = held.view()
    want = dense_attend(query, view.keys, view.values, None, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The reconstruction is the projection: what lies outside the subspace is lost, nothing else.
    if not quant.enabled:
        projected = torch.einsum("bhtd,hdr,her->bhte", keys, held.basis.keys, held.basis.keys)
        torch.testing.assert_close(view.keys, projected, rtol=1e-5, atol=1e-5)


def test_the_bases_put_the_most_energy_first():
    x = torch.randn(1, 200, 4) * torch.tensor([3.0, 0.1, 1.0, 0.01])
    vectors, energy = principal(x)
    assert energy[0].tolist() == sorted(energy[0].tolist(), reverse=True) and abs(float(energy.sum()) - 1) < 1e-5
    assert int(vectors[0, :, 0].abs().argmax()) == 0 and int(vectors[0, :, 1].abs().argmax()) == 2


@pytest.mark.parametrize("mode", ["none", "int4"])
@pytest.mark.parametrize("row", COMPRESSING, ids=lambda r: r.name)
def test_every_policy_composes_with_low_rank(tiny_model, row, mode):
    quant = QuantSpec(mode, group=4, residual=4, rank=RANK)
    ids, mask = left_padded([24, 17])
    cache, logits = prefill_logits(tiny_model, build(row, 0.5), ids, mask, quant=quant)
    plain, _ = prefill_logits(tiny_model, build(row, 0.5), ids, mask)
    assert cache.entries() == plain.entries()  # the policy keeps as many: only how they are held differs
    if mode == "none":
        assert cache.kept_nbytes == cache.entries() * 2 * RANK * 4
    for step in decode(tiny_model, cache, logits, ids.shape[1], 3):
        assert bool(torch.isfinite(step).all())


def test_a_low_rank_prompt_is_attended_in_coordinates_so_it_is_not_derived(tiny_model):
    """Unlike quantization (a chunk is attended before it is sealed), a low-rank cache attends its
    own prompt in coordinates: its later layers see other inputs than a full prefill's, so eval
    prefills each low-rank setting itself instead of deriving it."""
    quant = QuantSpec(rank=RANK)
    ids, mask = left_padded([30])
    direct, _ = prefill_logits(tiny_model, make_policy("full"), ids, mask, quant=quant)
    plain, _ = prefill_logits(tiny_model, make_policy("full"), ids, mask)
    first = direct.layers[0].storage.view().keys, plain.layers[0].storage.view().keys
    last = direct.layers[-1].storage.view().keys, plain.layers[-1].storage.view().keys
    projected = torch.einsum("bhtd,hdr,her->bhte", first[1], *[direct.layers[0].basis.keys] * 2)
    torch.testing.assert_close(first[0], projected, rtol=1e-4, atol=1e-4)  # layer 0: the same keys, projected
    assert not torch.allclose(last[0], torch.einsum("bhtd,hdr,her->bhte", last[1], *[direct.layers[-1].basis.keys] * 2), atol=1e-3)
    base = KVCache(tiny_model, make_policy("full"), record_prefill=True)
    tiny_model(input_ids=ids, past_key_values=base, use_cache=True)
    with pytest.raises(ValueError, match="attends its own prompt in coordinates; prefill it"):
        base.derive(make_policy("knorm", ratio=0.5), quant=quant)


def test_low_rank_errors_say_what_to_do(tiny_model):
    with pytest.raises(ValueError, match="rank 16 keeps nothing out of head_dim 16; use a rank below 16"):
        QuantSpec(rank=16).check_head_dim(16)
    with pytest.raises(ValueError, match="must be a whole number >= 1"):
        QuantSpec(rank=0)
    with pytest.raises(ValueError, match="the paged layout .* does not take a rank"):
        make_storage("paged", 1, HEADS, DIM, torch.float32, torch.device("cpu"), (), QuantSpec(rank=RANK))
    with pytest.raises(ValueError, match="run `kvforge calibrate --model <model>` once"):
        require_bases("0" * 24, "int4/r8")
    assert find_bases(fingerprint(tiny_model)) is not None
    assert QuantSpec.parse("int4/r32") == QuantSpec("int4", rank=32) and QuantSpec("int4", rank=32).label == "int4/r32"
    assert QuantSpec.parse("r8").label == "r8" and QuantSpec.parse("int4").rank is None


def test_think_ranks_channels_by_query_norm_times_key_norm():
    # Column norms: queries (1, 4, 2, 0.5), keys (3, 1, 1, 1): scores 3, 4, 2, 0.5 of 9.5.
    queries = torch.tensor([1.0, 4.0, 2.0, 0.5]).expand(1, 1, 4) * torch.ones(1, 4, 1) / 2  # 4 rows: norm = entry
    keys = torch.tensor([3.0, 1.0, 1.0, 1.0]).expand(1, 9, 4) / 3  # 9 rows: norm = entry
    channels, share = think_channels(queries, keys)
    assert channels.tolist() == [[1, 0, 2, 3]]
    torch.testing.assert_close(share, torch.tensor([[4.0, 3.0, 2.0, 0.5]]) / 9.5)


def test_think_keys_are_their_kept_channels_as_they_are():
    channels = torch.tensor([[3, 0], [1, 2]])
    basis = channel_columns(channels, 4)  # (2, 4, 2)
    x = torch.randn(1, 2, 5, 4)
    down = torch.einsum("bhtd,hdr->bhtr", x, basis)
    assert torch.equal(down[0, 0], x[0, 0][:, [3, 0]]) and torch.equal(down[0, 1], x[0, 1][:, [1, 2]])
    up = torch.einsum("bhtr,hdr->bhtd", down, basis)
    assert torch.equal(up[0, 0][:, [3, 0]], x[0, 0][:, [3, 0]]) and not up[0, 0][:, [1, 2]].any()


def test_a_think_cache_prunes_key_channels_and_holds_what_r8_holds(tiny_model):
    think, ranked = QuantSpec.parse("think8"), QuantSpec.parse("r8")
    assert think == QuantSpec(rank=RANK, key_basis="think") and think.label == "think8"
    assert QuantSpec.parse("int4/think32/centroid0.25").label == "int4/think32/centroid0.25"
    bases = find_bases(fingerprint(tiny_model))
    assert bases is not None
    assert float(bases.channel_share.sum(-1).min()) == pytest.approx(1.0)
    assert bases.kept_channel_share(RANK) > RANK / DIM  # the kept half scores more than half
    ids, mask = left_padded([30, 21])
    pruned, _ = prefill_logits(tiny_model, make_policy("full"), ids, mask, quant=think)
    plain, _ = prefill_logits(tiny_model, make_policy("full"), ids, mask)
    # Layer 0 sees the same input either way: its keys are the plain ones, pruned channels zero.
    dropped = torch.ones(HEADS, DIM, dtype=torch.bool).scatter(1, bases.key_channels[0, :, :RANK], False)
    want = plain.layers[0].storage.view().keys.masked_fill(dropped[None, :, None, :], 0.0)
    assert torch.equal(pruned.layers[0].storage.view().keys, want)
    compressed, logits = prefill_logits(tiny_model, make_policy("snapkv", ratio=0.5), ids, mask, quant=think)
    projected, _ = prefill_logits(tiny_model, make_policy("snapkv", ratio=0.5), ids, mask, quant=ranked)
    assert compressed.layers[0].basis.values.equal(projected.layers[0].basis.values)  # values as r8 holds them
    assert compressed.kept_nbytes == projected.kept_nbytes == compressed.entries() * 2 * RANK * 4
    for step in decode(tiny_model, compressed, logits, ids.shape[1], 2):
        assert bool(torch.isfinite(step).all())


def test_fidelity_prefills_a_low_rank_cache_itself(tiny_model):
    from conftest import word_tokenizer
    from kvforge.eval.fidelity import fidelity
    from kvforge.models import LoadedModel

    ids = torch.randint(5, 128, (96,), generator=torch.Generator().manual_seed(3)).tolist()
    specs = [QuantSpec(), QuantSpec.parse("r8"), QuantSpec.parse("think8")]
    got = {f.quant: f for f in fidelity(LoadedModel(tiny_model, word_tokenizer(), "tiny"), ids, 64, [make_policy("full")], specs)}
    assert got["none"].kl == pytest.approx(0.0, abs=1e-6)
    assert got["r8"].kl > 1e-4 and got["think8"].kl > 1e-4 and got["r8"].kl != got["think8"].kl
    assert got["r8"].kept_bytes == got["think8"].kept_bytes == got["none"].kept_bytes * RANK // DIM


def test_think_errors_say_what_to_do():
    with pytest.raises(ValueError, match="keeps `rank` key channels: give a rank, e.g. int4/think32"):
        QuantSpec("int4", key_basis="think")
    with pytest.raises(ValueError, match="unknown key basis 'svd'; use one of pca, think"):
        QuantSpec("int4", rank=8, key_basis="svd")
    with pytest.raises(ValueError, match="rank 64 keeps nothing out of head_dim 64"):
        QuantSpec.parse("int4/think64").check_head_dim(64)
