"""Rotary position embeddings (Su et al. 2021) with the frequency scalings Hugging Face configs name.

``rope_scaling`` (``rope_parameters`` in newer ``transformers``) picks how the inverse frequencies are
stretched past the pretraining context:

* ``default``: ``theta^(-2i/d)``;
* ``linear``: positions interpolated, every frequency divided by ``factor``;
* ``dynamic`` (NTK-aware): the base grows with the sequence once it is longer than
  ``max_position_embeddings``; shorter sequences use the plain frequencies;
* ``llama3`` (Llama 3.1, SmolLM): low frequencies divided by ``factor``, high ones kept, a smooth blend
  between ``low_freq_factor`` and ``high_freq_factor`` wavelengths of ``original_max_position_embeddings``.

Frequencies, cosines and sines are computed in fp32 and cast to the activations' dtype, as ``transformers``
does, so the rotation is bit-compatible with its Llama.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..config import scaling_kind


def inverse_frequencies(dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int,
                        seq_len: int | None = None) -> Tensor:
    """fp32 inverse frequencies of a ``dim``-wide head; ``seq_len`` matters only for ``dynamic``."""
    kind = scaling_kind(scaling)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if kind == "dynamic":
        factor = float(scaling["factor"])  # type: ignore[index]
        length = max(seq_len or max_positions, max_positions)
        theta = theta * ((factor * length / max_positions) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (theta ** exponents)
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])  # type: ignore[index]
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, scaling, max_positions)  # type: ignore[arg-type]
    return inv_freq


def _llama3(inv_freq: Tensor, scaling: dict[str, Any], max_positions: int) -> Tensor:
    factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
    old_context = scaling.get("original_max_position_embeddings", max_positions)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Cosines and sines for given positions; :func:`apply_rotary` rotates queries and keys with them."""

    inv_freq: Tensor  # a (non-persistent) buffer, registered in __init__

    def __init__(self, dim: int, theta: float = 10000.0, scaling: dict[str, Any] | None = None,
                 max_position_embeddings: int = 2048) -> None:
        super().__init__()
        self.dim, self.theta, self.scaling = dim, theta, dict(scaling) if scaling else None
        self.max_positions = max_position_embeddings
        self.dynamic = scaling_kind(scaling) == "dynamic"
        self.register_buffer("inv_freq", inverse_frequencies(dim, theta, scaling, max_position_embeddings),
                             persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``positions``: (B, T) -> cos, sin of shape (B, 1, T, dim), ready to broadcast over heads."""
        inv_freq = self.inv_freq
        if self.dynamic:
            seq_len = int(positions.max()) + 1 if positions.numel() else 0
            if seq_len > self.max_positions:
                inv_freq = inverse_frequencies(self.dim, self.theta, self.scaling, self.max_positions, seq_len)
                inv_freq = inv_freq.to(positions.device)
        freqs = positions[..., None].float() * inv_freq.to(device=positions.device, dtype=torch.float32)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate queries and keys ([B, H, T, D]) by their positions' angles (the half-split layout of HF)."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Rotation:
    """The ``rotary`` callable :class:`~deltaformer.nn.attention.SelfAttention` takes: one per forward, the
    angles computed once and shared by every layer."""

    def __init__(self, cos: Tensor, sin: Tensor) -> None:
        self.cos, self.sin = cos, sin

    def __call__(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return apply_rotary(q, k, self.cos, self.sin)
