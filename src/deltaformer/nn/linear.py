"""Linear layers whose CPU matrix products run on oneDNN where that is faster than torch's default BLAS.

On CPU, ``F.linear`` in fp32 calls MKL's sgemm. MKL picks its code path by CPU vendor, and on AMD processors
(the EPYC machines this project is built and tested on, and many laptops) it leaves a good part of the chip
unused; oneDNN, which torch also ships, picks its kernels by instruction set. Measured on a 2-core AVX-512
EPYC at the shapes of MiniLM and Longformer layers (4096 x 384 x 1536, 4096 x 768 x 768, ...): the forward
product and the input gradient ran 10-25% faster on oneDNN (``benchmarks/linear.py`` measures both on any
machine). The weight gradient stays on MKL, which was faster for that layout.

The arithmetic is the same fp32 products in another summation order (differences of a few ulps, as between
thread counts). oneDNN costs about 15 microseconds more per call, so small products (fewer than
:data:`MIN_MACS` multiply-adds, or a side under :data:`MIN_FEATURES`, such as LoRA's rank-r factors) keep
``F.linear``; so do other devices and dtypes, ``torch.compile`` (which chooses its own kernels), double
backward (the backward then runs differentiable torch ops) and ``DELTAFORMER_CPU_GEMM=blas``.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Smallest product (rows x in x out multiply-adds) sent to oneDNN: below it the call overhead shows.
MIN_MACS = 1 << 21
#: Smallest in/out feature count sent to oneDNN (rank-r factors and 2-label heads stay on F.linear).
MIN_FEATURES = 64

_onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ENABLED = _onednn and os.environ.get("DELTAFORMER_CPU_GEMM", "onednn").lower() != "blas"


def _product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def uses_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`linear` sends this product to oneDNN (see the module docstring)."""
    if not ENABLED or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.dim() < 2 or weight.dim() != 2 or x.shape[-1] != weight.shape[1] or torch.compiler.is_compiling():
        return False
    out_features, in_features = weight.shape
    rows = math.prod(x.shape[:-1])
    return min(in_features, out_features) >= MIN_FEATURES and rows * in_features * out_features >= MIN_MACS


class _OneDNNLinear(torch.autograd.Function):
    """``x W^T + b`` with the forward product and the input gradient on oneDNN, the weight gradient on BLAS."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _product(x.contiguous(), weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x if weight.requires_grad else None, weight)  # x is needed for dW only
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        want_x, want_w, want_b = ctx.needs_input_grad
        grad_x = grad_w = grad_b = None
        if want_x:
            differentiable = torch.is_grad_enabled()  # double backward: stay on differentiable ops
            grad_x = grad @ weight if differentiable else _product(grad.contiguous(), weight.t(), None)
        flat = grad.reshape(-1, grad.shape[-1])
        if want_w:
            grad_w = flat.t() @ x.reshape(-1, x.shape[-1])
        if want_b and ctx.has_bias:
            grad_b = flat.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, on oneDNN when :func:`uses_onednn` says so."""
    if not uses_onednn(x, weight):
        return F.linear(x, weight, bias)
    tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return _OneDNNLinear.apply(x, weight, bias) if tracked else _product(x.contiguous(), weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same arguments, parameters and state dict) computed by :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


#: Linear layers whose forward is exactly ``linear(x, weight, bias)``: fused paths may compute their
#: products themselves (a delta wrapper is not among them, nor is any other subclass).
PLAIN_LINEARS: tuple[type[nn.Module], ...] = (nn.Linear, Linear)
