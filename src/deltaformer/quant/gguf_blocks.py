"""GGUF (ggml) block formats in torch: dequantize packed blocks, quantize fp32 into them.

Every operation is a vectorised tensor op over all blocks at once, so it runs on any device and is fast;
``gguf.quants`` is only the test oracle. Floating-point steps are done in the same order and precision as
``gguf.quants`` (fp16 scales widened to fp32, then one multiply and one add), so results are equal bit for bit.
Packed layers that compute from the blocks directly build on :func:`dequantize_blocks`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..errors import CheckpointError

QK_K = 256

#: type name -> (elements per block, bytes per block), as ggml defines them.
BLOCK_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}


class GGUFTypeError(CheckpointError):
    """A GGUF tensor type that this reader cannot decode (or encode)."""


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 from byte pairs ``[..., 2]`` (uint8), widened to fp32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``[n, k]`` bytes -> ``[n, 2k]``: all low nibbles first, then all high ones (ggml's order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(b: torch.Tensor, shifts: list[int], width: int) -> torch.Tensor:
    """``[n, g, k]`` bytes -> ``[n, g, len(shifts), k]`` fields of ``width`` bits at each shift."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=b.device).view(1, 1, -1, 1)
    return (b.unsqueeze(-2) >> s) & ((1 << width) - 1)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:]).to(torch.int8) - 8
    return d * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return d * _nibbles(b[:, 4:]).float() + m


