"""Merging deltas into a quantized base: dequantize, merge, quantize again, and the price reported per layer and on
held-out outputs; a delta trained on another scheme, or one that cannot merge, is refused with nothing changed."""

from __future__ import annotations

import pytest
import torch

from deltaformer import delta
from deltaformer.delta.base import DeltaError
from deltaformer.delta.wrappers import DeltaWrapper
from deltaformer.errors import QuantError
from deltaformer.quant.base import QuantizedLinear
from deltaformer.quant.merge import merge_and_measure, merge_quantized

from .test_delta_routing import padded_batch, perturb
from .test_qlora import LLAMA_VOCAB, bert, llama, packed


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def with_mergeable_deltas(scheme: str):
    model = bert(scheme)
    delta.attach(model, delta.IA3Config(init=False), "ia3")
    delta.attach(model, delta.BitFitConfig(), "bitfit")
    delta.attach(model, delta.LoraConfig(r=4, alpha=8.0, targets=("query", "value", "mlp.up"), init=False), "lora")
    perturb(model)
    delta.set_active(model, ["ia3", "bitfit", "lora"])
    return model


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_merged_quantized_model_matches_the_delta_within_the_reported_price(scheme):
    model = with_mergeable_deltas(scheme)
    query = model.backbone.layers[0].attn.query
    lora = query.part("lora")
    s = lora.slot("lora")
    want = query.quantized.dequantize() + lora.scales[s] * lora.B[s, :, :4] @ lora.A[s, :4]  # W + (alpha/r) B A
    batch = padded_batch()
    report = merge_and_measure(model, [batch])
    assert not any(isinstance(m, DeltaWrapper) for m in model.modules()) and not delta.deltas(model)
    new = model.backbone.layers[0].attn.query
    assert isinstance(new, QuantizedLinear) and new.scheme == scheme
    got = new.dequantize()
    cost = next(c for c in report.layers if c.name == "backbone.layers.0.attn.query")
    error = ((got - want).norm() / want.norm()).item()
    assert cost.relative_error == pytest.approx(error, rel=1e-4)
    assert 0 < error < (0.02 if scheme == "int8" else 0.15)
    assert cost.update_error is not None and cost.update_error > 0
    assert {c.name.rsplit(".", 2)[-1] for c in report.layers} >= {"query", "key", "value", "down", "up"}  # IA3 too
    out = report.outputs
    assert out is not None and out.examples == 4 and out.perplexity_before is None
    assert 0 < out.logits_relative_change < (0.05 if scheme == "int8" else 0.3)
    assert 0.0 <= out.agreement <= 1.0
    text = report.format()
    assert "backbone.layers.0.attn.query" in text and "logits change" in text
    assert report.to_json()["mean_relative_error"] > 0


def test_llama_perplexity_on_held_out_text_is_reported():
    model = llama("nf4")
    delta.attach(model, delta.LoraConfig(r=4, targets="all-linear", init=False), "d")
    ids = torch.randint(3, LLAMA_VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    report = merge_and_measure(model, [{"input_ids": ids}])
    out = report.outputs
    assert out is not None and out.perplexity_before is not None and out.perplexity_after is not None
    assert out.perplexity_before > 1 and out.perplexity_change_percent is not None
    assert abs(out.perplexity_change_percent) < 20
    assert "perplexity" in report.format()
    assert all(isinstance(m, QuantizedLinear) for n, m in model.named_modules() if n.endswith(("q_proj", "mlp.up")))


def test_merging_a_delta_trained_on_another_scheme_is_refused_and_changes_nothing():
    model = with_mergeable_deltas("int8")
    before = packed(model)
    structure = [type(m).__name__ for m in model.modules()]
    with pytest.raises(QuantError, match="trained on a nf4 base, and this base is quantized with int8"):
        merge_quantized(model, scheme="nf4")
    assert [type(m).__name__ for m in model.modules()] == structure
    assert all(torch.equal(packed(model)[k], v) for k, v in before.items())
    assert set(delta.deltas(model)) == {"ia3", "bitfit", "lora"}


def test_unmergeable_or_left_over_deltas_are_refused():
    model = bert("nf4")
    delta.attach(model, delta.LoraConfig(r=2, init=False), "lora")
    delta.attach(model, delta.PrefixConfig(num_virtual_tokens=2), "prefix")
    with pytest.raises(QuantError, match="prefix delta 'prefix' cannot merge"):
        merge_quantized(model)
    with pytest.raises(QuantError, match="would drop unmerged delta"):
        merge_quantized(model, "lora")
    assert set(delta.deltas(model)) == {"lora", "prefix"}
    plain = bert("nf4")
    with pytest.raises(DeltaError, match="no deltas attached"):
        merge_quantized(plain)
