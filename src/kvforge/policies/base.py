"""What every compression policy is: a validated dataclass with a narrow `score` hook.

A policy decides *what* to keep; storage decides how it is held. Most policies only implement
`score`, one importance value per held entry per KV head, and the shared `select` keeps the top
ones within the budget. A policy that does something else overrides `select` (the wide hook).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from functools import cached_property
from typing import ClassVar

import torch

from kvforge.policies.names import name_of
from kvforge.reading import causal_allowed, received_attention
from kvforge.calibration import Calibration
from kvforge.storage.base import KVStorage, PaddedView

# Fields of every policy that say how much is kept, not how entries are scored: policies that
# differ only in these observe the same state (a sweep shares it).
BUDGET_FIELDS = ("ratio", "budget", "decode_budget", "evict_every")


def check_range(name: str, value: float, low: float, high: float | None = None, *, high_open: bool = False) -> None:
    """Raise a ValueError naming the field, its value and the allowed range [low, high] (or [low, high))."""
    too_high = high is not None and (value >= high if high_open else value > high)
    if value < low or too_high:
        right = "inf)" if high is None else (f"{high})" if high_open else f"{high}]")
        raise ValueError(f"{name}={value!r} is outside the allowed range [{low}, {right}")


@dataclass(frozen=True)
class Reconstruction:
    """How a policy that scores by reconstruction (KVzip) wants each prompt chunk repeated:
    `first` (then `later`, followed by the last `overlap` tokens of the previous piece) ask the
    model to repeat the context; `chunk` tokens are repeated per pass, so one pass's cost is
    bounded; the first `sinks` tokens of each sequence are in every score's softmax. `score` says
    what an entry scores: "attention", the most attention any query paid it (KVzip); "output", the
    most any query's output would move without it (ReST-KV; `reading.dense.removal_shift`).
    Prompts are text: the tokenizer of the cache turns them into ids."""

    first: str
    later: str
    chunk: int
    overlap: int
    sinks: int
    state: str  # the policy state (aux) the scores go to
    score: str = "attention"


@dataclass
class StepContext:
    """What a policy may look at after one forward chunk of one layer.

    The storage holds every entry the layer keeps *including* the chunk just stored; queries are
    the chunk's. `view` is built on first use (a decoding step that only observes needs none).
    `budget` is set when the step compresses.
    """

    layer_idx: int
    storage: KVStorage
    query: torch.Tensor | None  # (batch, q_heads, T, head_dim); None when compressing after the fact
    query_positions: torch.Tensor  # (T,) logical index of each query
    query_valid: torch.Tensor  # (batch, T) bool, False for padding queries
    scaling: float
    budget: torch.Tensor | None = None  # (batch, kv_heads) entries to keep, at most what each row holds
    # (batch, kv_heads) what the budget asks of each row before it is capped by what the row holds:
    # a policy that moves budget between rows (adakv) spends the sum of this
    target: torch.Tensor | None = None
    num_layers: int = 1  # layers of the model (per-layer budgets scale by depth)
    calibration: Calibration | None = None  # the model's, for policies that need one
    # Values the policy keeps per layer between chunks, first dimension batch (the layer owns it).
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    decoding: bool = False  # the chunk is a generated token, not prompt
    _cache: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @cached_property
    def view(self) -> PaddedView:
        return self.storage.view()

    def allowed(self, start: int = 0) -> torch.Tensor:
        """(batch, kv_heads, T - start, slots) bool: which entries queries start.. may attend to."""
        return causal_allowed(self.view.positions, self.view.valid, self.query_positions[start:])

    def attention(self, last: int | None = None) -> torch.Tensor:
        """(batch, kv_heads, slots) attention each entry got, summed over the last `last` queries
        of the chunk (all if None), averaged over the query heads of its GQA group."""
        key = -1 if last is None else last
        if self.query is None:
            raise ValueError("this policy needs the chunk's queries, and a deferred compression has none")
        if key not in self._cache:
            start = 0 if last is None else max(0, self.query.shape[2] - last)
            self._cache[key] = received_attention(
                self.query[:, :, start:],
                self.view.keys,
                self.view.positions,
                self.view.valid,
                self.query_positions[start:],
                self.query_valid[:, start:],
                self.scaling,
            )
        return self._cache[key]


def top_slots(scores: torch.Tensor, budget: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The `budget` (batch, kv_heads) best real slots of (batch, kv_heads, slots) `scores`:
    (index, mask), each (batch, kv_heads, K), K the largest budget."""
    scores = scores.float().masked_fill(~valid, float("-inf"))
    k = max(int(budget.max()), 1)
    index = scores.topk(k, dim=-1).indices
    mask = torch.arange(k, device=index.device) < budget[..., None]
    return index, mask & valid.gather(-1, index)


