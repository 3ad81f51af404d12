"""Tensor helpers the stacked stores and the methods share: padding stacks, per-sample gathers, dropout
with one rate per sample, LoRA-style fused products and initialisations. No delta state lives here."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DeltaError
from ..nn.dropout import dropout
from .routing import Selection


def pad_to(t: Tensor, shape: Sequence[int]) -> Tensor:
    """Zero-pad the trailing dims of ``t`` up to ``shape`` (zero rows/columns keep LoRA/adapters exact)."""
    pads: list[int] = []
    for have, want in zip(reversed(t.shape), reversed(shape)):
        pads += [0, want - have]
    return F.pad(t, pads) if any(pads) else t


def per_sample(vectors: Tensor, sel: Selection, x: Tensor, neutral: float) -> Tensor:
    """Gather (n, dim) per-slot vectors for a batch shaped like ``x``: (B, 1.., dim), ``neutral`` for bare."""
    if sel.index is None:
        out = vectors[sel.each[0]]
        for s in sel.each[1:]:
            out = out * vectors[s] if neutral == 1.0 else out + vectors[s]
        return out
    out = vectors[sel.index]
    keep = sel.keep_like(out, 1)
    if keep is not None:
        out = neutral + keep * (out - neutral) if neutral else keep * out
    return out.view(out.shape[0], *([1] * (x.dim() - 2)), out.shape[-1])


def sample_dropout(x: Tensor, p: Tensor | float, training: bool) -> Tensor:
    """Dropout with one rate, or one rate per sample ((B,) tensor), as each sample's own delta asks."""
    if not training:
        return x
    if isinstance(p, float):
        return dropout(x, p) if p > 0 else x
    keep = (1.0 - p).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return x * torch.bernoulli(keep.expand_as(x)) / keep.clamp_min(1e-12)


def add_product(y: Tensor, h: Tensor, b: Tensor, alpha: float) -> Tensor:
    """``y + alpha * h @ b^T`` in one kernel: addmm for one ``b`` (out, r), baddbmm for per-sample ``b``
    (B, out, r). Without autograd it accumulates into ``y`` in place (a fresh activation), which saves a
    full-size allocation and a pass over memory; with autograd it stays out of place (nothing saved for
    backward changes, and the base output is freed right after), and ``b^T`` is made contiguous: its
    gradient is then computed as ``h^T @ grad`` (r x tokens x out), which ran 2.5x faster on CPU than the
    ``grad^T @ h`` that autograd picks for a transposed view (the copy is out x r, nothing)."""
    inplace = not torch.is_grad_enabled() and y.is_contiguous()
    bt = b.transpose(-1, -2) if inplace else b.transpose(-1, -2).contiguous()
    if b.dim() == 2:
        y2, h2 = y.view(-1, y.shape[-1]) if inplace else y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1])
        out = y2.addmm_(h2, bt, alpha=alpha) if inplace else torch.addmm(y2, h2, bt, alpha=alpha)
        return out.view_as(y)
    y3, h3 = y.reshape(b.shape[0], -1, y.shape[-1]), h.reshape(b.shape[0], -1, h.shape[-1])
    out = y3.baddbmm_(h3, bt, alpha=alpha) if inplace else torch.baddbmm(y3, h3, bt, alpha=alpha)
    return out.view_as(y)


def kaiming_rows(rows: int, cols: int, like: Tensor) -> Tensor:
    """nn.Linear's default init (kaiming uniform, a=sqrt(5)), as peft inits LoRA A."""
    t = torch.empty(rows, cols, dtype=like.dtype, device=like.device)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


def check_shape(what: str, value: Tensor, shape: Sequence[int]) -> None:
    """A tensor read from a delta file must have the shape this model's delta has."""
    if tuple(value.shape) != tuple(shape):
        raise DeltaError(f"{what} has shape {tuple(value.shape)} but this model needs {tuple(shape)}: "
                         "the delta was trained on a model of another size")
