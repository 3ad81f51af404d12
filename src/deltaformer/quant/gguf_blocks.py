"""GGUF's block formats (ggml's ``Q*_0``, ``Q*_1`` and K-quants) unpacked to float32 tensors in torch.

A GGUF tensor of a quantized type is a run of fixed-size blocks; each block holds ``block_size`` weights as
small integers plus one or more float16 scales (and minimums). Unpacking runs in torch on whatever device the
bytes are on, vectorised over all blocks, and performs the same float32 operations in the same order as
``gguf.quants`` (the reference the tests compare against bit for bit): a scale is widened from float16 to
float32, multiplied by the integer, and a minimum subtracted (``d * q - m``) or added (``d * q + m``) last.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import Tensor

from ..errors import CheckpointError

QK_K = 256  # weights per K-quant super-block
#: Weights unpacked per step of :func:`dequantize` on CPU: 128 KiB of fp32 output, at torch's intra-op grain
#: size, so each step's small ops run on one thread (on 2 busy cores, 1M-weight steps that each woke the
#: thread pool took 10-20x the CPU time). Other devices unpack :data:`DEVICE_CHUNK_WEIGHTS` at a time.
CHUNK_WEIGHTS = 1 << 15
DEVICE_CHUNK_WEIGHTS = 1 << 24


def _f16(blocks: Tensor, start: int, stop: int) -> Tensor:
    """Bytes ``start:stop`` of every block read as float16 and widened: (n_blocks, (stop - start) // 2)."""
    return blocks[:, start:stop].contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor, width: int) -> Tensor:
    """Low nibbles of each ``width``-byte group first, then the high nibbles: (n, groups, 2 * width)."""
    grouped = qs.reshape(qs.shape[0], -1, width)
    return torch.stack([grouped & 0x0F, grouped >> 4], dim=2).reshape(qs.shape[0], -1, 2 * width)


