"""Linear layers on oneDNN: the same values and gradients as F.linear, and the cases that keep F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltaformer import delta
from deltaformer.nn import linear as linear_module
from deltaformer.nn.linear import MIN_MACS, PLAIN_LINEARS, Linear, linear, uses_onednn

needs_onednn = pytest.mark.skipif(not linear_module.ENABLED, reason="torch built without oneDNN (or disabled)")


def test_big_cpu_fp32_products_go_to_onednn_and_the_rest_do_not():
    w = torch.randn(384, 384)
    assert uses_onednn(torch.randn(64, 384), w) == linear_module.ENABLED
    assert not uses_onednn(torch.randn(4, 384), w)  # 4 * 384 * 384 < MIN_MACS: the call overhead would show
    assert 4 * 384 * 384 < MIN_MACS <= 64 * 384 * 384
    assert not uses_onednn(torch.randn(4096, 384), torch.randn(8, 384))  # a rank-8 factor
    assert not uses_onednn(torch.randn(64, 384, dtype=torch.float64), w.double())
    assert not uses_onednn(torch.randn(64, 384), w.to(torch.bfloat16))
    assert not uses_onednn(torch.randn(384), w)  # a single vector


def test_disabled_by_switch(monkeypatch):
    monkeypatch.setattr(linear_module, "ENABLED", False)
    assert not uses_onednn(torch.randn(64, 384), torch.randn(384, 384))


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(96, 256), (4, 40, 256)])
def test_values_and_gradients_match_f_linear(shape, bias):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = (torch.randn(320, 256) * 0.05).requires_grad_()
    b = torch.randn(320, requires_grad=True) if bias else None
    assert uses_onednn(x, w)
    grad = torch.randn(*shape[:-1], 320)
    ours = linear(x, w, b)
    theirs = F.linear(x, w, b)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    inputs = [t for t in (x, w, b) if t is not None]
    for a, c in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(theirs, inputs, grad)):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-5)


@needs_onednn
def test_frozen_weight_gets_no_gradient_and_input_still_does():
    x = torch.randn(128, 256, requires_grad=True)
    layer = Linear(256, 256).requires_grad_(False)
    layer(x).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(128, -1), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_double_backward_runs_on_differentiable_ops():
    torch.manual_seed(0)
    x = torch.randn(128, 256, requires_grad=True)
    w = (torch.randn(256, 256) * 0.05).requires_grad_()
    (gx,) = torch.autograd.grad(linear(x, w).pow(2).sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(gx.sum(), w)
    (gx_ref,) = torch.autograd.grad(F.linear(x, w).pow(2).sum(), x, create_graph=True)
    (gw_ref,) = torch.autograd.grad(gx_ref.sum(), w)
    torch.testing.assert_close(gw, gw_ref, atol=1e-3, rtol=1e-4)


def test_linear_is_an_nn_linear_with_the_same_state():
    torch.manual_seed(0)
    ours, plain = Linear(256, 128), torch.nn.Linear(256, 128)
    plain.load_state_dict(ours.state_dict())
    assert isinstance(ours, torch.nn.Linear) and set(ours.state_dict()) == {"weight", "bias"}
    x = torch.randn(64, 256)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), plain(x), atol=1e-5, rtol=1e-5)


def test_deltas_wrap_it_and_merging_gives_it_back():
    model = torch.nn.Sequential(Linear(256, 256))
    delta.attach(model, delta.LoraConfig(r=4, targets=("0",), init=False), "d")
    x = torch.randn(64, 256)
    with torch.no_grad():
        wrapped = model(x)
        plain = delta.merge_and_unload(model, "d")
        assert type(plain[0]) in PLAIN_LINEARS
        torch.testing.assert_close(plain(x), wrapped, atol=1e-4, rtol=1e-5)
