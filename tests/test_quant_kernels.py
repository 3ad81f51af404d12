"""Fused kernels against the blockwise reference product they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltaformer.errors import QuantError
from deltaformer.quant import kernels, schemes
from deltaformer.quant.layers import QuantLinear

needs_int8 = pytest.mark.skipif(not kernels.has_int8_weight_only(), reason="no CPU int8 weight-only kernel")
needs_int4 = pytest.mark.skipif(not kernels.has_int4_weight_only(), reason="no CPU int4 kernel of this layout")



def _bf16_equal(fused: torch.Tensor, ref: torch.Tensor) -> None:
    """``fused`` is ``ref`` rounded once to bf16: equal nearly everywhere, never more than one bf16 step off."""
    rounded = ref.to(torch.bfloat16).float()
    assert (fused == rounded).float().mean() > 0.99
    assert torch.allclose(fused, rounded, rtol=2.0 ** -7, atol=1e-6)


def _both(layer: QuantLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        fused = layer(x)
        layer.use_kernels = False
        plain = layer(x)
        layer.use_kernels = True
    return fused, plain


def test_int4_layout_is_torch_kernel_layout():
    codes = torch.randint(0, 16, (192, 96), dtype=torch.int32)
    packed = kernels.pack_int4(codes.to(torch.uint8))
    if kernels.has_int4_weight_only():
        assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1).reshape(-1))
    for a, b in [(0, 192), (3, 70), (64, 128), (100, 101)]:
        assert torch.equal(kernels.unpack_int4_rows(packed, 96, a, b), codes[a:b].long())


@needs_int8
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_int8_weight_only_kernel_equals_reference(granularity):
    torch.manual_seed(0)
    lin = torch.nn.Linear(192, 320, bias=False)
    layer = QuantLinear(lin, "int8", granularity=granularity)
    x = torch.randn(2, 3, 192)
    fused, plain = _both(layer, x)
    # the kernel: the fp32 product of the bf16-rounded input with the int8 rows, times the bf16 row scale,
    # rounded to bf16 once
    scale = layer._channel_scale().to(torch.bfloat16).float()
    ref = F.linear(x.to(torch.bfloat16).float(), layer.weight_q.float()) * scale
    assert fused.dtype == torch.float32 and fused.shape == (2, 3, 320)
    _bf16_equal(fused, ref)
    assert torch.allclose(plain, F.linear(x, layer.dequantize()), atol=1e-5)
    assert (fused - plain).abs().max() < 0.01 * plain.abs().max()


@needs_int4
@pytest.mark.parametrize("shape", [(256, 128), (100, 96)])  # the second: rows and columns both padded
def test_int4_kernel_equals_reference(shape):
    torch.manual_seed(0)
    out_features, in_features = shape
    lin = torch.nn.Linear(in_features, out_features, bias=False)
    layer = QuantLinear(lin, "int4", blocksize=64)
    assert layer.cols == 128 and layer.padded_rows % 64 == 0
    x = torch.randn(5, in_features)
    fused, plain = _both(layer, x)
    # the kernel: the fp32 product of the bf16-rounded input with the dequantized rows, rounded to bf16 once
    ref = F.linear(x.to(torch.bfloat16).float(), layer.dequantize())
    assert fused.shape == (5, out_features)
    _bf16_equal(fused, ref)
    assert torch.allclose(plain, F.linear(x, layer.dequantize()), atol=1e-5)


def test_int4_affine_dequantizes_to_the_nearest_level():
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    codes, scale, zero = schemes.int4_affine(w, 64)
    back = schemes.int4_affine_rows(codes, scale, zero)
    step = scale.float().repeat_interleave(64, dim=1)
    assert ((back - w).abs() <= step / 2 + 1e-6).all()
    with pytest.raises(QuantError, match="multiple of the block size"):
        schemes.int4_affine(torch.randn(4, 96), 64)


def test_int8_matmul_is_exact_with_and_without_int_mm(monkeypatch):
    a = torch.randint(-127, 128, (33, 160), dtype=torch.int8)
    b = torch.randint(-127, 128, (48, 160), dtype=torch.int8)
    exact = a.to(torch.int64) @ b.to(torch.int64).t()
    assert torch.equal(kernels.int8_matmul(a, b).to(torch.int64), exact)
    monkeypatch.setattr(kernels, "has_int_mm", lambda: False)
    assert torch.equal(kernels.int8_matmul(a, b).to(torch.int64), exact)


def test_w8a8_quantizes_tokens_and_matches_its_definition(monkeypatch):
    torch.manual_seed(0)
    lin = torch.nn.Linear(384, 200)
    layer = QuantLinear(lin, "w8a8")
    x = torch.randn(2, 700, 384)  # more rows than one quantization chunk
    with torch.no_grad():
        y = layer(x)
    flat = x.reshape(-1, 384)
    xmax = flat.abs().amax(dim=1, keepdim=True)
    xq = torch.round(flat * (127.0 / xmax))
    ref = (xq.double() @ layer.weight_q.double().t()) * (xmax.double() / 127.0) * (layer.scale.double() / 127.0)
    assert torch.allclose(y.reshape(-1, 200).double(), ref + lin.bias.double(), atol=1e-4, rtol=1e-5)
    assert (y - lin(x)).abs().max() < 0.05
    monkeypatch.setattr(kernels, "has_int_mm", lambda: False)
    with torch.no_grad():
        assert torch.equal(layer(x), y)  # the int32 fallback computes the same integers


def test_kernels_step_aside_for_gradients():
    lin = torch.nn.Linear(128, 64)
    for scheme in ("int8", "int4", "w8a8"):
        layer = QuantLinear(lin, scheme)
        x = torch.randn(3, 128, requires_grad=True)
        y = layer(x)
        if scheme != "w8a8":  # weight-only kernels: with a gradient wanted, the exact blockwise product runs
            assert torch.allclose(y, F.linear(x, layer.dequantize(), lin.bias), atol=1e-5)
        y.sum().backward()
        assert torch.allclose(x.grad, layer.dequantize().sum(0).expand(3, -1), atol=1e-5)
