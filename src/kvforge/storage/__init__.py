"""How kept K/V entries are held in memory: one contract (`base.KVStorage`), several layouts."""

from __future__ import annotations

from dataclasses import replace

import torch

from kvforge.memory.kvmemory import KVMemory
from kvforge.storage.base import KVStorage, PaddedView
from kvforge.storage.codec import QuantSpec
from kvforge.storage.inplace import InPlaceKV
from kvforge.storage.lowrank import Basis, LowRankKV
from kvforge.storage.paged import PagedKV
from kvforge.storage.pagedquant import PagedQuantKV
from kvforge.storage.quantized import QuantizedKV
from kvforge.storage.ragged import RaggedKV

LAYOUTS: dict[str, type[KVStorage]] = {"inplace": InPlaceKV, "paged": PagedKV, "ragged": RaggedKV}
DEFAULT_LAYOUT = "inplace"


def check_layout(name: str) -> type[KVStorage]:
    if name not in LAYOUTS:
        raise ValueError(f"unknown storage layout {name!r}; known layouts: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def make_storage(
    layout: str,
    batch: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    aux_names: tuple[str, ...] = (),
    quant: QuantSpec | None = None,
    memory: KVMemory | None = None,
    basis: Basis | None = None,
) -> KVStorage:
    """A storage of `layout`; with a quantization mode, the quantized layout: over blocks for
    `paged` (codes in a codec memory, the tail in `memory`), else in tensors of its own (its tail
    in its own flat form). `memory`: where the paged layout takes its full-precision blocks
    (default: the process's shared memory for the dtype). A spec with a rank holds coordinates in
    `basis` (the layer's, `calibration/lowrank.py`) in such a storage (`storage/lowrank.py`)."""
    if quant is not None and quant.rank is not None:
        if check_layout(layout) is PagedKV:
            raise ValueError(
                f"--quant {quant.label}: low-rank entries are held in the inplace or ragged layout; the paged "
                f"layout (serve, --store) does not take a rank yet"
            )
        if basis is None or basis.rank != quant.rank:
            raise ValueError(f"--quant {quant.label} needs the layer's basis of rank {quant.rank} (kvforge calibrate measures it)")
        inner = make_storage(layout, batch, kv_heads, quant.rank, dtype, device, aux_names, replace(quant, rank=None, key_basis="pca"), memory)
        return LowRankKV(inner, basis, head_dim)
    if quant is not None and quant.enabled:
        if check_layout(layout) is PagedKV:
            return PagedQuantKV(batch, kv_heads, head_dim, dtype, device, aux_names, quant, memory)
        return QuantizedKV(batch, kv_heads, head_dim, dtype, device, aux_names, quant)
    if check_layout(layout) is PagedKV:
        return PagedKV(batch, kv_heads, head_dim, dtype, device, aux_names, memory)
    return check_layout(layout)(batch, kv_heads, head_dim, dtype, device, aux_names)


__all__ = ["DEFAULT_LAYOUT", "LAYOUTS", "Basis", "KVStorage", "PaddedView", "QuantSpec", "check_layout", "make_storage"]
