"""Keep what the model reads when it is asked to repeat the context.

Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", NeurIPS
2025: after the context is stored, the model is prompted to repeat it, and each entry's score is
the most attention any query of that reconstruction (any head of its GQA group) pays it, with
the softmax taken over the repeated span, the first `sinks` entries and the reconstruction's own
tokens. An entry the model needs to reproduce the context is one any later question may need,
so one compressed cache serves every question.

The reconstruction runs `chunk` context tokens per pass (bounded memory and cost, the paper's
chunked scoring; 2048 there, 512 here, which on 2 CPU cores cut the passes from 3.1x to 1.7x the
cost of one prefill of a 2048-token context); each later pass is prompted with the `overlap` tokens before its
piece, as in the reference code. The prompt chunks are stored whole and compressed once their
passes have run (`defers`), so the cache holds at most the budget plus one chunk. As in the
paper, budgets are not uniform: by default (`spread="model"`) one threshold over every layer and
head keeps the cache's whole budget, so layers and heads keep what their scores earn ("layer":
one budget per layer spent across its heads; "head": every head alike). Entries no pass has
scored yet (the question, generated tokens) are kept ahead of the others if a decoding budget
applies. The passes cost 1.7 prefills of a 2048-token context on two CPU cores; eval and bench
report them in the policy's seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvforge.policies.base import Policy, Reconstruction, StepContext, check_range
from kvforge.policies.registry import register
from kvforge.policies.budgets import check_spread, spread_select, spread_targets

STATE = "kvzip"


@register
@dataclass
class KVzip(Policy):
    chunk: int = 512
    overlap: int = 8
    sinks: int = 4
    spread: str = "model"  # one threshold over all layers and heads; "layer": per layer; "head": per head

    name: ClassVar[str] = "kvzip"
    description: ClassVar[str] = "keep what the model attends to while repeating the context (KVzip); its passes cost ~1.7 prefills"
    aux_names: ClassVar[tuple[str, ...]] = (STATE,)
    defers: ClassVar[bool] = True
    mass_scores: ClassVar[str | None] = "linear"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("chunk", self.chunk, 1)
        check_range("overlap", self.overlap, 0)
        check_range("sinks", self.sinks, 0)
        check_spread(self.spread)

    def reconstruction(self) -> Reconstruction:
        return Reconstruction(
            first="\n\nRepeat the previous context exactly.",
            later="\n\nRepeat the part of the previous context exactly, starting with",
            chunk=self.chunk,
            overlap=self.overlap,
            sinks=self.sinks,
            state=STATE,
        )

    def score(self, ctx: StepContext) -> torch.Tensor:
        view = ctx.view
        state = view.aux[self.aux_names[0]]  # (batch, kv_heads, slots)
        slot = torch.arange(state.shape[-1], device=state.device)
        # A pass scores every entry of its piece above 0; an entry still at 0 was never scored.
        keep = (slot < self.sinks) | (state == 0)
        return torch.where(keep & view.valid, float("inf"), state)

    def layer_budgets(self, contexts: list[StepContext | None]) -> list[torch.Tensor | None]:
        return spread_targets(self.score, contexts, self.spread)

    def select(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        return spread_select(self.score(ctx), ctx, self.spread)
