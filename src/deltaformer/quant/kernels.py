"""Fused low-bit products from torch's own kernels, each with a plain fallback that gives the same numbers.

- int8 weight-only: ``torch.ops.aten._weight_int8pack_mm`` (CPU; bf16 activations, fp32 accumulation);
- int4 weight-only: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on weights stored in that kernel's layout
  (:func:`pack_int4`, byte for byte what ``_convert_weight_to_int4pack_for_cpu`` makes; checked once at run time);
- W8A8: activations quantized per token (absmax, int8) and ``torch._int_mm`` (int8 x int8 -> int32, the CPU's
  VNNI dot-product instructions where present) rescaled by both absmaxes; without ``_int_mm`` the same integers
  come from an int32 matmul, so the result is identical.

The weight-only kernels run in bf16 (torch's CPU kernels are vectorised for it; their fp32 variants are scalar and
slower than an fp32 GEMM), so their output equals the blockwise fp32 product of the bf16-rounded input up to
bf16 rounding of the output. Layers pick a kernel only on CPU and without autograd (see :mod:`quant.layers`).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

#: Rows of one int4 tile in the CPU kernel's layout (two rows share a byte: row r and r + 32 of a tile).
INT4_TILE = 64
INT4_GROUP_SIZES = (32, 64, 128, 256)
#: Rows quantized per step of the W8A8 activation quantization (keeps its passes in cache).
_TOKEN_CHUNK = 512


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


@lru_cache(maxsize=1)
def has_int8_weight_only() -> bool:
    """Whether ``_weight_int8pack_mm`` runs on CPU here (checked on a tiny product)."""
    if not _has_op("_weight_int8pack_mm"):
        return False
    try:
        # (tiny shapes crash some builds' kernel outright, so the probe uses a layer-like 64 x 64)
        q = torch.ones(64, 64, dtype=torch.int8)
        y = torch.ops.aten._weight_int8pack_mm(torch.ones(1, 64, dtype=torch.bfloat16), q,
                                               torch.ones(64, dtype=torch.bfloat16))
        return bool(torch.equal(y.float(), torch.full((1, 64), 64.0)))
    except RuntimeError:
        return False


@lru_cache(maxsize=1)
def has_int4_weight_only() -> bool:
    """Whether the CPU int4 kernel is here and its weight layout is the one :func:`pack_int4` writes."""
    if not (_has_op("_weight_int4pack_mm_for_cpu") and _has_op("_convert_weight_to_int4pack_for_cpu")):
        return False
    try:
        codes = (torch.arange(INT4_TILE * 2 * 64, dtype=torch.int32).view(INT4_TILE * 2, 64) * 7) % 16
        theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        return bool(torch.equal(theirs.reshape(-1), pack_int4(codes.to(torch.uint8))))
    except RuntimeError:
        return False


@lru_cache(maxsize=1)
def has_int_mm() -> bool:
    """Whether ``torch._int_mm`` (int8 x int8 -> int32) runs on CPU here."""
    try:
        a, b = torch.ones(1, 64, dtype=torch.int8), torch.ones(64, 64, dtype=torch.int8)
        return bool(torch.equal(torch._int_mm(a, b.t()), torch.full((1, 64), 64, dtype=torch.int32)))
    except (RuntimeError, AttributeError):
        return False


# -------------------------------------------------------------------------------------------------- int8
def int8_weight_only(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """``x @ (q * scale[:, None])^T`` with ``_weight_int8pack_mm`` in bf16; returns ``x``'s dtype."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    y = torch.ops.aten._weight_int8pack_mm(flat, q, scale.to(torch.bfloat16))
    return y.to(x.dtype).reshape(*x.shape[:-1], q.shape[0])


# -------------------------------------------------------------------------------------------------- int4
def pack_int4(codes: Tensor) -> Tensor:
    """Codes 0..15 ``[N, K]`` (N a multiple of :data:`INT4_TILE`) in the CPU int4 kernel's layout, flat uint8.

    Per tile of 64 rows, per input column k, 32 bytes: byte j holds row j of the tile (low nibble) and row
    j + 32 (high nibble).
    """
    n, k = codes.shape
    tiles = codes.to(torch.uint8).view(n // INT4_TILE, 2, INT4_TILE // 2, k)  # [tile, half, j, k]
    return ((tiles[:, 1] << 4) | tiles[:, 0]).transpose(1, 2).reshape(-1)


def unpack_int4_rows(packed: Tensor, k: int, start: int, stop: int) -> Tensor:
    """Codes of rows ``start:stop`` (int64 ``[stop - start, k]``) from :func:`pack_int4` output."""
    first, last = start // INT4_TILE, -(-stop // INT4_TILE)
    tile_bytes = k * INT4_TILE // 2
    tiles = packed[first * tile_bytes: last * tile_bytes].view(last - first, k, INT4_TILE // 2)
    lo, hi = (tiles & 0xF), (tiles >> 4)
    rows = torch.stack((lo, hi), dim=1).permute(0, 1, 3, 2).reshape(-1, k)  # [tile * 64, k]
    return rows[start - first * INT4_TILE: stop - first * INT4_TILE].long()


def int4_weight_only(x: Tensor, packed: Tensor, n: int, k: int, group_size: int, scale_zero: Tensor) -> Tensor:
    """``x @ W^T`` for ``W = (code - 8) * scale + zero`` per group, by ``_weight_int4pack_mm_for_cpu`` in bf16.

    ``packed`` is :func:`pack_int4` output for ``n`` rows (a multiple of 64) and ``k`` columns;
    ``scale_zero`` is ``[k / group_size, n, 2]``. ``x`` may be narrower than ``k`` (zero-padded columns).
    """
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    if flat.shape[1] != k:
        flat = torch.nn.functional.pad(flat, (0, k - flat.shape[1]))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed.view(n, k // 2), group_size,
                                                   scale_zero.to(torch.bfloat16))
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


# -------------------------------------------------------------------------------------------------- W8A8
def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``x`` ``[M, K]`` as int8 with their absmax: ``q = round(x * 127 / absmax_row)``."""
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    absmax = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for a in range(0, x.shape[0], _TOKEN_CHUNK):
        part = x[a:a + _TOKEN_CHUNK].float()
        m = part.abs().amax(dim=1).clamp(min=1e-38)
        absmax[a:a + _TOKEN_CHUNK] = m
        q[a:a + _TOKEN_CHUNK] = torch.round(part * (127.0 / m).unsqueeze(1)).clamp_(-127, 127)
    return q, absmax


def int8_matmul(a: Tensor, b_t: Tensor) -> Tensor:
    """int8 ``a [M, K]`` times int8 ``b_t [N, K]`` transposed, exact int32 ``[M, N]`` (``_int_mm`` where it runs)."""
    if a.device.type == "cpu" and has_int_mm():
        return torch._int_mm(a, b_t.t())
    return a.to(torch.int32) @ b_t.to(torch.int32).t()


def w8a8(x: Tensor, q: Tensor, absmax: Tensor) -> Tensor:
    """``x @ W^T`` with W int8 per output row (``absmax``) and ``x`` quantized per token on the fly."""
    flat = x.reshape(-1, x.shape[-1])
    xq, xmax = quantize_per_token(flat)
    acc = int8_matmul(xq, q)
    y = acc.float().mul_(xmax.unsqueeze(1) * (1.0 / (127.0 * 127.0))).mul_(absmax.unsqueeze(0))
    return y.to(x.dtype).reshape(*x.shape[:-1], q.shape[0])
