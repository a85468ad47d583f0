"""What the kernels read of the flat ragged layouts (`Segments`, quantized parts): their rows as
addresses, offsets and lengths (`kvforge.reading.rows`). Building these reads no K/V."""

from __future__ import annotations

import torch

from kvforge.reading import DenseRows, KeyRows, QuantRows
from kvforge.storage.codec import QuantSpec
from kvforge.storage.segments import Segments


def segment_key_rows(seg: Segments, longest: int) -> KeyRows:
    """The keys (field k) and positions (field pos, int32) of flat ragged `Segments`."""
    keys, positions = seg.fields["k"], seg.fields["pos"]
    assert positions.dtype == torch.int32
    offsets = seg.offsets().flatten()  # (rows,) on the device: no host round trip
    key_at = keys.data_ptr() + offsets * keys.shape[1] * keys.element_size()
    return KeyRows(key_at, positions.data_ptr() + offsets * positions.element_size(), seg.lengths.flatten().int(), keys, longest)


def segment_rows(seg: Segments, longest: int) -> DenseRows:
    """The full-precision fields k, v of flat ragged `Segments` (rows one after the other)."""
    keys, values = seg.fields["k"], seg.fields["v"]
    stride = keys.shape[1] * keys.element_size()  # bytes per entry
    offsets = seg.offsets().flatten() * stride  # (rows,) on the device: no host round trip
    return DenseRows(keys.data_ptr() + offsets, values.data_ptr() + offsets, seg.lengths.flatten().int(), keys, longest)


def part_rows(spec: QuantSpec, quant: Segments, groups: Segments, entry_group: torch.Tensor, longest: int) -> QuantRows:
    """A quantized part's codes and scales (see `storage.qpart`)."""
    f = quant.fields
    head_dim = groups.fields["km"].shape[-1]
    return QuantRows(
        spec.bits, spec.code_bytes(head_dim), spec.meta_fields, spec.group, not spec.asymmetric,
        f["kc"], f["vc"], f["vm"], groups.fields["km"], entry_group.int(), quant.offsets().flatten(),
        quant.lengths.flatten().int(), longest,
    )  # fmt: skip
