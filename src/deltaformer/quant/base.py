"""The quantized-linear contract every packed layer follows (ours, packed GGUF, deltas on a quantized base).

A :class:`QuantizedLinear` is a frozen ``Linear`` whose weight lives in some packed form. It promises:

- ``in_features``, ``out_features``, ``bias`` (frozen, may be ``None``) and ``scheme`` (a name, e.g. "nf4");
- ``rows(start, stop)``: the fp32 rows ``W[start:stop]`` of the weight, dequantized (the only abstract method);
- ``dequantize()``: the whole fp32 weight (for merging and tests, never the hot path); ``weight`` is the same
  thing as a property, so code that reads ``.weight`` keeps working;
- a default ``forward`` that multiplies one block of :data:`ROWS_PER_BLOCK` dequantized rows at a time, with the
  input gradient through autograd (re-dequantizing in backward instead of saving the weight) and no weight
  gradient. Subclasses may override ``forward`` with a fused kernel; :func:`fused_product` keeps the blockwise
  input gradient for such a forward.

A subclass that decodes something once per product (block scales, say) overrides :meth:`row_source` to return a
``rows``-like function that reuses it across the blocks of one call.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import QuantError

#: Output rows dequantized per step of a product (a 4096-wide layer: 256 x 4096 fp32 = 4 MiB at a time).
ROWS_PER_BLOCK = 256

RowFn = Callable[[int, int], Tensor]


def _blockwise_forward(x: Tensor, rows: RowFn, out_features: int) -> Tensor:
    step = ROWS_PER_BLOCK
    parts = [F.linear(x, rows(a, min(a + step, out_features)).to(x.dtype)) for a in range(0, out_features, step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _blockwise_input_grad(grad: Tensor, rows: RowFn, out_features: int) -> Tensor:
    grad_x: Tensor | None = None
    for a in range(0, out_features, ROWS_PER_BLOCK):
        b = min(a + ROWS_PER_BLOCK, out_features)
        part = grad[..., a:b] @ rows(a, b).to(grad.dtype)
        grad_x = part if grad_x is None else grad_x + part
    assert grad_x is not None
    return grad_x


class _BlockwiseProduct(torch.autograd.Function):
    """``x W^T`` where ``rows(a, b)`` yields W[a:b] in fp32; backward re-dequantizes instead of saving W."""

    @staticmethod
    def forward(x: Tensor, rows: RowFn, out_features: int) -> Tensor:
        return _blockwise_forward(x, rows, out_features)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.rows, ctx.out_features = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _blockwise_input_grad(grad, ctx.rows, ctx.out_features), None, None


class _FusedProduct(torch.autograd.Function):
    """``forward_fn(x)`` forward (a fused kernel), the blockwise dequantized product as its input gradient."""

    @staticmethod
    def forward(x: Tensor, forward_fn: Callable[[Tensor], Tensor], rows: RowFn, out_features: int) -> Tensor:
        return forward_fn(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.rows, ctx.out_features = inputs[2], inputs[3]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _blockwise_input_grad(grad, ctx.rows, ctx.out_features), None, None, None


def blockwise_product(x: Tensor, rows: RowFn, out_features: int) -> Tensor:
    """``x @ W^T`` (no bias) one block of dequantized rows at a time; differentiable in ``x`` only."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _BlockwiseProduct.apply(x, rows, out_features)
    return _blockwise_forward(x, rows, out_features)


def fused_product(x: Tensor, forward_fn: Callable[[Tensor], Tensor], rows: RowFn, out_features: int) -> Tensor:
    """``forward_fn(x)`` (some kernel computing ``x @ W^T``) with the blockwise input gradient of :func:`blockwise_product`."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _FusedProduct.apply(x, forward_fn, rows, out_features)
    return forward_fn(x)


class QuantizedLinear(nn.Module, metaclass=ABCMeta):
    """A frozen ``Linear`` with a packed weight: implement :meth:`rows`; the rest has working defaults."""

    in_features: int
    out_features: int
    bias: Tensor | None
    scheme: str

    @abstractmethod
    def rows(self, start: int, stop: int) -> Tensor:
        """fp32 rows ``W[start:stop]`` of the weight, dequantized (shape ``[stop - start, in_features]``)."""

    def row_source(self) -> RowFn:
        """The ``rows`` function one product uses for all its blocks (override to decode shared state once)."""
        return self.rows

    def dequantize(self) -> Tensor:
        """The whole fp32 weight ``[out_features, in_features]`` (for merging and tests; not the hot path)."""
        return self.row_source()(0, self.out_features)

    @property
    def weight(self) -> Tensor:
        """The fp32 weight, materialised on demand (code that reads ``.weight`` still works, slowly)."""
        return self.dequantize()

    def check_input(self, x: Tensor) -> None:
        """One-line error when ``x``'s last dimension is not ``in_features``."""
        if x.shape[-1] != self.in_features:
            raise QuantError(f"input has {x.shape[-1]} features, the quantized layer expects {self.in_features}")

    def add_bias(self, y: Tensor) -> Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.add_bias(blockwise_product(x, self.row_source(), self.out_features))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"
