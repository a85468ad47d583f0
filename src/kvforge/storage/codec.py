"""Quantization codecs for K/V entries: what `--quant` means, and the pure tensor functions that
turn full-precision K/V into packed codes and back.

Integer modes are asymmetric and KIVI-style (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric
2bit Quantization for KV Cache"): keys are quantized per channel over a group of `group`
consecutive tokens (key outliers live in fixed channels), values per token over groups of `group`
channels. Each group keeps a float16 scale and minimum. `fp8` stores e4m3 codes with one float16
scale per group (symmetric: e4m3 has its own sign and exponent).

Packed layout, per entry (one token of one KV head), `code_bytes = head_dim * bits / 8` bytes:
byte j holds channels j, j + P, j + 2P, ... (P = head_dim * bits / 8, lowest bits first), so
unpacking is one shift and mask per code slot followed by a concatenation, and a key group of G
tokens is one contiguous (G, code_bytes) block. int8 and fp8 hold one code per byte.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

MODES = ("none", "int8", "int4", "int2", "fp8", "mixed")
MIXED = ("int4", "int2")  # the bits of `mixed`: entries that matter most, the others (as ZipCache)
BITS = {"int8": 8, "int4": 4, "int2": 2, "fp8": 8}
META_DTYPE = torch.float16  # scales and minimums: KIVI keeps them in half precision too
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value


RANK_PREFIXES = {"pca": "r", "think": "think"}  # --quant parts giving a rank, by how keys are held (`key_basis`)
READERS = ("quest", "centroid")  # --quant parts naming how pages are chosen and what fraction is read
GROUP = 32  # tokens per key group, channels per value group, unless a label says `g16` or --quant-group


def _group_part(part: str) -> int | None:
    """The group of a --quant part such as 'g16'; None for another part."""
    return int(part[1:]) if part.startswith("g") and part[1:].isdigit() else None


def _rank_part(part: str) -> tuple[str, int] | None:
    """(key_basis, rank) of a --quant part such as 'r32' or 'think32'; None for another part."""
    for basis, prefix in RANK_PREFIXES.items():
        digits = part[len(prefix) :]
        if part.startswith(prefix) and digits.isdigit():
            return basis, int(digits)
    return None


def _read_part(part: str) -> tuple[str, float] | None:
    """(reader, fraction) of a --quant part such as 'quest0.125'; None for another part; a
    one-line error for a reader without a number."""
    reader = next((r for r in READERS if part.startswith(r)), None)
    if reader is None:
        return None
    try:
        return reader, float(part[len(reader) :])
    except ValueError:
        raise ValueError(
            f"--quant part {part!r}: {reader} takes the fraction of pages a decoding step reads, e.g. {reader}0.125"
        ) from None


@dataclass(frozen=True)
class QuantSpec:
    """How kept entries are held: `mode` (see MODES), `group` (tokens per key group, channels per
    value group), `residual` (recent entries appended after the prompt, the question and generated
    tokens, kept in full precision beyond a row's open key group) and, for `mixed`, `split`: the
    fraction of entries held in int4 (those the policy scores highest; the others in int2), rounded
    to the nearest fraction with a denominator of at most 8.

    Only a row's open key group (fewer than `group` entries; `mixed`: a batch of groups) has to
    wait in full precision: keys are quantized per channel over a whole group. By default
    (`residual` 0) every entry is quantized as soon as its group is complete. KIVI keeps the last
    128 in full precision (`residual=128`; kvforge's default before): at 2k tokens and ratio 0.75
    that tail was a third of the bytes (what dropping it cost in answers: README, "Quality per
    byte").
    `prompt_residual` keeps that tail on a compressed prompt too (KIVI's prefill); otherwise a
    prompt's entries, judged by its policy, are quantized whole.

    `rank`: each KV head's keys and values are held as `rank` coordinates in the model's
    calibrated basis (`storage/lowrank.py`), themselves held as `mode` says; written `int4/r32`.
    `key_basis` "think": the keys' coordinates are their `rank` channels ThinK's query-driven
    score ranks highest, the others pruned (`calibration/lowrank.py`); written `int4/think32`.

    `read`: not how entries are held but how much of them a decoding step reads: that fraction
    of each row's pages, those whose key summary promises the most attention, `reader` says how
    (`quest`: per-channel key bounds; `centroid`: mean keys; `reading/pages.py`); every entry
    stays held. Written `int4/quest0.125`, `int4/centroid0.125`."""

    mode: str = "none"
    group: int = GROUP
    residual: int = 0
    split: float = 0.25
    prompt_residual: bool = False
    rank: int | None = None
    read: float | None = None
    reader: str = "quest"
    key_basis: str = "pca"

    @classmethod
    def parse(cls, label: str, **options: object) -> QuantSpec:
        """'int4', 'int4/g16' (groups of 16 instead of `options`' group), 'int4/r32' (int4 codes of
        32 coordinates), 'r32' (full-precision coordinates), 'int4/think32' (keys: their 32 best
        channels), with '/quest0.125' (read an eighth of the pages per decoding step) after any of
        them."""
        mode, rank, read, reader, key_basis = "none", None, None, "quest", "pca"
        for part in label.split("/"):
            reading = _read_part(part)
            ranked = _rank_part(part)
            group = _group_part(part)
            if group is not None:
                options = {**options, "group": group}
            elif ranked is not None:
                key_basis, rank = ranked
            elif reading is not None:
                reader, read = reading
            else:
                mode = part
        return cls(mode, rank=rank, read=read, reader=reader, key_basis=key_basis, **options)  # type: ignore[arg-type]

    @property
    def label(self) -> str:
        """How --quant and reports name it (see `parse`); the group only where it is not GROUP and
        entries are quantized, so rows of two groups never share a name."""
        parts = [] if self.mode == "none" and (self.rank is not None or self.read is not None) else [self.mode]
        parts += [f"g{self.group}"] if self.enabled and self.group != GROUP else []
        parts += [f"{RANK_PREFIXES[self.key_basis]}{self.rank}"] if self.rank is not None else []
        parts += [f"{self.reader}{self.read:g}"] if self.read is not None else []
        return "/".join(parts)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--quant: unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        if not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"--quant-group must be a positive integer (tokens/channels per group), got {self.group!r}")
        if not isinstance(self.residual, int) or self.residual < 0:
            raise ValueError(f"--quant-residual must be an integer >= 0 (recent tokens kept in full precision), got {self.residual!r}")
        if not 0 < self.split < 1:
            raise ValueError(f"--quant-split {self.split!r} is outside (0, 1): the fraction of entries held with more bits")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"--quant rank {self.rank!r} must be a whole number >= 1 of coordinates per head, e.g. int4/r32")
        if self.key_basis not in RANK_PREFIXES:
            raise ValueError(f"unknown key basis {self.key_basis!r}; use one of {', '.join(RANK_PREFIXES)}")
        if self.key_basis != "pca" and self.rank is None:
            raise ValueError(f"key basis {self.key_basis!r} keeps `rank` key channels: give a rank, e.g. int4/think32")
        if self.reader not in READERS:
            raise ValueError(f"unknown page reader {self.reader!r}; use one of {', '.join(READERS)}")
        if self.read is not None and not (isinstance(self.read, float) and 0 < self.read < 1):
            raise ValueError(
                f"--quant {self.reader}{self.read!r}: the fraction of pages a decoding step reads must be in (0, 1), "
                f"e.g. int4/{self.reader}0.125; leave it out to read every page"
            )

    @property
    def parts(self) -> list[QuantSpec]:
        """One spec per bit width the entries are held in, most bits first."""
        if self.mode != "mixed":
            return [self]
        return [replace(self, mode=mode) for mode in MIXED]

    @property
    def batch(self) -> tuple[int, int]:
        """(key groups quantized at once per row, how many of them in the first part): `mixed`
        splits each batch by importance, whole groups to each part."""
        if self.mode != "mixed":
            return 1, 1
        k, high = min(((k, h) for k in range(2, 9) for h in range(1, k)), key=lambda kh: (abs(self.split - kh[1] / kh[0]), kh[0]))
        return k, high

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def bits(self) -> int:
        return BITS[self.mode]  # (not for `mixed`: see `parts`)

    @property
    def asymmetric(self) -> bool:
        """Integer modes keep a minimum beside each scale; fp8 only a scale."""
        return self.mode.startswith("int")

    @property
    def meta_fields(self) -> int:
        return 2 if self.asymmetric else 1

    def sealed(self, tail: torch.Tensor, prompt: bool = False) -> torch.Tensor:
        """Entries a seal quantizes out of rows whose full-precision tails hold `tail` entries:
        whole batches of key groups, until fewer than residual + a batch are left (after a
        prompt's compression, fewer than a batch unless `prompt_residual`). Never fewer than
        `sealed(tail)`: admission takes `prompt=True` as the upper bound."""
        batch_tokens = self.batch[0] * self.group
        residual = 0 if prompt and not self.prompt_residual else self.residual
        return ((tail - residual).clamp(min=0) // batch_tokens) * batch_tokens

    @classmethod
    def for_storage(cls, spec: QuantSpec | None, head_dim: int, storage: str) -> QuantSpec:
        """The spec a quantized storage holds entries with (None: int4), checked against head_dim."""
        spec = spec if spec is not None else cls("int4")
        if not spec.enabled:
            raise ValueError(f"{storage} needs a quantization mode other than 'none'")
        spec.check_head_dim(head_dim)
        return spec

    def check_head_dim(self, head_dim: int) -> None:
        if self.rank is not None:
            if self.rank >= head_dim:
                raise ValueError(f"--quant {self.label}: rank {self.rank} keeps nothing out of head_dim {head_dim}; use a rank below {head_dim}")
            head_dim = self.rank  # the codes hold the coordinates
        if not self.enabled:
            return
        if self.mode == "mixed":
            for part in self.parts:
                part.check_head_dim(head_dim)
            return
        if head_dim % self.group:
            divisors = [d for d in range(1, head_dim + 1) if head_dim % d == 0]
            raise ValueError(
                f"--quant-group {self.group} does not divide head_dim {head_dim} (values are quantized in "
                f"groups of channels); use one of {', '.join(map(str, divisors))}"
            )
        if head_dim * self.bits % 8:
            raise ValueError(f"head_dim {head_dim} cannot be packed at {self.bits} bits per code")

    def code_bytes(self, head_dim: int) -> int:
        return head_dim * self.bits // 8


def labelled(name: str, mode: str) -> str:
    """How reports name a row: the policy, then its quantization mode unless it is none."""
    return name if mode == "none" else f"{name} {mode}"


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., dim) uint8 codes below 2**bits -> (..., dim * bits / 8) uint8, the layout above."""
    per = 8 // bits
    if per == 1:
        return codes
    parts = codes.chunk(per, dim=-1)  # part i: channels i*P .. (i+1)*P - 1
    out = parts[0].clone()
    for i, part in enumerate(parts[1:], start=1):
        out |= part << (i * bits)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., P) uint8 -> (..., P * 8 / bits) uint8 codes: the inverse of `pack`."""
    per = 8 // bits
    if per == 1:
        return packed
    mask = (1 << bits) - 1
    return torch.cat([(packed >> (i * bits)) & mask for i in range(per)], dim=-1)


def _scale_min(lo: torch.Tensor, hi: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-precision minimum and scale covering [lo, hi] with `levels` steps; codes are computed
    against these rounded values, so dequantizing reproduces exactly what was encoded."""
    minimum = lo.to(META_DTYPE)
    span = hi - minimum.float()
    scale = (span / levels).to(META_DTYPE)
    scale = torch.where(scale.float() > 0, scale, torch.ones_like(scale))  # a constant group
    return scale, minimum


def _encode(x: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """x, scale, minimum broadcast together -> (..., dim) uint8 codes (not yet packed)."""
    if spec.asymmetric:
        assert minimum is not None
        levels = (1 << spec.bits) - 1
        return ((x.float() - minimum.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)
    return (x.float() / scale.float()).clamp_(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)


def quantize_keys(keys: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """keys (..., G, dim), one group of G tokens -> codes (..., G, code_bytes) uint8 and meta
    (..., fields, dim) float16: per channel over the group's tokens (field 0 scale, 1 minimum)."""
    codes, meta = _quantize(keys, spec, axis=-2)
    return pack(codes, spec.bits), meta


def quantize_values(values: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """values (..., n, dim) -> codes (..., n, code_bytes) uint8 and meta (..., n, fields, dim / group)
    float16: per token over groups of `group` channels."""
    *lead, dim = values.shape
    grouped = values.reshape(*lead, dim // spec.group, spec.group)  # (..., n, groups, group)
    codes, meta = _quantize(grouped, spec, axis=-1)  # meta: (..., n, groups, fields)
    return pack(codes.reshape(*lead, dim), spec.bits), meta.transpose(-1, -2).contiguous()


def _quantize(x: torch.Tensor, spec: QuantSpec, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x with one scale (and minimum) per slice along `axis`; returns uint8 codes of x's
    shape (not packed) and meta with `axis` replaced by the fields (scale, then minimum)."""
    if spec.asymmetric:
        lo, hi = x.float().amin(axis, keepdim=True), x.float().amax(axis, keepdim=True)
        scale, minimum = _scale_min(lo, hi, (1 << spec.bits) - 1)
        codes = _encode(x, scale, minimum, spec)
        meta = torch.cat([scale, minimum], dim=axis)
    else:
        peak = x.float().abs().amax(axis, keepdim=True)
        scale = (peak / FP8_MAX).to(META_DTYPE)
        scale = torch.where(scale.float() > 0, scale, torch.ones_like(scale))
        codes = _encode(x, scale, None, spec)
        meta = scale
    return codes, meta


@functools.cache
def _fp8_table(device: torch.device) -> torch.Tensor:
    """(256,) float32: the value of each e4m3 byte (the NaN byte reads 0; it is never written)."""
    return torch.nan_to_num(torch.arange(256, dtype=torch.uint8, device=device).view(FP8).float())


def code_values(packed: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """(..., code_bytes) uint8 -> (..., dim) float32 code values (integers, or decoded e4m3)."""
    if spec.asymmetric:
        return unpack(packed, spec.bits).float()
    # A table lookup: about twice as fast on CPU as torch's float8 -> float32 conversion.
    return _fp8_table(packed.device)[packed.long()]


def dequantize_keys(packed: torch.Tensor, meta: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """packed (..., G, code_bytes), meta (..., fields, dim) -> keys (..., G, dim) float32."""
    codes = code_values(packed, spec)
    out = codes * meta[..., 0:1, :].float()
    if spec.asymmetric:
        out += meta[..., 1:2, :].float()
    return out


def dequantize_values(packed: torch.Tensor, meta: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """packed (..., n, code_bytes), meta (..., n, fields, groups) -> values (..., n, dim) float32."""
    codes = code_values(packed, spec)
    *lead, dim = codes.shape
    grouped = codes.view(*lead, meta.shape[-1], spec.group)
    out = grouped * meta[..., 0, :, None].float()
    if spec.asymmetric:
        out += meta[..., 1, :, None].float()
    return out.view(*lead, dim)
