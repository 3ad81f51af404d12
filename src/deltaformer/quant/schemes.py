"""Weight quantization schemes: int8 absmax and zero-point (per tensor, channel or group), NF4 and FP4 with
double quantization.

Each scheme turns an fp32 weight ``[out, in]`` into packed tensors and back, a block of output rows at a time,
so a layer can run its product without ever holding the whole fp32 weight (see :mod:`quant.layers`).
The formats follow bitsandbytes bit for bit where it defines them (absmax int8 rows as
``int8_vectorwise_quant``, NF4/FP4 as ``quantize_4bit(quant_type=...)`` including its double quantization of
the block scales, which its CPU build rounds through a 65536-entry lookup table that :func:`quantize_blockwise_8bit`
reproduces), so the tests can compare packed bytes, not only reconstruction error.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from ..errors import QuantError

#: The 16 NF4 levels (quantiles of N(0, 1) scaled to [-1, 1]; QLoRA, Dettmers et al. 2023, Appendix E).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


#: The 16 FP4 levels (1 sign, 2 exponent, 1 mantissa bits, scaled to [-1, 1]) in bitsandbytes' code order:
#: code ``c`` has sign bit ``c & 8``; codes 0 and 8 are both zero.
FP4_LEVELS = tuple(v / 12.0 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                                     0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0))
FOUR_BIT_KINDS = ("nf4", "fp4")
GRANULARITIES = ("tensor", "channel", "group")


def nf4_levels(device: torch.device | str | None = None) -> Tensor:
    """The NF4 code book as a tensor."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def fp4_levels(device: torch.device | str | None = None) -> Tensor:
    """The FP4 code book as a tensor (index = 4-bit code; not sorted)."""
    return torch.tensor(FP4_LEVELS, dtype=torch.float32, device=device)


def four_bit_levels(kind: str, device: torch.device | str | None = None) -> Tensor:
    """The code book of a 4-bit kind ("nf4" or "fp4")."""
    if kind not in FOUR_BIT_KINDS:
        raise QuantError(f"unknown 4-bit type {kind!r}: choose one of {', '.join(FOUR_BIT_KINDS)}")
    return nf4_levels(device) if kind == "nf4" else fp4_levels(device)


def dynamic_map(device: torch.device | str | None = None) -> Tensor:
    """The signed 8-bit "dynamic" code book (exponent + fraction) that double quantization stores scales in.

    Same construction as bitsandbytes' ``create_dynamic_map(signed=True)``: 7 decades of linearly spaced
    fractions, so small scales keep relative precision.
    """
    values: list[float] = []
    for i in range(7):
        items = 2 ** i + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0)
        values += ((10 ** (-6 + i)) * means).tolist()
        values += (-(10 ** (-6 + i)) * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32, device=device)