def _high_bits32(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1: 4 bytes = one little-endian uint32, bit i is the fifth bit of element i."""
    s = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> s) & 1).reshape(qh.shape[0], 32)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = (_nibbles(b[:, 6:]) | (_high_bits32(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return d * q.float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 8:]) | (_high_bits32(b[:, 4:8]) << 4)
    return d * q.float() + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return b[:, 2:].contiguous().view(torch.int8).float() * d


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0xF).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    q = _bits(qs.reshape(n, 2, 32), [0, 2, 4, 6], 2).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _bits(scales[:, :8].reshape(n, 1, 8), [0, 4], 4).reshape(n, 16)
    high = _bits(scales[:, 8:].reshape(n, 1, 4), [0, 2, 4, 6], 2).reshape(n, 16)
    sc = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * sc).view(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 32), [0, 2, 4, 6], 2).reshape(n, 16, 16)
    qh = _bits(hmask.reshape(n, 1, 32), list(range(8)), 1).reshape(n, 16, 16) ^ 1
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: twelve bytes -> eight 6-bit scales and eight 6-bit mins."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    dd = (d * sc.float()).view(n, 8, 1)
    dm = (dmin * mn.float()).view(n, 8, 1)
    q = _bits(b[:, 16:].reshape(n, 4, 32), [0, 4], 4).reshape(n, 8, 32).float()
    return (dd * q - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    dd = (d * sc.float()).view(n, 8, 1)
    dm = (dmin * mn.float()).view(n, 8, 1)
    ql = _bits(b[:, 48:].reshape(n, 4, 32), [0, 4], 4).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48].reshape(n, 1, 32), list(range(8)), 1).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float()
    return (dd * q - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).view(n, 16, 1)
    low = _bits(ql.reshape(n, 2, 64), [0, 4], 4).reshape(n, 8, 32)
    high = _bits(qh.reshape(n, 2, 32), [0, 2, 4, 6], 2).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (d * q).reshape(n, QK_K)


_DEQUANT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}
SUPPORTED = ("F32", "F16", "BF16", *_DEQUANT)


def type_name(kind: object) -> str:
    """``"Q4_1"`` from a name, a ``gguf.GGMLQuantizationType`` or its integer value."""
    if isinstance(kind, str):
        return kind.upper()
    name = getattr(kind, "name", None)
    if name is None:
        try:
            from gguf import GGMLQuantizationType

            name = GGMLQuantizationType(int(kind)).name  # type: ignore[call-overload]
        except ValueError:
            name = f"type id {kind}"
    return str(name)


def check_type(kind: object) -> str:
    """The type's name, or a :class:`GGUFTypeError` naming it when it cannot be decoded here."""
    name = type_name(kind)
    if name not in SUPPORTED:
        raise GGUFTypeError(f"GGUF tensor type {name} is not supported (supported: {', '.join(SUPPORTED)}); "
                            "re-quantize the file to one of those types, e.g. with llama.cpp's llama-quantize")
    return name


def _as_bytes(raw: np.ndarray | bytes | torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    if isinstance(raw, torch.Tensor):
        t = raw.contiguous().view(torch.uint8).reshape(-1)
    else:
        arr = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else raw
        t = torch.from_numpy(np.ascontiguousarray(arr).view(np.uint8).reshape(-1))
    return t.to(device) if device is not None else t


def dequantize_blocks(blocks: torch.Tensor, kind: object) -> torch.Tensor:
    """``[n_blocks, bytes_per_block]`` uint8 -> ``[n_blocks, block_elements]`` fp32 (same device)."""
    name = check_type(kind)
    if name == "F32":
        return blocks.contiguous().view(torch.float32).reshape(blocks.shape[0], -1)
    if name == "F16":
        return blocks.contiguous().view(torch.float16).float().reshape(blocks.shape[0], -1)
    if name == "BF16":
        return blocks.contiguous().view(torch.bfloat16).float().reshape(blocks.shape[0], -1)
    return _DEQUANT[name](blocks)


def dequantize(raw: np.ndarray | bytes | torch.Tensor, kind: object, shape: tuple[int, ...] | list[int],
               device: torch.device | str | None = None) -> torch.Tensor:
    """The fp32 tensor of ``shape`` (PyTorch order, rows last-dimension contiguous) packed in ``raw``."""
    name = check_type(kind)
    elems, nbytes = BLOCK_SIZES[name]
    shape = tuple(int(s) for s in shape)
    count = int(np.prod(shape)) if shape else 1
    data = _as_bytes(raw, device)
    if count % elems or data.numel() != count // elems * nbytes:
        raise CheckpointError(f"GGUF tensor of type {name} and shape {shape} needs {count // elems * nbytes} bytes, "
                              f"found {data.numel()}: the file is truncated or corrupted; re-download it")
    blocks = data.view(count // elems, nbytes)
    return dequantize_blocks(blocks, name).reshape(shape)


# ---- quantizing (what save_gguf writes) -----------------------------------------------------------------

def _round_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, as ggml's ``roundf`` (and gguf's ``np_roundf``)."""
    a = x.abs()
    f = torch.floor(a)
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(x.shape[0], 2)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    half = q.shape[-1] // 2
    return q[:, :half] | (q[:, half:] << 4)


def _quant_q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _round_away(x * inv).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], dim=1)


def _quant_q4_0(x: torch.Tensor) -> torch.Tensor:
    idx = x.abs().argmax(dim=-1, keepdim=True)
    d = torch.gather(x, -1, idx) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(x * inv + 8.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _pack_nibbles(q)], dim=1)


def _quant_q4_1(x: torch.Tensor) -> torch.Tensor:
    hi, lo = x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True)
    d = (hi - lo) / 15
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc((x - lo) * inv + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], dim=1)


_QUANT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q8_0": _quant_q8_0, "Q4_0": _quant_q4_0, "Q4_1": _quant_q4_1,
}
QUANTIZABLE = ("F32", "F16", "BF16", *_QUANT)


def quantize(t: torch.Tensor, kind: object) -> bytes:
    """Pack ``t`` (rows along the last dimension) as GGUF type ``kind``; the bytes ``gguf.quants.quantize`` gives."""
    name = type_name(kind)
    if name not in QUANTIZABLE:
        raise GGUFTypeError(f"cannot write GGUF tensor type {name}: use one of {', '.join(QUANTIZABLE)}")
    x = t.detach().float().contiguous()
    if name == "F32":
        out = x
    elif name == "F16":
        out = x.to(torch.float16)
    elif name == "BF16":
        # round to nearest even with quiet NaNs, as ggml_compute_fp32_to_bf16
        n = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        nan = (n & 0x7FFFFFFF) > 0x7F800000
        n = torch.where(nan, (n & 0xFFFF0000) | (64 << 16), n)
        n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
        out = n.to(torch.int32).to(torch.int16)
    else:
        elems = BLOCK_SIZES[name][0]
        if x.shape[-1] % elems:
            raise GGUFTypeError(f"cannot write a tensor of shape {tuple(x.shape)} as {name}: its last dimension "
                                f"must be a multiple of {elems}; use F16 or F32 for it")
        out = _QUANT[name](x.reshape(-1, elems))
    return out.contiguous().view(torch.uint8).cpu().numpy().tobytes()
