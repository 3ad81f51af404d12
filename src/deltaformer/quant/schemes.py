"""Weight quantization schemes: int8 absmax, int8 zero-point, and NF4 with double quantization.

Each scheme turns an fp32 weight ``[out, in]`` into packed tensors and back, a block of output rows at a time,
so a layer can run its product without ever holding the whole fp32 weight (see :mod:`quant.layers`).
The formats follow bitsandbytes bit for bit where it defines them (absmax int8 rows as
``int8_vectorwise_quant``, NF4 as ``quantize_4bit(quant_type="nf4")`` including its double quantization of
the block scales), so the tests can compare packed bytes, not only reconstruction error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import QuantError

#: The 16 NF4 levels (quantiles of N(0, 1) scaled to [-1, 1]; QLoRA, Dettmers et al. 2023, Appendix E).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_levels(device: torch.device | str | None = None) -> Tensor:
    """The NF4 code book as a tensor."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


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


def _nearest(scaled: Tensor, code: Tensor) -> Tensor:
    """Index of the nearest code book entry (code sorted), by bucketing against the midpoints."""
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)


def _check_weight(weight: Tensor) -> None:
    if weight.dim() != 2:
        raise QuantError(f"can only quantize 2-D weights, got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise QuantError("weight holds NaN or inf values: fix the checkpoint before quantizing it")


# ----------------------------------------------------------------------------------------------- int8 absmax
def int8_absmax(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise symmetric int8: ``q = round(w * 127 / absmax_row)``; returns (q int8, absmax fp32 [out])."""
    _check_weight(weight)
    w = weight.float()
    absmax = w.abs().amax(dim=1)
    q = torch.round(w * (127.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q, absmax


def int8_absmax_rows(q: Tensor, absmax: Tensor) -> Tensor:
    """fp32 rows back from :func:`int8_absmax` output (any slice of rows with its absmax)."""
    return q.float() * (absmax / 127.0).unsqueeze(1)


# -------------------------------------------------------------------------------------------- int8 zero-point
def int8_zero_point(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Row-wise asymmetric uint8: ``q = clamp(round(w / scale) + zero, 0, 255)``.

    The range always holds 0 (so 0 stays exact, as padding and pruned weights need); returns
    (q uint8, scale fp32 [out], zero int32 [out]). Same arithmetic as ``torch.quantize_per_channel``.
    """
    _check_weight(weight)
    w = weight.float()
    low = w.amin(dim=1).clamp(max=0.0)
    high = w.amax(dim=1).clamp(min=0.0)
    scale = ((high - low) / 255.0).clamp(min=1e-8)
    zero = (-torch.round(low / scale)).clamp(0, 255).to(torch.int32)
    q = (torch.round(w / scale.unsqueeze(1)) + zero.unsqueeze(1)).clamp(0, 255).to(torch.uint8)
    return q, scale, zero


def int8_zero_point_rows(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """fp32 rows back from :func:`int8_zero_point` output."""
    return (q.to(torch.int32) - zero.unsqueeze(1)).float() * scale.unsqueeze(1)


# ---------------------------------------------------------------------------------------------------- NF4
@dataclass
class NF4Weight:
    """NF4 blocks of one weight: ``packed`` uint8 [out*in/2] (two codes a byte, first in the high nibble).

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

    def scales(self) -> Tensor:
        """fp32 scale of every block (undoing double quantization if used)."""
        if self.absmax is not None:
            return self.absmax
        assert self.absmax_codes is not None and self.absmax_scale is not None
        code = dynamic_map(self.absmax_codes.device)
        values = code[self.absmax_codes.long()]
        n = values.numel()
        scale = self.absmax_scale.repeat_interleave(self.group)[:n]
        return values * scale + self.offset

    def rows(self, start: int, stop: int, scales: Tensor | None = None) -> Tensor:
        """fp32 rows ``start:stop`` only (the blocks never straddle rows: ``in`` is a multiple of blocksize)."""
        cols = self.shape[1]
        packed = self.packed[start * cols // 2: stop * cols // 2]
        codes = torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1).long()
        values = nf4_levels(packed.device)[codes].view(-1, self.blocksize)
        s = (self.scales() if scales is None else scales)[start * cols // self.blocksize: stop * cols // self.blocksize]
        return (values * s.unsqueeze(1)).view(stop - start, cols)


def _blockwise_8bit(values: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """Blocks of ``group`` values as codes into :func:`dynamic_map` and one absmax per block.

    Full blocks scale by the reciprocal, the short last block divides (bitsandbytes' order, for equal codes).
    """
    n = values.numel()
    full = n - n % group
    blocks = values[:full].view(-1, group)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if full < n:
        last = values[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.unsqueeze(0)])
        scaled = torch.cat([scaled, (values[full:] / last).clamp(-1, 1)])
    return _nearest(scaled, dynamic_map(values.device)), absmax


def nf4(weight: Tensor, blocksize: int = 64, double_quant: bool = True, group: int = 256) -> NF4Weight:
    """NF4 in blocks of ``blocksize`` consecutive weights of a row, absmax-scaled; optional double quant."""
    _check_weight(weight)
    out_features, in_features = weight.shape
    if blocksize <= 0 or in_features % blocksize:
        raise QuantError(
            f"NF4 needs in_features ({in_features}) to be a multiple of the block size ({blocksize}): "
            "choose a block size that divides it (e.g. 32 or 64) or leave this layer unquantized")
    blocks = weight.float().reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    codes = _nearest(scaled, nf4_levels(weight.device))
    packed = (codes[0::2] << 4) | codes[1::2]
    shape = (out_features, in_features)
    if not double_quant:
        return NF4Weight(packed, shape, blocksize, absmax=absmax)
    offset = absmax.mean()
    absmax_codes, absmax_scale = _blockwise_8bit(absmax - offset, group)
    return NF4Weight(packed, shape, blocksize, absmax_codes=absmax_codes, absmax_scale=absmax_scale,
                     offset=float(offset), group=group)
