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


def test_code_books_equal_bitsandbytes_fp4():
    assert torch.equal(schemes.fp4_levels(), bnbf.get_4bit_type("fp4", device="cpu"))


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(96, 128), (300, 192)])
def test_4bit_bit_equal_to_bitsandbytes(kind, double_quant, shape):
    torch.manual_seed(0)
    w = torch.randn(*shape) * 0.05
    w[3, :64] = 0.0  # an all-zero block
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=kind, compress_statistics=double_quant)
    ours = schemes.four_bit(w, kind, blocksize=64, double_quant=double_quant)
    assert torch.equal(q.view(-1), ours.packed)
    if double_quant:
        assert torch.equal(state.absmax, ours.absmax_codes)  # the 8-bit scale codes, every near-tie included
        assert torch.equal(state.state2.absmax, ours.absmax_scale)
        assert float(state.offset) == ours.offset
    else:
        assert torch.equal(state.absmax, ours.absmax)
    assert torch.equal(bnbf.dequantize_4bit(q, state), ours.rows(0, shape[0]))
    a, b = 5, 37  # any row slice equals the same rows of the whole dequantized weight
    assert torch.equal(ours.rows(a, b), ours.rows(0, shape[0])[a:b])


@pytest.mark.parametrize("n", [256 * 40, 256 * 7 + 100])
def test_blockwise_8bit_bit_equal_to_bitsandbytes(n):
    torch.manual_seed(1)
    x = torch.randn(n) * torch.logspace(-4, 0, n)  # values over four decades: the code book's small codes matter
    x[256:512] = 0.0
    q, state = bnbf.quantize_blockwise(x, blocksize=256)
    codes, absmax = schemes.quantize_blockwise_8bit(x, 256)
    assert torch.equal(q, codes) and torch.equal(state.absmax, absmax)
    assert torch.equal(bnbf.dequantize_blockwise(q, state), schemes.dequantize_blockwise_8bit(codes, absmax, 256))


def test_4bit_shape_not_fitting_the_block_is_padded_or_refused():
    w = torch.randn(10, 100) * 0.05
    with pytest.raises(QuantError, match="multiple of the block size.*pad=True"):
        schemes.nf4(w, blocksize=64)
    padded = schemes.nf4(w, blocksize=64, pad=True)
    assert padded.cols == 128 and padded.packed.numel() == 10 * 128 // 2
    back = padded.rows(0, 10)
    assert back.shape == (10, 100)
    # each row's first block is the bit-exact bitsandbytes block; the padded block holds the 36 real values
    q, state = bnbf.quantize_4bit(w[:, :64].contiguous(), blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(bnbf.dequantize_4bit(q, state), schemes.nf4(w, 64, double_quant=False, pad=True).rows(0, 10)[:, :64])
    assert (back - w).norm() / w.norm() < 0.12
    lin = torch.nn.Linear(100, 6)
    layer = QuantLinear(lin, "fp4")
    x = torch.randn(3, 100)
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.dequantize(), lin.bias), atol=1e-5)
    with pytest.raises(QuantError, match="pad=True"):
        QuantLinear(lin, "nf4", pad=False)


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


def test_zero_point_per_tensor_and_per_group_match_torch():
    w = torch.randn(24, 64) + 0.3
    q, scale, zero = schemes.int8_zero_point(w, "tensor")
    assert scale.shape == (1,) and zero.shape == (1,)
    ref = torch.quantize_per_tensor(w, float(scale), int(zero), torch.quint8)
    assert torch.equal(ref.int_repr(), q)
    assert torch.allclose(ref.dequantize(), schemes.int8_zero_point_rows(q, scale, zero), atol=1e-6, rtol=0)
    q, scale, zero = schemes.int8_zero_point(w, "group", group_size=16)
    assert scale.shape == (24, 4)
    groups = w.reshape(-1, 16)  # each group is one "channel" of torch's per-channel quantizer
    ref = torch.quantize_per_channel(groups, scale.reshape(-1).double(), zero.reshape(-1).long(), 0, torch.quint8)
    assert torch.equal(ref.int_repr().reshape(24, 64), q)
    back = schemes.int8_zero_point_rows(q, scale, zero)
    assert torch.allclose(ref.dequantize().reshape(24, 64), back, atol=1e-6, rtol=0)
    assert torch.equal(schemes.int8_zero_point_rows(q[5:9], scale[5:9], zero[5:9]), back[5:9])


def test_absmax_per_tensor_and_per_group():
    w = torch.randn(12, 64)
    w[2, 40] = 9.0  # one large weight: per tensor it sets every row's step, per group only its own group's
    q, absmax = schemes.int8_absmax(w, "tensor")
    assert absmax.shape == (1,) and float(absmax) == 9.0 and int(q[2, 40]) == 127
    assert torch.equal(q, torch.round(w * 127 / 9.0).to(torch.int8))
    qg, absg = schemes.int8_absmax(w, "group", group_size=32)
    assert absg.shape == (12, 2) and torch.equal(absg, w.reshape(12, 2, 32).abs().amax(-1))
    err = {g: (schemes.int8_absmax_rows(*schemes.int8_absmax(w, g, 32)) - w).abs().mean()
           for g in ("tensor", "channel", "group")}
    assert err["group"] < err["channel"] < err["tensor"]
    with pytest.raises(QuantError, match="multiple of the group size"):
        schemes.int8_absmax(w, "group", group_size=48)
    with pytest.raises(QuantError, match="unknown granularity"):
        schemes.int8_absmax(w, "row")


