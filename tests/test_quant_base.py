"""The QuantizedLinear contract: a subclass that only implements rows() gets a working frozen Linear."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from deltaformer.errors import QuantError
from deltaformer.quant import base
from deltaformer.quant.base import QuantizedLinear
from deltaformer.quant.layers import QuantLinear


class HalfLinear(QuantizedLinear):
    """Weight stored as fp16: the smallest possible packed layer."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.scheme = "fp16"
        self.register_buffer("w16", linear.weight.detach().half())
        self.calls = 0
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().clone(),
                                                                        requires_grad=False)

    def rows(self, start: int, stop: int) -> Tensor:
        self.calls += 1
        return self.w16[start:stop].float()


def test_abstract_rows_is_required():
    with pytest.raises(TypeError):
        QuantizedLinear()  # type: ignore[abstract]


def test_subclass_with_rows_only_is_a_frozen_linear(monkeypatch):
    monkeypatch.setattr(base, "ROWS_PER_BLOCK", 16)
    lin = torch.nn.Linear(24, 40)
    q = HalfLinear(lin)
    w = lin.weight.detach().half().float()
    assert torch.equal(q.weight, w) and torch.equal(q.dequantize(), w)
    x = torch.randn(2, 3, 24, requires_grad=True)
    q.calls = 0
    y = q(x)
    assert q.calls == 3  # 40 rows in blocks of 16: the weight is never asked for whole
    x2 = x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(x2, w, lin.bias.detach())
    assert torch.allclose(y, ref, atol=1e-6, rtol=0)
    y.square().sum().backward()
    ref.square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5, rtol=0)
    assert all(not p.requires_grad for p in q.parameters())
    with torch.no_grad():  # no autograd graph: the plain blockwise path gives the same numbers
        assert torch.equal(q(x), y.detach())
    with pytest.raises(QuantError, match="expects 24"):
        q(torch.randn(2, 5))


def test_quant_linear_is_a_quantized_linear():
    q = QuantLinear(torch.nn.Linear(64, 8), "nf4")
    assert isinstance(q, QuantizedLinear) and q.scheme == "nf4"
    assert torch.equal(q.rows(2, 5), q.dequantize()[2:5])
    assert torch.equal(q.rows_fn()(0, 8), q.weight)
