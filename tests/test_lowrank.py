"""Low-rank storage (`--quant int4/r8`): coordinates in the model's bases, exact bytes, attention
taken in coordinates equal to attention over the reconstructions, every policy composing with it,
and the errors."""

from __future__ import annotations

import pytest
import torch

from conftest import left_padded
from kvforge import KVCache, make_policy
from kvforge.calibration import fingerprint
from kvforge.calibration.lowrank import find_bases, principal, require_bases
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
