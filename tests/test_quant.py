"""Quantization schemes against bitsandbytes (bit-equal packed data) and quantized layers against fp32."""

from __future__ import annotations

import pytest
import torch

from deltaformer.errors import QuantError
from deltaformer.quant import base, layers, schemes
from deltaformer.quant.layers import QuantLinear, quantize

bnbf = pytest.importorskip("bitsandbytes.functional")


def test_code_books_equal_bitsandbytes():
    assert torch.equal(schemes.dynamic_map(), bnbf.create_dynamic_map(signed=True))
    assert torch.equal(schemes.nf4_levels(), bnbf.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bit_equal_to_bitsandbytes(double_quant):
    w = torch.randn(96, 128) * 0.05
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    ours = schemes.nf4(w, blocksize=64, double_quant=double_quant)
    assert torch.equal(q.view(-1), ours.packed)
    if double_quant:
        # bitsandbytes' CPU kernel stores the block scales with an approximate binary search (BinSearch):
        # ours takes the exact nearest code, so a rare near-tie may land one code over; nothing else differs.
        assert torch.equal(state.state2.absmax, ours.absmax_scale)
        assert float(state.offset) == ours.offset
        theirs, mine = state.absmax.long(), ours.absmax_codes.long()
        assert (theirs - mine).abs().max() <= 1 and (theirs != mine).float().mean() <= 0.02
        code = schemes.dynamic_map()
        target = (ours.scales() - ours.offset) / ours.absmax_scale
        assert ((code[mine] - target).abs() <= (code[theirs] - target).abs()).all()
        theirs_w = schemes.NF4Weight(ours.packed, ours.shape, 64, absmax_codes=state.absmax,
                                     absmax_scale=state.state2.absmax, offset=float(state.offset))
        assert torch.allclose(bnbf.dequantize_4bit(q, state), theirs_w.rows(0, 96), atol=1e-7, rtol=0)
    else:
        assert torch.equal(state.absmax, ours.absmax)
        assert torch.equal(bnbf.dequantize_4bit(q, state), ours.rows(0, 96))


def test_int8_absmax_bit_equal_to_bitsandbytes():
    w = torch.randn(40, 64)
    q, absmax, _ = bnbf.int8_vectorwise_quant(w)
    ours_q, ours_absmax = schemes.int8_absmax(w)
    assert torch.equal(q, ours_q) and torch.equal(absmax, ours_absmax)


def test_zero_point_matches_torch_per_channel():
    w = torch.randn(24, 32) + 0.3
    q, scale, zero = schemes.int8_zero_point(w)
    ref = torch.quantize_per_channel(w, scale.double(), zero.long(), 0, torch.quint8)
    assert torch.equal(ref.int_repr(), q)
    assert torch.allclose(ref.dequantize(), schemes.int8_zero_point_rows(q, scale, zero), atol=1e-6, rtol=0)


@pytest.mark.parametrize("scheme", layers.SCHEMES)
def test_quant_linear_matches_dequantized_product_and_gradient(scheme, monkeypatch):
    monkeypatch.setattr(base, "ROWS_PER_BLOCK", 64)  # several blocks, a short last one
    lin = torch.nn.Linear(128, 150)
    q = QuantLinear(lin, scheme)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = q(x)
    ref = torch.nn.functional.linear(x, q.dequantize(), lin.bias)
    tol = 3e-2 if scheme == "llm_int8" else 1e-5  # LLM.int8 also quantizes the input rows to int8
    assert torch.allclose(y, ref, atol=tol, rtol=0)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, q.dequantize(), lin.bias).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5, rtol=0)
    assert all(not p.requires_grad for p in q.parameters())


def test_llm_int8_outlier_features_run_in_fp32():
    lin = torch.nn.Linear(64, 32)
    q = QuantLinear(lin, "llm_int8")
    x = torch.randn(4, 64) * 0.1
    x[:, 5] = 40.0  # an outlier feature: without decomposition it would wipe out every other feature's int8 range
    w = q.dequantize()
    exact = x @ w.t() + lin.bias
    assert (q(x) - exact).abs().max() < 5e-3
    plain = QuantLinear(lin, "llm_int8", threshold=float("inf"))
    assert (plain(x) - exact).abs().max() > 5 * (q(x) - exact).abs().max()


def test_nf4_error_is_small_relative_to_weights():
    w = torch.randn(64, 256) * 0.02
    rel = (schemes.nf4(w).rows(0, 64) - w).norm() / w.norm()
    assert rel < 0.12


def test_quantize_model_replaces_linears_and_keeps_heads(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    x = torch.randn(2, 64)
    ref = model(x)
    quantize(model, "int8", skip=("2",))
    assert isinstance(model[0], QuantLinear) and type(model[2]) is torch.nn.Linear
    assert (model(x) - ref).abs().max() < 0.05


def test_bad_input():
    with pytest.raises(QuantError, match="unknown quantization scheme"):
        QuantLinear(torch.nn.Linear(8, 8), "int3")
    with pytest.raises(QuantError, match="multiple of the block size"):
        schemes.nf4(torch.randn(4, 100), blocksize=64)
    bad = torch.nn.Linear(8, 8)
    bad.weight.data[0, 0] = float("nan")
    with pytest.raises(QuantError, match="NaN"):
        QuantLinear(bad, "int8")
    with pytest.raises(QuantError, match="features"):
        QuantLinear(torch.nn.Linear(8, 8), "int8")(torch.randn(2, 9))