@dataclass
class Policy:
    """Base of every compression policy.

    ratio: fraction of the prompt's tokens removed (0 keeps all, 0.75 keeps a quarter), the
        convention of the most used press library. With a chunked prefill the ratio holds after
        every chunk: each compression keeps (1 - ratio) of the tokens seen so far.
    budget: instead of a ratio, at most this many entries per sequence and KV head after the
        prompt (None: use the ratio).
    decode_budget: entries per sequence and KV head held while decoding. None: policies that
        hold their budget while decoding (streaming, h2o) keep the size they had when decoding
        started; the others grow with the generation.
    evict_every: while decoding, a row is compressed back to its budget when it holds
        budget + evict_every entries, so it never holds more than budget + evict_every - 1 and
        the compression cost is shared by evict_every steps (1 evicts at every step).
    """

    ratio: float = 0.5
    budget: int | None = None
    decode_budget: int | None = None
    evict_every: int = 16

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # While decoding, keep the cache at the size it had when decoding started.
    holds_budget_while_decoding: ClassVar[bool] = False
    # Per-entry state the storage carries for this policy (float32, one value per entry).
    aux_names: ClassVar[tuple[str, ...]] = ()
    # One of aux_names to which the storage adds the attention each held entry receives, in every
    # chunk; in a decoding step it comes out of the attention itself (H2O's accumulated attention).
    attention_state: ClassVar[str | None] = None
    # Whether the policy needs the model's calibration (`kvforge calibrate`) to score.
    needs_calibration: ClassVar[bool] = False
    # Whether the policy wraps another (`adakv:snapkv`); see policies/wrapper.py.
    wraps: ClassVar[bool] = False
    # Whether prompt chunks are stored whole and compressed only once extra passes over them have
    # run (`reconstruction()`, KVzip): `kvforge.prefill` runs them, `model.generate` cannot.
    defers: ClassVar[bool] = False
    # What `score` gives, where it is a share of attention a budget by coverage can add up
    # (policies/coverage.py): "linear" (the share itself) or "log" (its logarithm); None: neither.
    mass_scores: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        check_range("ratio", self.ratio, 0.0, 1.0, high_open=True)
        check_range("evict_every", self.evict_every, 1)
        for name in ("budget", "decode_budget"):
            value = getattr(self, name)
            if value is not None and value < self.min_budget():
                raise ValueError(
                    f"{name}={value} is below the minimum of {self.min_budget()} entries for policy {self.name!r} "
                    f"({self.min_budget_reason()}); give --{name.replace('_', '-')} >= {self.min_budget()}"
                )

    def min_budget(self) -> int:
        """The fewest entries per row this policy can keep and still work as designed."""
        return 1

    def min_budget_reason(self) -> str:
        return "at least one entry"

    @property
    def compresses(self) -> bool:
        """Whether this policy ever evicts (a ratio, a budget or a decoding budget is set)."""
        return self.compresses_prompt or self.decode_budget is not None

    @property
    def compresses_prompt(self) -> bool:
        """Whether prompt chunks are compressed (a ratio or a budget is set)."""
        return self.ratio > 0 or self.budget is not None

    @property
    def full_name(self) -> str:
        """The name the policy is made from, wrapped policies included (`adakv:snapkv`)."""
        return self.name

    def given_params(self) -> tuple[tuple[str, object], ...]:
        """(name, value) of each hyperparameter set away from its default; the ratio and a budget
        are the setting's own (`setting`), decoding budgets are named here."""
        return tuple(
            (f.name, getattr(self, f.name)) for f in fields(self)
            if f.init and f.name not in ("ratio", "budget") and f.default is not MISSING and getattr(self, f.name) != f.default
        )  # fmt: skip

    @property
    def written_name(self) -> str:
        """`full_name` with those parameters, as --policies writes it: `smooth:kvzap[kernel=5]`."""
        return name_of(self.full_name, self.given_params())

    @property
    def setting(self) -> str:
        """How much this policy keeps, for reports: `ratio 0.5`, `budget 512`."""
        return f"budget {self.budget}" if self.budget is not None else f"ratio {self.ratio:g}"

    def layer_budgets(self, contexts: list[StepContext | None]) -> list[torch.Tensor | None]:
        """For a deferred compression: each layer's (batch, kv_heads) target, given every layer's
        context (None: nothing to compress there), whose `target` is what the prompt budget asks
        of each row. A policy may move budget between layers. Default: each layer its own."""
        return [None if c is None else c.target for c in contexts]

    def reconstruction(self) -> Reconstruction | None:
        """The extra passes this policy scores a prompt chunk with (None: none)."""
        return None

    def observe(self, ctx: StepContext) -> None:
        """Update per-entry state after every chunk (H2O accumulates attention here)."""

    def score(self, ctx: StepContext) -> torch.Tensor:
        """(batch, kv_heads, slots) importance of each held entry; higher is kept first."""
        raise NotImplementedError(f"policy {self.name!r} defines neither score() nor select()")

    def importance(self, ctx: StepContext) -> torch.Tensor:
        """(batch, kv_heads, slots) how much each held entry matters, for a storage that holds the
        entries that matter most with more bits (`--quant mixed`): the policy's own score; for a
        policy without one (full) or one that cannot score now (its queries are gone after the
        fact), KNorm's: the smaller an entry's key norm, the more it matters."""
        if type(self).score is not Policy.score:
            try:
                return self.score(ctx)
            except ValueError:
                pass
        return -ctx.view.keys.float().norm(dim=-1)

    def select(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Which slots of ctx.view to keep: (index, mask), each (batch, kv_heads, K)."""
        assert ctx.budget is not None
        return top_slots(self.score(ctx), ctx.budget, ctx.view.valid)

    def prefill_budget(self, tokens: torch.Tensor, held: torch.Tensor) -> torch.Tensor | None:
        """(batch, kv_heads) entries each row should keep after a prompt chunk (it may be more than
        a row holds), or None to keep everything.

        tokens: (batch,) prompt tokens seen so far per sequence; held: (batch, kv_heads) entries
        held now, the chunk included."""
        if self.budget is not None:
            return torch.full_like(held, self.budget)
        if self.ratio == 0:
            return None
        keep = torch.floor(tokens.double() * (1.0 - self.ratio)).long().clamp(min=1)
        return keep[:, None].expand_as(held).to(held.device)

    def state_key(self) -> tuple:
        """What the per-entry state this policy observes depends on: its type and every field
        that is not a budget (policies equal in this key can share observed state)."""
        return (type(self), tuple((f.name, getattr(self, f.name)) for f in fields(self) if f.name not in BUDGET_FIELDS))

    @classmethod
    def parameters(cls) -> list[tuple[str, str, object]]:
        """(name, type, default) of each hyperparameter, for `kvforge policies`."""
        return [(f.name, str(f.type), f.default) for f in fields(cls)]

