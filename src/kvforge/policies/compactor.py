"""Keep the keys with the highest statistical leverage, from a sketch of the keys' row space.

Chari et al., "Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate
Leverage Scores", 2025: a key with high leverage is one the other keys cannot stand in for (it
spans a direction they do not), so attention from an unknown future query may need it. The
leverage of row i of K (n x d) is k_i (K^T K)^-1 k_i^T; it is approximated as in Drineas et al.
(2012) from a Gaussian sketch: R from the QR of S K (S is `oversample` x d rows by n), then
leverage ~ |k_i R^-1|^2. Needs no query and no extra forward pass. The sketch is seeded, so
scores are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvforge.policies.base import Policy, StepContext, check_range
from kvforge.policies.registry import register


@register
@dataclass
class Compactor(Policy):
    oversample: int = 2  # sketch rows per key dimension
    ridge: float = 1e-4  # added to the diagonal of R, relative to its scale, so R^-1 exists
    seed: int = 0

    name: ClassVar[str] = "compactor"
    description: ClassVar[str] = "keep keys of highest approximate leverage, from a Gaussian sketch (Compactor)"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("oversample", self.oversample, 1)
        check_range("ridge", self.ridge, 0.0)

    def score(self, ctx: StepContext) -> torch.Tensor:
        keys = ctx.view.keys.double() * ctx.view.valid[..., None]  # (batch, kv_heads, slots, d); padding rows 0
        batch, heads, slots, dim = keys.shape
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        # Drawn slot-major, so slot j's column is the same whatever the padded width.
        sketch = torch.randn(slots, self.oversample * dim, generator=gen, dtype=torch.float64).to(keys.device).T
        sketch = sketch / (self.oversample * dim) ** 0.5
        r = torch.linalg.qr(sketch @ keys, mode="r").R  # (batch, kv_heads, d, d)
        scale = r.diagonal(dim1=-2, dim2=-1).abs().amax(-1, keepdim=True).clamp_min(1e-30)
        r = r + torch.diag_embed(torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0) * self.ridge * scale)
        # Solve k_i R^-1 as R^T x = k_i^T, for every row at once.
        coords = torch.linalg.solve_triangular(r.transpose(-1, -2), keys.transpose(-1, -2), upper=False)
        return coords.pow(2).sum(-2).float()  # (batch, kv_heads, slots)
