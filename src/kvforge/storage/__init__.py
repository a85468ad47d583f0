"""How kept K/V entries are held in memory: one contract (`base.KVStorage`), several layouts."""

from __future__ import annotations

import torch

from kvforge.storage.base import KVStorage, PaddedView
from kvforge.storage.codec import QuantSpec
from kvforge.storage.inplace import InPlaceKV
from kvforge.storage.paged import PagedKV
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
) -> KVStorage:
    """A storage of `layout`; with a quantization mode, the quantized layout instead (it holds its
    full-precision tail in its own flat form)."""
    if quant is not None and quant.enabled:
        return QuantizedKV(batch, kv_heads, head_dim, dtype, device, aux_names, quant)
    return check_layout(layout)(batch, kv_heads, head_dim, dtype, device, aux_names)


__all__ = ["DEFAULT_LAYOUT", "LAYOUTS", "KVStorage", "PaddedView", "QuantSpec", "check_layout", "make_storage"]
