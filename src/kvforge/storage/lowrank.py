"""Low-rank K/V storage: each KV head's keys and values held as coordinates in a calibrated basis.

Palu (Chang et al., 2025) and Eigen Attention observe that a head's keys and values lie close to
a subspace much smaller than head_dim. Each layer and KV head has an orthonormal basis per side,
fitted once per model by `kvforge calibrate` (`calibration/lowrank.py`: the main directions of
the keys, after rotary, and of the values on calibration text); this storage keeps only the
first `rank` coordinates of each entry, in any inner storage (full precision or quantized: the
coordinates are what gets quantized), so the bytes are rank / head_dim of the inner layout's.

Nothing is reconstructed to attend: with U_k, U_v (head_dim, rank) and an entry's coordinates
z_k = k U_k, z_v = v U_v, a query q scores (q U_k) . z_k, which is q . k' for the held
reconstruction k' = z_k U_k^T; the output sum_i p_i z_v,i, taken back by U_v^T, is
sum_i p_i v'_i. So the inner storage attends the projected query over the coordinates with the
model's own scaling, and policies see the reconstructions (`view`). The basis is the model's,
like its weights, and is not counted in a cache's bytes.

Keys are fitted after rotary (where they are stored), which Palu notes needs a higher rank than
fitting before it; this layout does not re-rotate on read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvforge.storage.base import KVStorage, PaddedView


@dataclass(frozen=True)
class Basis:
    """One layer's bases: keys and values (kv_heads, head_dim, rank), orthonormal columns."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def rank(self) -> int:
        return self.keys.shape[-1]


def down(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(batch, heads, T, head_dim) -> (batch, heads, T, rank) coordinates; `basis` (kv_heads,
    head_dim, rank) is repeated over the query heads of each group when heads > kv_heads."""
    basis = basis.repeat_interleave(x.shape[1] // basis.shape[0], 0).to(x.dtype)
    return torch.einsum("bhtd,hdr->bhtr", x, basis)


def up(z: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(batch, heads, T, rank) coordinates -> (batch, heads, T, head_dim) reconstructions."""
    basis = basis.repeat_interleave(z.shape[1] // basis.shape[0], 0).to(z.dtype)
    return torch.einsum("bhtr,hdr->bhtd", z, basis)


class LowRankView(PaddedView):
    """A view of reconstructions over the inner storage's view of coordinates (`inner`), whose
    positions, validity and policy state it shares."""

    def __init__(self, inner: PaddedView, basis: Basis) -> None:
        super().__init__(lambda: up(inner.keys, basis.keys), lambda: up(inner.values, basis.values), inner.positions, inner.valid, inner.aux)
        self.inner = inner


class LowRankKV(KVStorage):
    """Entries of one attention layer as coordinates in `basis`, held by `inner` (head_dim = rank)."""

    def __init__(self, inner: KVStorage, basis: Basis, head_dim: int) -> None:
        if inner.head_dim != basis.rank:
            raise ValueError(f"a low-rank storage's inner storage holds {basis.rank} coordinates per entry, not {inner.head_dim}")
        self.inner, self.basis = inner, basis
        self.batch, self.kv_heads, self.head_dim = inner.batch, inner.kv_heads, head_dim
        self.dtype, self.device, self.aux_names = inner.dtype, inner.device, inner.aux_names

    def _over(self, inner: KVStorage) -> LowRankKV:
        return LowRankKV(inner, self.basis, self.head_dim)

    # --- sizes: the inner storage's (the basis is the model's) ---------------------------------

    @property
    def lengths(self) -> torch.Tensor:
        return self.inner.lengths

    @property
    def entry_nbytes(self) -> int:
        return self.inner.entry_nbytes

    @property
    def kept_nbytes(self) -> int:
        return self.inner.kept_nbytes

    def seq_nbytes(self) -> torch.Tensor:
        return self.inner.seq_nbytes()

    def buffers(self) -> dict[int, int]:
        return self.inner.buffers()

    @property
    def meta_nbytes(self) -> int:
        return self.inner.meta_nbytes

    @property
    def wants_importance(self) -> bool:  # type: ignore[override]
        return self.inner.wants_importance

    def seal(self, importance: Callable[[], torch.Tensor] | None = None, prompt: bool = False) -> None:
        self.inner.seal(importance, prompt)  # importance is per view slot: the same slots

    def expect(self, count: int, layers: int) -> None:
        self.inner.expect(count, layers)

    # --- writing and reading -----------------------------------------------------------------

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, exact: bool = False) -> None:
        self.inner.append(down(keys, self.basis.keys), down(values, self.basis.values), positions, valid, exact)

    def attend(
        self, query: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, scaling: float, accumulate: str | None = None
    ) -> torch.Tensor:
        out = self.inner.attend(down(query, self.basis.keys), positions, valid, scaling, accumulate)  # (batch, q_heads, T, rank)
        return up(out, self.basis.values)

    def accumulate_attention(self, name: str, query: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, scaling: float) -> None:
        self.inner.accumulate_attention(name, down(query, self.basis.keys), positions, valid, scaling)

    def view(self) -> LowRankView:
        return LowRankView(self.inner.view(), self.basis)

    @staticmethod
    def _inner(view: PaddedView) -> PaddedView:
        if not isinstance(view, LowRankView):
            raise TypeError("a low-rank storage takes the views it made (LowRankView)")
        return view.inner

    def keep(self, view: PaddedView, index: torch.Tensor, keep_mask: torch.Tensor, reserve: int = 0) -> None:
        self.inner.keep(self._inner(view), index, keep_mask, reserve)

    def add_aux(self, name: str, view: PaddedView, delta: torch.Tensor) -> None:
        self.inner.add_aux(name, self._inner(view), delta)
        view.aux = self._inner(view).aux

    def set_aux(self, name: str, view: PaddedView, values: torch.Tensor) -> None:
        self.inner.set_aux(name, self._inner(view), values)
        view.aux = self._inner(view).aux

    def set_values(self, view: PaddedView, values: torch.Tensor, changed: torch.Tensor) -> None:
        coords = down(values, self.basis.values)
        self.inner.set_values(self._inner(view), coords, changed)
        view.replace_values(up(coords, self.basis.values), changed)  # what is held now

    def export_aux(self) -> dict[str, object]:
        return self.inner.export_aux()

    def import_aux(self, state: dict[str, object]) -> None:
        self.inner.import_aux(state)

    def share(self, aux_names: tuple[str, ...]) -> LowRankKV:
        return self._over(self.inner.share(aux_names))

    @classmethod
    def stack(cls, parts: list[KVStorage], shifts: list[int], take: bool = False) -> LowRankKV:
        if not all(isinstance(p, LowRankKV) for p in parts):
            raise ValueError("LowRankKV.stack takes low-rank storages")
        lows: list[LowRankKV] = parts  # type: ignore[assignment]
        inner = type(lows[0].inner).stack([p.inner for p in lows], shifts, take)
        return lows[0]._over(inner)

    def select(self, sequences: list[int]) -> LowRankKV:
        return self._over(self.inner.select(sequences))