def _bits(packed: Tensor, shifts: int, mask: int, width: int) -> Tensor:
    """Every ``shifts``-bit field of the bytes, masked: each ``width``-byte group shifted right by 0, ``shifts``,
    2 * ``shifts``, ... (low field first), giving (n, groups, (8 // shifts) * width)."""
    n = packed.shape[0]
    grouped = packed.reshape(n, -1, 1, width)
    shift = torch.arange(0, 8, shifts, dtype=torch.uint8, device=packed.device).view(1, 1, -1, 1)
    return ((grouped >> shift) & mask).reshape(n, -1, (8 // shifts) * width)


def _q4_0(b: Tensor) -> Tensor:
    d = _f16(b, 0, 2)
    q = _nibbles(b[:, 2:], 16).reshape(b.shape[0], 32).to(torch.int8) - 8
    return d * q.float()


def _q4_1(b: Tensor) -> Tensor:
    d, m = _f16(b, 0, 2), _f16(b, 2, 4)
    q = _nibbles(b[:, 4:], 16).reshape(b.shape[0], 32).float()
    return d * q + m


def _high_bits_32(qh: Tensor) -> Tensor:
    """The 32 one-bit fields of a little-endian uint32 (four bytes), bit 0 first: (n, 32) uint8."""
    return _bits(qh, 1, 1, 1).reshape(qh.shape[0], 4, 8).reshape(qh.shape[0], 32)


def _q5_0(b: Tensor) -> Tensor:
    d = _f16(b, 0, 2)
    low = _nibbles(b[:, 6:], 16).reshape(b.shape[0], 32)
    q = (low | (_high_bits_32(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return d * q.float()


def _q5_1(b: Tensor) -> Tensor:
    d, m = _f16(b, 0, 2), _f16(b, 2, 4)
    low = _nibbles(b[:, 8:], 16).reshape(b.shape[0], 32)
    q = (low | (_high_bits_32(b[:, 4:8]) << 4)).float()
    return d * q + m


def _q8_0(b: Tensor) -> Tensor:
    d = _f16(b, 0, 2)
    return b[:, 2:].contiguous().view(torch.int8).float() * d


def _k_scale_min(b: Tensor) -> tuple[Tensor, Tensor]:
    """Per 32-weight sub-block of a Q4_K/Q5_K super-block: ``d * scale`` and ``dmin * min``, (n, 8, 1) each."""
    n = b.shape[0]
    d, dmin = _f16(b, 0, 2), _f16(b, 2, 4)
    sc, mn = _k_scales(b[:, 4:16])
    return (d * sc.float()).reshape(n, -1, 1), (dmin * mn.float()).reshape(n, -1, 1)


def _k_scales(scales: Tensor) -> tuple[Tensor, Tensor]:
    """The eight 6-bit scales and minimums of a Q4_K/Q5_K super-block, from its 12 packed bytes."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b, 80, 82), _f16(b, 82, 84)
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs, 2, 3, 32).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108, 110)
    low = _bits(scales[:, :8], 4, 0x0F, 8).reshape(n, 16)
    high = _bits(scales[:, 8:], 2, 0x03, 4).reshape(n, 16)
    sc = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * sc).reshape(n, 16, 1)
    ql = _bits(qs, 2, 3, 32).reshape(n, 16, 16)
    qh = _bits(hmask, 1, 1, 32).reshape(n, 16, 16) ^ 1  # a set bit means no offset
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scale, minimum = _k_scale_min(b)
    q = _nibbles(b[:, 16:], 32).reshape(n, -1, 32).float()
    return (scale * q - minimum).reshape(n, QK_K)


def _q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scale, minimum = _k_scale_min(b)
    low = _nibbles(b[:, 48:], 32).reshape(n, -1, 32)
    high = _bits(b[:, 16:48], 1, 1, 32).reshape(n, -1, 32)
    q = (low | (high << 4)).float()
    return (scale * q - minimum).reshape(n, QK_K)


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(b, 208, 210)
    scale = (d * scales).reshape(n, 16, 1)
    low = _nibbles(ql, 64).reshape(n, -1, 32)
    high = _bits(qh, 2, 3, 32).reshape(n, -1, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, -1).float()
    return (scale * q).reshape(n, QK_K)


def _bf16(b: Tensor) -> Tensor:
    return (b.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


_BLOCK_DECODERS: dict[GGMLQuantizationType, Callable[[Tensor], Tensor]] = {
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q5_0: _q5_0,
    GGMLQuantizationType.Q5_1: _q5_1,
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q2_K: _q2_k,
    GGMLQuantizationType.Q3_K: _q3_k,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q5_K: _q5_k,
    GGMLQuantizationType.Q6_K: _q6_k,
    GGMLQuantizationType.BF16: _bf16,
}

#: Every tensor type :func:`dequantize` reads (F32 and F16 are plain arrays).
SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *_BLOCK_DECODERS})


def as_type(kind: GGMLQuantizationType | int | str) -> GGMLQuantizationType:
    """A GGML tensor type from its enum, number or name (``"Q4_1"``); a clear error for anything else."""
    try:
        if isinstance(kind, str):
            return GGMLQuantizationType[kind.upper()]
        return GGMLQuantizationType(int(kind))
    except (KeyError, ValueError):
        names = ", ".join(t.name for t in sorted(SUPPORTED_TYPES))
        raise CheckpointError(f"unknown GGUF tensor type {kind!r}: deltaformer reads {names}") from None


def dequantize(raw: Tensor | np.ndarray | bytes, kind: GGMLQuantizationType | int | str,
               shape: tuple[int, ...], out: Tensor | None = None) -> Tensor:
    """The float32 tensor of logical ``shape`` (rows, columns in torch order) stored as ``raw`` bytes of ``kind``.

    ``raw`` may be a uint8 tensor (on any device; unpacking runs there), a numpy array (a read-only view of a
    memory-mapped file is copied once, as torch needs writable memory) or ``bytes``. Blocks are unpacked
    :data:`CHUNK_WEIGHTS` weights at a time (on CPU), so the temporaries stay small beside the result; ``out`` (a
    contiguous float32 tensor of ``shape``) receives the result instead of a new tensor.
    """
    qtype = as_type(kind)
    if qtype not in SUPPORTED_TYPES:
        names = ", ".join(t.name for t in sorted(SUPPORTED_TYPES))
        raise CheckpointError(f"GGUF tensor type {qtype.name} is not supported: deltaformer reads {names}; "
                              "re-quantize the file to one of them (llama.cpp's llama-quantize)")
    data = _as_bytes(raw)
    count = int(np.prod(shape)) if shape else 1
    block, size = GGML_QUANT_SIZES[qtype]
    if count % block or data.numel() != count // block * size:
        raise CheckpointError(f"GGUF tensor of type {qtype.name} and shape {tuple(shape)} needs "
                              f"{count // block * size} bytes, found {data.numel()}: the file is truncated or corrupt")
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=data.device)
    elif out.dtype != torch.float32 or tuple(out.shape) != tuple(shape) or not out.is_contiguous():
        raise CheckpointError(f"cannot unpack a GGUF tensor of shape {tuple(shape)} into a {out.dtype} tensor of "
                              f"shape {tuple(out.shape)}")
    flat = out.view(-1, block)
    blocks = data.reshape(-1, size)
    step = max(1, (CHUNK_WEIGHTS if data.device.type == "cpu" else DEVICE_CHUNK_WEIGHTS) // block)
    for a in range(0, blocks.shape[0], step):
        flat[a:a + step] = _unpack(qtype, blocks[a:a + step]).reshape(-1, block)
    return out


def _unpack(qtype: GGMLQuantizationType, blocks: Tensor) -> Tensor:
    if qtype == GGMLQuantizationType.F32:
        return blocks.contiguous().view(torch.float32)
    if qtype == GGMLQuantizationType.F16:
        return blocks.contiguous().view(torch.float16).float()
    return _BLOCK_DECODERS[qtype](blocks)


def _as_bytes(raw: Tensor | np.ndarray | bytes) -> Tensor:
    if isinstance(raw, Tensor):
        return raw.reshape(-1).view(torch.uint8)
    if isinstance(raw, bytes | bytearray | memoryview):
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    array = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    return torch.from_numpy(array.copy() if not array.flags.writeable else array)
