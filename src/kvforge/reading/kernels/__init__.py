"""Triton kernels over kvforge's layouts: the decoding step (one new query per sequence), and the
attention each held entry received from a chunk of queries (what scoring policies observe).

The torch code (`kvforge.reading.dense`, and the layouts' own torch paths) is the reference and the CPU implementation; the kernels are
chosen when the tensors are on CUDA and Triton is importable (`enabled`). Tests run the same
kernels on CPU under Triton's interpreter (`TRITON_INTERPRET=1`), against the torch reference.

Importing this package imports nothing heavy: `kvforge.reading.kernels.decode` and
`kvforge.reading.kernels.received` (which need Triton) are loaded on first use.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections import Counter
from collections.abc import Iterator

import torch

# Kernel calls by name since the process started: tells a test or a benchmark which path ran.
calls: Counter[str] = Counter()
_allowed = True  # False inside `using(False)`: the torch path, even where the kernels could run


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Triton runs kernels on the CPU (its interpreter): set before Triton is first imported."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def enabled(device: torch.device) -> bool:
    """Whether decoding on `device` goes through the Triton kernels: on CUDA with Triton present,
    unless KVFORGE_KERNELS=0 asks for the torch path; on the CPU only with KVFORGE_KERNELS=1 under
    Triton's interpreter (slow: for tests of the whole path)."""
    flag = os.environ.get("KVFORGE_KERNELS")
    if not _allowed or flag == "0" or not triton_importable():
        return False
    return device.type == "cuda" or (flag == "1" and interpreted())


def received_enabled(device: torch.device, head_dim: int) -> bool:
    """Whether the attention each entry received (`kvforge.reading.kernels.received`) is computed by its
    kernel: where the kernels are `enabled` and head_dim is a power of two (tl.arange) of at least
    16 (tl.dot's inner dimension). Other sizes take the torch path."""
    return enabled(device) and head_dim >= 16 and head_dim & (head_dim - 1) == 0


@contextlib.contextmanager
def using(kernels: bool) -> Iterator[None]:
    """Within the block, `using(False)` keeps decoding on the torch path (a benchmark's reference
    row on the same device); `using(True)` changes nothing."""
    global _allowed
    before, _allowed = _allowed, _allowed and kernels
    try:
        yield
    finally:
        _allowed = before
