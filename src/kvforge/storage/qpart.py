"""The quantized entries of one bit width, for the quantized layout (`quantized.py`).

    quant   kc (N, code_bytes) uint8   vc (N, code_bytes) uint8   vm (N, fields, head_dim / group) f16
            pos (N,) int32   aux:<name> (N,) f32
    groups  km (NG, fields, head_dim) f16: per-channel scale (and minimum) of one key group
            count (NG,) int32: entries of the group still held

Both are flat ragged tensors (`Segments`), rows in order. A key group's entries are `count`
consecutive rows of kc (a contiguous block a kernel can read with its scale row beside it).
Every operation builds new tensors, so two storages may share a part (copy on write).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from kvforge.storage.codec import (
    META_DTYPE, QuantSpec, code_values, dequantize_keys, dequantize_values, quantize_keys, quantize_values,
)  # fmt: skip
from kvforge.storage.base import exclusive_cumsum
from kvforge.storage.segments import Segments

FOLD_QUERIES = 32  # up to this many queries per KV head, scales are folded into the queries


def aux_field(name: str) -> str:
    return f"aux:{name}"


def encode_block(block: dict[str, torch.Tensor], spec: QuantSpec) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """Quantize a block of entries (name -> (batch, heads, W, ...), W whole groups of `spec`, one
    bit width): per entry kc, vc (b, h, W, code_bytes) and vm (b, h, W, fields, dim / group); per
    key group km (b, h, W / group, fields, dim); and the block's other fields, as they were."""
    g = spec.group
    batch, heads, width = block["k"].shape[:3]
    kc, km = quantize_keys(block["k"].reshape(batch, heads, width // g, g, -1), spec)  # (b, h, W/G, G, cb)
    vc, vm = quantize_values(block["v"], spec)
    rest = {n: t for n, t in block.items() if n not in ("k", "v")}
    return {"kc": kc.flatten(2, 3), "vc": vc, "vm": vm}, km, rest


def export_state(parts: list[Segments], tail: Segments, names: tuple[str, ...]) -> dict[str, object]:
    """A copy of policy state `names` of a quantized storage's parts' entries and tail's."""
    return {name: {"tail": tail.fields[aux_field(name)].clone(), "parts": [p.fields[aux_field(name)].clone() for p in parts]} for name in names}


def import_state(parts: list[Segments], tail: Segments, state: dict[str, object]) -> None:
    """Policy state exported by a storage over the same entries (either quantized layout): of
    another mode too, while the parts are empty (a prompt is observed before it is quantized)."""
    for name, saved in state.items():
        assert isinstance(saved, dict)
        tail.fields[aux_field(name)] = saved["tail"].clone()
        held = saved["parts"] if len(saved["parts"]) == len(parts) else [None] * len(parts)
        for part, t in zip(parts, held):
            if t is None:
                assert part.entries == 0, "policy state of another layout only fits while nothing is quantized"
                continue
            part.fields[aux_field(name)] = t.clone()


@dataclass
class Part:
    spec: QuantSpec  # one bit width (never `mixed`)
    quant: Segments
    groups: Segments

    @classmethod
    def empty(cls, spec: QuantSpec, batch: int, kv_heads: int, head_dim: int, aux_names: tuple[str, ...], device: torch.device) -> Part:
        cb, fields = spec.code_bytes(head_dim), spec.meta_fields
        quant = Segments.empty(batch, kv_heads, {
            "kc": ((cb,), torch.uint8), "vc": ((cb,), torch.uint8), "vm": ((fields, head_dim // spec.group), META_DTYPE),
            "pos": ((), torch.int32), **{aux_field(n): ((), torch.float32) for n in aux_names},
        }, device)  # fmt: skip
        groups = Segments.empty(batch, kv_heads, {"km": ((fields, head_dim), META_DTYPE), "count": ((), torch.int32)}, device)
        return cls(spec, quant, groups)

    # --- sizes -------------------------------------------------------------------------------

    def kv_tensors(self) -> list[torch.Tensor]:
        """Codes, value scales and minimums, key scales and minimums."""
        return [self.quant.fields[n] for n in ("kc", "vc", "vm")] + [self.groups.fields["km"]]

    def seq_nbytes(self) -> torch.Tensor:
        """(batch,) the bytes `nbytes` counts, per sequence."""
        per_entry = sum(self.quant.fields[n][0:1].nbytes for n in ("kc", "vc", "vm")) if self.quant.entries else 0
        per_group = self.groups.fields["km"][0:1].nbytes if self.groups.entries else 0
        return (self.quant.counts * per_entry + self.groups.counts * per_group).sum(1)

    @property
    def meta_nbytes(self) -> int:
        state = sum(t.nbytes for n, t in self.quant.fields.items() if n == "pos" or n.startswith("aux:"))
        return state + self.groups.fields["count"].nbytes + self.quant.lengths.nbytes + self.groups.lengths.nbytes

    # --- writing -----------------------------------------------------------------------------

    def add(self, block: dict[str, torch.Tensor], counts: torch.Tensor) -> Part:
        """Quantize each row's first counts[b, h] entries of `block` (name -> (batch, heads, W, ...),
        W a multiple of the group, counts too) into whole key groups appended to the row."""
        g = self.spec.group
        entries, km, rest = encode_block(block, self.spec)
        quant = self.quant.extend({**entries, **rest}, counts)
        count = torch.full(km.shape[:3], g, dtype=torch.int32, device=km.device)
        return Part(self.spec, quant, self.groups.extend({"km": km, "count": count}, counts // g))

    def entry_group(self) -> torch.Tensor:
        """(N,) the flat group of each entry."""
        counts = self.groups.fields["count"].long()
        # output_size: the entry count is the codes' length, so no copy to the host is needed.
        return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts, output_size=self.quant.fields["kc"].shape[0])

    def select(self, rows: torch.Tensor, lengths: torch.Tensor) -> Part:
        """Keep the entries at flat `rows` (in order), `lengths` per row. Exact: an entry's codes
        and value scales go with it; a key group's scale stays until its last entry is gone."""
        counts = torch.bincount(self.entry_group().index_select(0, rows), minlength=self.groups.entries)
        alive = counts > 0
        rows_of_groups = self.groups.lengths.numel()
        owner = torch.repeat_interleave(torch.arange(rows_of_groups, device=rows.device), self.groups.lengths.flatten())
        group_len = torch.bincount(owner[alive], minlength=rows_of_groups).view_as(self.groups.lengths)
        groups = self.groups.with_fields(count=counts.to(torch.int32)).select(alive.nonzero().flatten(), group_len)
        return Part(self.spec, self.quant.select(rows, lengths), groups)

    def with_values(self, rows: torch.Tensor, values: torch.Tensor) -> Part:
        """The values of flat `rows` replaced by (M, dim) `values`, requantized (per token)."""
        vc, vm = quantize_values(values.float(), self.spec)
        fields = self.quant.fields
        quant = self.quant.with_fields(vc=fields["vc"].index_put((rows,), vc), vm=fields["vm"].index_put((rows,), vm))
        return Part(self.spec, quant, self.groups)

    # --- reading -----------------------------------------------------------------------------

    def whole_groups(self) -> bool:
        """No group misses an evicted entry: each row holds group-times its groups (a group holds
        at most `group`), read from the host counts, so no device sync."""
        return torch.equal(self.quant.counts, self.groups.counts * self.spec.group)

    def dense(self) -> bool:
        """Every row holds the same number of whole groups: the codes are a dense
        (batch, heads, groups, group, code_bytes) tensor and `Reader` applies."""
        return self.quant.uniform() is not None and self.groups.uniform() is not None and self.whole_groups()

    def keys(self, start: int, stop: int) -> torch.Tensor:
        """(batch, heads, stop - start, dim) float32 keys of padded slots [start, stop)."""
        batch, heads = self.quant.lengths.shape
        rows, valid = self.quant.slot_rows()
        rows, valid = rows[:, :, start:stop], valid[:, :, start:stop]
        flat = rows[valid]
        meta = self.groups.fields["km"].index_select(0, self.entry_group().index_select(0, flat))  # (n, fields, dim)
        keys = dequantize_keys(self.quant.fields["kc"].index_select(0, flat)[:, None], meta, self.spec)[:, 0]
        out = keys.new_zeros(batch, heads, stop - start, keys.shape[-1])
        out[valid] = keys
        return out

    def values(self, start: int, stop: int) -> torch.Tensor:
        """(batch, heads, stop - start, dim) float32 values of padded slots [start, stop)."""
        vc = self.quant.padded("vc")[:, :, start:stop]
        return dequantize_values(vc, self.quant.padded("vm")[:, :, start:stop], self.spec)


@dataclass
class PaddedGroups:
    """A part's codes with every row's key groups padded to the most groups of a row and every
    group to `group` slots: slot j * group + o of a row is entry o of its group j.

    kc (b, h, NG, G, code_bytes)  km (b, h, NG, fields, dim)  vc (b, h, NG * G, code_bytes)
    vm (b, h, NG * G, fields, dim / group)  valid (b, h, NG * G)  index (b, h, longest): the padded
    slot of each of a row's entries, in order (where a compact picture of the row puts them)."""

    kc: torch.Tensor
    km: torch.Tensor
    vc: torch.Tensor
    vm: torch.Tensor
    valid: torch.Tensor
    index: torch.Tensor


def padded_groups(part: Part) -> PaddedGroups:
    """Scatter a ragged part (rows of different group counts, groups missing entries) into
    `PaddedGroups` (zeros where nothing is held): the codes stay codes. Made for one attention
    call and dropped after it: kept between decoding steps it would be a second, uncounted copy
    of the part's codes (2.2x the bytes counted, for kvzap 0.5 + int4/g16 at 2048 tokens)."""
    if part.whole_groups():
        return _padded_rows(part)
    return _scatter_groups(part)


def _padded_rows(part: Part) -> PaddedGroups:
    """Every group whole (the usual case: a policy evicts before its prompt is quantized), rows
    holding different numbers of them: a row's entry i is its padded slot i, so each field is its
    rows copied whole (one copy per row, no index per entry)."""
    g, ng = part.spec.group, part.groups.longest
    batch, heads = part.quant.lengths.shape

    def rows(segments: Segments, name: str) -> torch.Tensor:  # (batch, heads, longest, *rest)
        t = segments.fields[name]
        padded = pad_sequence(list(t.split(segments.counts.flatten().tolist())), batch_first=True)
        return padded.view(batch, heads, *padded.shape[1:])

    valid = torch.arange(ng * g, device=part.quant.lengths.device) < part.quant.lengths[..., None]  # (batch, heads, ng * g)
    index = torch.arange(part.quant.longest, device=valid.device).expand(batch, heads, -1)
    index = torch.where(valid[:, :, : index.shape[-1]], index, 0)  # 0 past a row's entries, as the scatter gives
    kc = rows(part.quant, "kc").view(batch, heads, ng, g, -1)
    return PaddedGroups(kc, rows(part.groups, "km"), rows(part.quant, "vc"), rows(part.quant, "vm"), valid, index)


def _scatter_groups(part: Part) -> PaddedGroups:
    """Groups missing evicted entries: each entry scattered to its padded slot."""
    g = part.spec.group
    batch, heads = part.quant.lengths.shape
    rows = batch * heads
    ng = part.groups.longest
    counts = part.groups.fields["count"].long()  # (NG,)
    device = counts.device
    entry_group = part.entry_group()  # (N,)
    n = entry_group.numel()
    offset = torch.arange(n, device=device) - exclusive_cumsum(counts).index_select(0, entry_group)
    per_row = part.groups.lengths.flatten()
    group_row = torch.repeat_interleave(torch.arange(rows, device=device), per_row, output_size=counts.numel())
    group_local = torch.arange(counts.numel(), device=device) - exclusive_cumsum(per_row).index_select(0, group_row)
    group_slot = group_row * ng + group_local  # (NG,) padded group of each group
    slot = group_slot.index_select(0, entry_group) * g + offset  # (N,) padded slot of each entry
    fields = part.quant.fields

    def scattered(t: torch.Tensor, size: int, index: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros(size, *t.shape[1:])
        return out.index_copy_(0, index, t)

    width = ng * g
    kc = scattered(fields["kc"], rows * width, slot).view(batch, heads, ng, g, -1)
    vc = scattered(fields["vc"], rows * width, slot).view(batch, heads, width, -1)
    vm = scattered(fields["vm"], rows * width, slot).view(batch, heads, width, *fields["vm"].shape[1:])
    km = scattered(part.groups.fields["km"], rows * ng, group_slot).view(batch, heads, ng, *part.groups.fields["km"].shape[1:])
    valid = torch.zeros(rows * width, dtype=torch.bool, device=device).index_fill_(0, slot, True).view(batch, heads, width)
    # A row's i-th entry, in the compact picture, sits at padded slot slot[e] - row * width.
    entry_row = torch.repeat_interleave(torch.arange(rows, device=device), part.quant.lengths.flatten(), output_size=n)
    local = torch.arange(n, device=device) - exclusive_cumsum(part.quant.lengths.flatten()).index_select(0, entry_row)
    longest = part.quant.longest
    index = torch.zeros(rows * max(longest, 1), dtype=torch.long, device=device)
    index.index_copy_(0, entry_row * max(longest, 1) + local, slot - entry_row * width)
    return PaddedGroups(kc, km, vc, vm, valid, index.view(batch, heads, max(longest, 1))[:, :, :longest])


class Reader:
    """Attention over a part without building full-precision K or V for more than a block: a
    dense part (`Part.dense`) is read as it lies; a ragged one (rows holding different numbers of
    groups, groups missing evicted entries) through `padded_groups`, its empty slots masked
    (`valid`), so where a policy evicted does not change how it is read.

    Keys: a group's per-channel scale s and minimum m fold into the query,
        q . k_t = (q * s) . code_t + q . m
    so a block costs one conversion of its codes to float and one matmul per group. Values: a
    token's per-channel-group scale and minimum fold into its attention probability,
        sum_t p_t v_t[j] = sum_t (p_t s_tj) code_t[j] + sum_t p_t m_tj
    With many queries (a prompt chunk) folding would copy the scales per query: the block is
    dequantized instead."""

    def __init__(self, part: Part) -> None:
        self.spec = spec = part.spec
        batch, heads = part.quant.lengths.shape
        self.valid: torch.Tensor | None = None  # (b, h, width) where not every slot holds an entry
        self.index: torch.Tensor | None = None  # (b, h, longest): padded slot of each compact one
        if part.dense():
            groups = part.groups.uniform() or 0
            self.kc = part.quant.padded("kc").view(batch, heads, groups, spec.group, -1)  # (b, h, groups, G, code_bytes)
            self.km = part.groups.padded("km").float()  # (b, h, groups, fields, dim)
            self.vc = part.quant.padded("vc")  # (b, h, n, code_bytes)
            self.vm = part.quant.padded("vm").float()  # (b, h, n, fields, dim / group)
        else:
            padded = padded_groups(part)
            self.kc, self.km, self.vc, self.vm = padded.kc, padded.km.float(), padded.vc, padded.vm.float()
            self.valid, self.index = padded.valid, padded.index

    @property
    def width(self) -> int:
        """Slots read per row: whole groups."""
        return self.kc.shape[2] * self.spec.group

    def logits(self, q: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """q (b, h, Q, dim) scaled queries -> (b, h, Q, stop - start) logits of slots [start, stop)."""
        g = self.spec.group
        codes = code_values(self.kc[:, :, start // g : stop // g], self.spec)  # (b, h, nb, G, dim)
        meta = self.km[:, :, start // g : stop // g]  # (b, h, nb, fields, dim)
        b, h, nb = codes.shape[:3]
        if q.shape[2] > FOLD_QUERIES:
            keys = codes * meta[:, :, :, 0:1] + (meta[:, :, :, 1:2] if self.spec.asymmetric else 0)
            return q @ keys.view(b, h, nb * g, -1).transpose(-1, -2)
        folded = q[:, :, None] * meta[:, :, :, None, 0]  # (b, h, nb, Q, dim)
        logits = folded @ codes.transpose(-1, -2)  # (b, h, nb, Q, G)
        if self.spec.asymmetric:
            logits += (meta[:, :, :, 1] @ q.transpose(-1, -2))[..., None]  # (b, h, nb, Q, 1): q . m
        return logits.transpose(2, 3).reshape(b, h, q.shape[2], nb * g)

    def output(self, probs: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """probs (b, h, Q, stop - start) -> (b, h, Q, dim): their weighted sum of the values."""
        codes = code_values(self.vc[:, :, start:stop], self.spec)  # (b, h, n, dim)
        meta = self.vm[:, :, start:stop]  # (b, h, n, fields, groups)
        if probs.shape[2] > FOLD_QUERIES:
            return probs @ dequantize_values(self.vc[:, :, start:stop], meta, self.spec)
        g = self.spec.group
        parts = []
        for j in range(meta.shape[-1]):
            part = (probs * meta[:, :, None, :, 0, j]) @ codes[..., j * g : (j + 1) * g]  # (b, h, Q, G)
            if self.spec.asymmetric:
                part += probs @ meta[:, :, :, 1, j, None]  # (b, h, Q, 1): sum_t p_t m_tj
            parts.append(part)
        return torch.cat(parts, -1)
