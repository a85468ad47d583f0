"""Keep the entries whose removal would move the reconstruction's attention outputs most.

An et al., "ReST-KV: Robust KV Cache Eviction with Layer-wise Output Reconstruction and
Spatial-Temporal Smoothing", ICLR 2026: attention alone misjudges an entry, because removing it
hands its share to the others; what matters is how far each query's output moves. With a_i the
attention a query pays entry i and o the query's output, the output without the entry is
(o - a_i v_i) / (1 - a_i), so the entry scores a_i / (1 - a_i) * ||v_i - o||: a much-attended
entry whose value is what the output already says costs little to drop, a less-attended one
that pulls the output away costs more. As in the paper the distance is measured after the
head's slice W_h of the attention's output projection, ||W_h (v_i - o)|| (what the layer adds to
the residual stream), where the attention module has one named `o_proj` (else between values).
ReST-KV measures it on the last window of the prompt (query-aware); here the queries are KVzip's
context reconstruction (question-agnostic, the same passes, chunks and sinks as `kvzip`), each
entry keeping the most any query would move. ReST-KV's spatial smoothing is `smooth:restkv`; its
temporal smoothing (an average over the window's queries) has no counterpart in a max over the
reconstruction. Budgets are spread as kvzip's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from kvforge.policies.base import Reconstruction
from kvforge.policies.kvzip import KVzip
from kvforge.policies.registry import register


@register
@dataclass
class ReSTKV(KVzip):
    name: ClassVar[str] = "restkv"
    description: ClassVar[str] = "keep what would move the outputs of KVzip's context reconstruction most if dropped (ReST-KV's score)"
    aux_names: ClassVar[tuple[str, ...]] = ("restkv",)
    mass_scores: ClassVar[str | None] = None  # output shifts are not shares of attention: no --coverage

    def reconstruction(self) -> Reconstruction:
        return replace(super().reconstruction(), state=self.aux_names[0], score="output")