@pytest.mark.parametrize("scheme", ["int8", "zeropoint"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_quant_linear_granularities(scheme, granularity, monkeypatch):
    monkeypatch.setattr(base, "ROWS_PER_BLOCK", 16)
    lin = torch.nn.Linear(64, 40)
    q = QuantLinear(lin, scheme, granularity=granularity, group_size=32)
    q.use_kernels = False  # the blockwise product (the kernels have their own tests)
    x = torch.randn(2, 64)
    w = q.dequantize()
    assert torch.equal(torch.cat([q.rows(a, min(a + 7, 40)) for a in range(0, 40, 7)]), w)
    assert torch.allclose(q(x), torch.nn.functional.linear(x, w, lin.bias), atol=1e-5, rtol=0)
    assert (w - lin.weight).abs().max() < 0.01


@pytest.mark.parametrize("scheme", layers.SCHEMES)
def test_quant_linear_matches_dequantized_product_and_gradient(scheme, monkeypatch):
    monkeypatch.setattr(base, "ROWS_PER_BLOCK", 64)  # several blocks, a short last one
    lin = torch.nn.Linear(128, 150)
    q = QuantLinear(lin, scheme)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = q(x)
    ref = torch.nn.functional.linear(x, q.dequantize(), lin.bias)
    tol = 3e-2 if scheme in ("llm_int8", "w8a8") else 1e-5  # these also quantize the input rows to int8
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


def test_quantize_keeps_the_output_heads_fp32_by_default():
    from deltaformer.config import BertConfig, LlamaConfig
    from deltaformer.models import BertForSequenceClassification, LlamaForCausalLM

    torch.manual_seed(0)
    for tie in (True, False):
        config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                             tie_word_embeddings=tie)
        model = LlamaForCausalLM(config).eval()
        assert layers.default_skip(model) == ("lm_head",)
        assert layers.default_skip(model, tied=False) == (() if tie else ("lm_head",))
        ids = torch.randint(0, 96, (1, 7))
        with torch.no_grad():
            ref = model(ids).logits
        quantize(model, "int8")
        assert type(model.lm_head) is not QuantLinear and isinstance(model.backbone.layers[0].mlp.down, QuantLinear)
        with torch.no_grad():
            assert (model(ids).logits - ref).abs().max() < 0.05
        if tie:  # embeddings=True asks for the tied table and head to be quantized together
            fresh = quantize(LlamaForCausalLM(config).eval(), "int8", embeddings=True)
            assert isinstance(fresh.lm_head, QuantLinear)
            assert isinstance(fresh.backbone.get_input_embeddings(), layers.QuantEmbedding)
        everything = quantize(LlamaForCausalLM(config).eval(), "int8", skip=())
        assert isinstance(everything.lm_head, QuantLinear)
    bert = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1,
                                                    num_attention_heads=4, intermediate_size=128,
                                                    max_position_embeddings=16, extra={"num_labels": 2}))
    assert layers.default_skip(bert) == ("classifier",)
    quantize(bert, "nf4")
    assert type(bert.classifier) is not QuantLinear and isinstance(bert.get_submodule(next(n for n, _ in bert.named_modules() if n.endswith("pooler.dense"))), QuantLinear)
    plain = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    assert layers.default_skip(plain) == ("2",)  # a model without declared heads: its last linear
    quantize(plain, "int8")
    assert isinstance(plain[0], QuantLinear) and type(plain[2]) is torch.nn.Linear


def test_bad_input():
    with pytest.raises(QuantError, match="unknown quantization scheme"):
        QuantLinear(torch.nn.Linear(8, 8), "int3")
    with pytest.raises(QuantError, match="multiple of the block size"):
        schemes.nf4(torch.randn(4, 100), blocksize=64)
    with pytest.raises(QuantError, match="unknown 4-bit type"):
        schemes.four_bit(torch.randn(4, 64), "nf3")
    with pytest.raises(QuantError, match="per output channel only"):
        QuantLinear(torch.nn.Linear(8, 8), "llm_int8", granularity="tensor")
    with pytest.raises(QuantError, match=r"layer 0: .*group size"):
        quantize(torch.nn.Sequential(torch.nn.Linear(48, 8)), "int8", skip=(), granularity="group", group_size=32)
    bad = torch.nn.Linear(8, 8)
    bad.weight.data[0, 0] = float("nan")
    with pytest.raises(QuantError, match="NaN"):
        QuantLinear(bad, "int8")
    with pytest.raises(QuantError, match="features"):
        QuantLinear(torch.nn.Linear(8, 8), "int8")(torch.randn(2, 9))
