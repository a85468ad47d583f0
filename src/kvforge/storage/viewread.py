"""Attention for layouts that read themselves through a padded copy (`view()`): the ragged
reference and the paged layout. The padded copy is transient working memory; what the layout
holds is what counts."""

from __future__ import annotations

import torch

from kvforge.reading import attend, causal_allowed, every_real, received_attention
from kvforge.storage.base import KVStorage, PaddedView


class ReadsView(KVStorage):
    """`attend` and `accumulate_attention` over `view()`; the layout says when every row holds the
    same count (`uniform_length`), which makes a decoding step plain unmasked attention."""

    def uniform_length(self) -> int | None:
        """The common row length when every (sequence, head) holds the same count, else None."""
        lengths = self.lengths
        if lengths.numel() == 0:
            return None
        first = int(lengths.view(-1)[0])
        return first if bool((lengths == first).all()) else None

    def attend(
        self, query: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, scaling: float, accumulate: str | None = None
    ) -> torch.Tensor:
        if accumulate is not None:
            self.accumulate_attention(accumulate, query, positions, valid, scaling)
        view = self.view()
        out = attend(query, view.keys, view.values, self._allowed(view, query.shape[2], positions, valid), scaling)
        return out.masked_fill(~valid[:, None, :, None], 0.0)

    def _allowed(self, view: PaddedView, t: int, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        """The mask `attend` takes. Every row equally long and every query real: the last t
        entries of each row are the chunk's own tokens and all before them are older, so the
        chunk alone (a decoding step, a first chunk) is plain causal (None) and a later chunk one
        (1, 1, t, held) mask for all rows; otherwise each entry's position decides."""
        held = self.uniform_length()
        if held is None or not every_real(valid):
            return causal_allowed(view.positions, view.valid, positions)
        if held == t:
            return None
        allowed = torch.ones(t, held, dtype=torch.bool, device=valid.device)
        allowed[:, held - t :] = torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()
        return allowed[None, None]

    def accumulate_attention(
        self, name: str, query: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, scaling: float
    ) -> None:
        view = self.view()
        self.add_aux(name, view, received_attention(query, view.keys, view.positions, view.valid, positions, valid, scaling))