def _check_weight(weight: Tensor) -> None:
    if weight.dim() != 2:
        raise QuantError(f"can only quantize 2-D weights, got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise QuantError("weight holds NaN or inf values: fix the checkpoint before quantizing it")


def _check_granularity(weight: Tensor, granularity: str, group_size: int) -> None:
    if granularity not in GRANULARITIES:
        raise QuantError(f"unknown granularity {granularity!r}: choose one of {', '.join(GRANULARITIES)}")
    if granularity == "group" and (group_size <= 0 or weight.shape[1] % group_size):
        raise QuantError(
            f"per-group quantization needs in_features ({weight.shape[1]}) to be a multiple of the group size "
            f"({group_size}): choose a group size that divides it, or quantize per channel")


def _groups(w: Tensor, granularity: str, group_size: int) -> Tensor:
    """``w`` viewed so the last dimension is one scale's span: [1, n], [out, in] or [out, in/g, g]."""
    if granularity == "tensor":
        return w.reshape(1, -1)
    if granularity == "channel":
        return w
    return w.reshape(w.shape[0], -1, group_size)


def _apply_scale(values: Tensor, scale: Tensor) -> Tensor:
    """``values`` [rows, in] times a scale of one of the three layouts (shape [1], [rows] or [rows, groups])."""
    if scale.dim() == 2:
        rows, cols = values.shape
        return (values.view(rows, scale.shape[1], -1) * scale.unsqueeze(2)).view(rows, cols)
    return values * scale.unsqueeze(1) if scale.numel() == values.shape[0] else values * scale


# ----------------------------------------------------------------------------------------------- int8 absmax
def int8_absmax(weight: Tensor, granularity: str = "channel", group_size: int = 128) -> tuple[Tensor, Tensor]:
    """Symmetric int8: ``q = round(w * 127 / absmax)``; returns (q int8 [out, in], absmax fp32).

    ``absmax`` is per tensor (shape [1]), per output channel ([out], bitsandbytes' ``int8_vectorwise_quant``)
    or per group of ``group_size`` consecutive inputs of a row ([out, in / group_size]).
    """
    _check_weight(weight)
    _check_granularity(weight, granularity, group_size)
    w = _groups(weight.float(), granularity, group_size)
    absmax = w.abs().amax(dim=-1)
    q = torch.round(w * (127.0 / absmax.clamp(min=1e-38)).unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q.reshape(weight.shape), absmax


def int8_absmax_rows(q: Tensor, absmax: Tensor) -> Tensor:
    """fp32 rows back from :func:`int8_absmax` output (any slice of rows with its slice of absmax)."""
    return _apply_scale(q.float(), absmax / 127.0)


# -------------------------------------------------------------------------------------------- int8 zero-point
def int8_zero_point(weight: Tensor, granularity: str = "channel",
                    group_size: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric uint8: ``q = clamp(round(w / scale) + zero, 0, 255)``, per tensor, channel or group.

    The range always holds 0 (so 0 stays exact, as padding and pruned weights need); returns
    (q uint8 [out, in], scale fp32, zero int32), scale and zero shaped as :func:`int8_absmax`'s absmax.
    Same arithmetic as ``torch.quantize_per_tensor`` / ``torch.quantize_per_channel``.
    """
    _check_weight(weight)
    _check_granularity(weight, granularity, group_size)
    w = _groups(weight.float(), granularity, group_size)
    low = w.amin(dim=-1).clamp(max=0.0)
    high = w.amax(dim=-1).clamp(min=0.0)
    scale = ((high - low) / 255.0).clamp(min=1e-8)
    zero = (-torch.round(low / scale)).clamp(0, 255).to(torch.int32)
    q = (torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, 255).to(torch.uint8)
    return q.reshape(weight.shape), scale, zero


def int8_zero_point_rows(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """fp32 rows back from :func:`int8_zero_point` output."""
    if scale.dim() == 2:
        rows, cols = q.shape
        g = q.view(rows, scale.shape[1], -1).to(torch.int32)
        return ((g - zero.unsqueeze(2)).float() * scale.unsqueeze(2)).view(rows, cols)
    if scale.numel() == q.shape[0]:
        return (q.to(torch.int32) - zero.unsqueeze(1)).float() * scale.unsqueeze(1)
    return (q.to(torch.int32) - zero).float() * scale


# ----------------------------------------------------------------------------------------------- NF4 / FP4
@dataclass
class NF4Weight:
    """4-bit blocks of one weight: ``packed`` uint8 [out*cols/2] (two codes a byte, first in the high nibble).

    ``kind`` is "nf4" or "fp4" (the code book). ``cols`` is the stored row width: ``in_features``, or the next
    multiple of ``blocksize`` when rows were zero-padded (``pad=True``); ``shape`` stays the logical [out, in].
    Scales are either fp32 ``absmax`` per block, or (double quantization) 8-bit codes ``absmax_codes`` into
    :func:`dynamic_map`, scaled per group of ``group`` blocks by ``absmax_scale`` and shifted by ``offset``.
    """

    packed: Tensor
    shape: tuple[int, int]
    blocksize: int
    absmax: Tensor | None = None
    absmax_codes: Tensor | None = None
    absmax_scale: Tensor | None = None
    offset: float = 0.0
    group: int = 256
    kind: str = "nf4"
    cols: int = 0

    def __post_init__(self) -> None:
        if not self.cols:
            self.cols = self.shape[1]

    def scales(self) -> Tensor:
        """fp32 scale of every block (undoing double quantization if used)."""
        if self.absmax is not None:
            return self.absmax
        assert self.absmax_codes is not None and self.absmax_scale is not None
        return dequantize_blockwise_8bit(self.absmax_codes, self.absmax_scale, self.group) + self.offset

    def rows(self, start: int, stop: int, scales: Tensor | None = None) -> Tensor:
        """fp32 rows ``start:stop`` only (the blocks never straddle rows: ``cols`` is a multiple of blocksize)."""
        cols = self.cols
        packed = self.packed[start * cols // 2: stop * cols // 2]
        codes = torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1).long()
        values = four_bit_levels(self.kind, packed.device)[codes].view(-1, self.blocksize)
        s = (self.scales() if scales is None else scales)[start * cols // self.blocksize: stop * cols // self.blocksize]
        out = (values * s.unsqueeze(1)).view(stop - start, cols)
        return out if cols == self.shape[1] else out[:, :self.shape[1]]


#: The 4-bit weight of either kind (the class keeps its first name for existing callers).
FourBitWeight = NF4Weight

_LUT_SIZE = 65536


@lru_cache(maxsize=4)
def _dynamic_lut(device: str) -> Tensor:
    """bitsandbytes' CPU lookup table: 65536 evenly spaced values in [-1, 1] -> nearest :func:`dynamic_map` code.

    Entry ``i`` holds the number of code midpoints below ``-1 + 2 i / 65535`` (the code index whose bucket holds
    it), all in fp32 as its C++ builds it.
    """
    code = dynamic_map(device)
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device=device)) / float(_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, grid).to(torch.uint8)


def quantize_blockwise_8bit(values: Tensor, group: int = 256) -> tuple[Tensor, Tensor]:
    """Blocks of ``group`` values (the last may be short) as 8-bit codes into :func:`dynamic_map`, one absmax each.

    The same arithmetic as bitsandbytes' CPU ``quantize_blockwise`` (what double quantization calls): scale by the
    fp32 reciprocal of the block's absmax, map ``[-1, 1]`` onto 65536 buckets (round half up) and look the code
    up in :func:`_dynamic_lut`, so codes are equal bit for bit, near-ties included. An all-zero block gets code 0.
    """
    flat = values.reshape(-1).float()
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, -n % group)).view(-1, group)
    absmax = padded.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = (padded * inv.unsqueeze(1)).clamp(-1.0, 1.0)
    index = ((scaled + 1.0) * 0.5 * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)
    codes = _dynamic_lut(str(flat.device))[index]
    codes = torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(codes), codes)
    return codes.reshape(-1)[:n], absmax


def dequantize_blockwise_8bit(codes: Tensor, absmax: Tensor, group: int = 256) -> Tensor:
    """Values back from :func:`quantize_blockwise_8bit`: ``dynamic_map[code] * absmax`` of its block."""
    values = dynamic_map(codes.device)[codes.long()]
    return values * absmax.repeat_interleave(group)[:values.numel()]


def _check_block(in_features: int, blocksize: int, pad: bool, kind: str) -> int:
    if blocksize <= 0 or blocksize % 2:
        raise QuantError(f"{kind.upper()} block size must be a positive even number, got {blocksize}")
    if in_features % blocksize and not pad:
        raise QuantError(
            f"{kind.upper()} needs in_features ({in_features}) to be a multiple of the block size ({blocksize}): "
            "choose a block size that divides it (e.g. 32 or 64), pass pad=True to zero-pad each row, "
            "or leave this layer unquantized")
    return in_features + (-in_features % blocksize)


def four_bit(weight: Tensor, kind: str = "nf4", blocksize: int = 64, double_quant: bool = True,
             group: int = 256, pad: bool = False) -> NF4Weight:
    """NF4 or FP4 in blocks of ``blocksize`` consecutive weights of a row, absmax-scaled; optional double quant.

    bitsandbytes' ``quantize_4bit`` on CPU, bit for bit: block absmax, values times its fp32 reciprocal clamped to
    [-1, 1], nearest level by the midpoints of the sorted code book. Double quantization stores the block absmaxes
    minus their mean as :func:`quantize_blockwise_8bit` codes in groups of ``group``. A row width that is not a
    multiple of ``blocksize`` is refused unless ``pad`` (rows zero-padded to whole blocks; zero is exact in both
    code books, so the padding never changes a block's scale or the product).
    """
    _check_weight(weight)
    levels = four_bit_levels(kind, weight.device)
    out_features, in_features = weight.shape
    cols = _check_block(in_features, blocksize, pad, kind)
    w = weight.float()
    if cols != in_features:
        w = torch.nn.functional.pad(w, (0, cols - in_features))
    blocks = w.reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    order = torch.argsort(levels)
    sorted_levels = levels[order]
    codes = order[torch.bucketize(scaled, (sorted_levels[:-1] + sorted_levels[1:]) / 2, out_int32=True)]
    codes = codes.to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    shape = (out_features, in_features)
    if not double_quant:
        return NF4Weight(packed, shape, blocksize, absmax=absmax, kind=kind, cols=cols)
    offset = absmax.mean()
    absmax_codes, absmax_scale = quantize_blockwise_8bit(absmax - offset, group)
    return NF4Weight(packed, shape, blocksize, absmax_codes=absmax_codes, absmax_scale=absmax_scale,
                     offset=float(offset), group=group, kind=kind, cols=cols)


def nf4(weight: Tensor, blocksize: int = 64, double_quant: bool = True, group: int = 256,
        pad: bool = False) -> NF4Weight:
    """NF4 blocks (QLoRA's 4-bit normal float); see :func:`four_bit`."""
    return four_bit(weight, "nf4", blocksize, double_quant, group, pad)


def fp4(weight: Tensor, blocksize: int = 64, double_quant: bool = True, group: int = 256,
        pad: bool = False) -> NF4Weight:
    """FP4 blocks (bitsandbytes' e2m1 4-bit float); see :func:`four_bit`."""
    return four_bit(weight, "fp4", blocksize, double_quant, group, pad)


# ------------------------------------------------------------------------------------------------ int4 affine
def int4_affine(weight: Tensor, group_size: int = 64, pad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 4-bit per group of ``group_size`` inputs of a row: ``w = (code - 8) * scale + zero``.

    torch's int4 weight-only kernels use this form (``zero`` is the value of code 8). Scale and zero are kept
    in bf16 (what those kernels read); codes are rounded against the stored bf16 values, so dequantizing them
    gives the nearest representable weight. Returns (codes uint8 [out, cols] in 0..15, scale bf16
    [out, groups], zero bf16 [out, groups]); ``cols`` is ``in_features`` or, with ``pad``, the next multiple
    of ``group_size`` (zero columns), otherwise a width that does not fit is refused.
    """
    _check_weight(weight)
    out_features, in_features = weight.shape
    cols = _check_block(in_features, group_size, pad, "int4")
    w = weight.float()
    if cols != in_features:
        w = torch.nn.functional.pad(w, (0, cols - in_features))
    g = w.view(out_features, cols // group_size, group_size)
    low, high = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((high - low) / 15.0).clamp(min=1e-6).to(torch.bfloat16)
    zero = (low + 8.0 * scale.float()).to(torch.bfloat16)
    codes = torch.round((g - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)) + 8.0
    return codes.clamp_(0, 15).to(torch.uint8).view(out_features, cols), scale, zero


def int4_affine_rows(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """fp32 rows back from :func:`int4_affine` output (codes [rows, cols], scale / zero [rows, groups])."""
    rows, cols = codes.shape
    g = codes.view(rows, scale.shape[1], -1).float() - 8.0
    return (g * scale.float().unsqueeze(2) + zero.float().unsqueeze(2)).view(rows, cols)
