"""Every delta method on a frozen quantized base (BERT and Llama): it trains (loss falls, gradients reach only
delta and head parameters, through the dequantized tiles), routes per sample exactly as on an fp32 base, saves
and reloads, refuses an in-place merge, and keeps no fp32 copy of any quantized weight alive."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch import nn

from deltaformer import delta
from deltaformer.config import BertConfig, LlamaConfig
from deltaformer.delta.base import DeltaError
from deltaformer.delta.wrappers import DeltaQuantLinear
from deltaformer.models import BertForSequenceClassification, LlamaForCausalLM
from deltaformer.quant.base import QuantizedLinear
from deltaformer.quant.layers import quantize

from .test_delta_routing import VOCAB, cases, check_outputs, padded_batch, perturb

METHODS = {
    "lora": lambda: delta.LoraConfig(r=4, targets="all-linear"),
    "ia3": lambda: delta.IA3Config(),
    "bitfit": lambda: delta.BitFitConfig(),
    "adapter": lambda: delta.AdapterConfig(bottleneck=8),
    "pfeiffer": lambda: delta.AdapterConfig(kind="pfeiffer", bottleneck=8),
    "prefix": lambda: delta.PrefixConfig(num_virtual_tokens=4),
    "ptuning2": lambda: delta.PTuningV2Config(num_virtual_tokens=4),
    "prompt": lambda: delta.PromptConfig(num_virtual_tokens=4, init="random"),
    "ptuning": lambda: delta.PTuningConfig(num_virtual_tokens=4),
}
LLAMA_VOCAB = 99


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def bert(scheme: str = "nf4") -> BertForSequenceClassification:
    """A random 2-layer BERT, 64 wide (a whole NF4 block per row), every linear but the head quantized.
    40 positions, so no base tensor shares a quantized weight's shape (the memory checks look for those)."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=40, initializer_range=0.2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, extra={"num_labels": 3})
    return quantize(BertForSequenceClassification(config).eval(), scheme, skip=("classifier",))


def llama(scheme: str = "nf4") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=LLAMA_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.1)
    return quantize(LlamaForCausalLM(config).eval(), scheme, skip=("lm_head",))


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, QuantizedLinear | DeltaQuantLinear)]


def weight_shapes(model: nn.Module) -> set[tuple[int, int]]:
    return {(m.out_features, m.in_features) for m in quantized_layers(model)}


def packed(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantized layers' packed tensors and biases, by state-dict name."""
    paths = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear | DeltaQuantLinear)]
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.rpartition(".")[0] in paths and k.rpartition(".")[2] in ("weight_q", "scale", "scale_codes", "zero", "bias")}


def batch_for(arch: str) -> dict[str, torch.Tensor]:
    if arch == "bert":
        batch = padded_batch((9, 6, 4))
        return {**batch, "labels": torch.tensor([0, 2, 1])}
    ids = torch.randint(3, LLAMA_VOCAB, (3, 7), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_on_a_quantized_base(arch, method):
    model = bert() if arch == "bert" else llama()
    assert len(quantized_layers(model)) >= 12
    before = packed(model)
    assert len(before) >= 24
    delta.attach(model, METHODS[method](), "d")
    delta.freeze_base(model)
    own = {id(p) for p in delta.delta_parameters(model)} | {id(p) for p in delta.head_parameters(model)}
    assert all(id(p) in own for p in model.parameters() if p.requires_grad)
    if method in ("lora", "ia3", "bitfit", "adapter", "pfeiffer"):
        assert any(isinstance(m, DeltaQuantLinear) for m in model.modules()), "no quantized layer carries the delta"
    batch = batch_for(arch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for step in range(8):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        if step == 0:
            with_grad = {id(p) for p in model.parameters() if p.grad is not None}
            assert with_grad <= own
            deltas_with_grad = [p for p in delta.delta_parameters(model) if p.grad is not None and p.grad.abs().sum() > 0]
            assert deltas_with_grad, f"no gradient reached the {method} delta through the quantized layers"
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    after = packed(model)
    for name, value in before.items():  # the packed base is untouched by training
        assert torch.equal(after[name], value), name


@pytest.mark.parametrize("scheme", ["int8", "zeropoint", "llm_int8", "nf4"])
def test_lora_gradients_through_each_scheme_match_the_dequantized_fp32_base(scheme):
    """The input gradient through a quantized layer is the one through its dequantized weight."""
    model = bert(scheme)
    delta.attach(model, delta.LoraConfig(r=4, init=False, targets=("query",), layers=(0,)), "d")
    delta.freeze_base(model)
    reference = bert(scheme)
    for name, module in list(reference.named_modules()):  # the same weights, dequantized into plain Linears
        if isinstance(module, QuantizedLinear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                plain.weight.copy_(module.dequantize())
                if module.bias is not None:
                    plain.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, plain)
    delta.attach(reference, delta.LoraConfig(r=4, init=False, targets=("query",), layers=(0,)), "d")
    delta.freeze_base(reference)
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "lora" in k or "classifier" in k},
                              strict=False)
    batch = batch_for("bert")
    grads = []
    for m in (model, reference):
        m(**batch).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in delta.delta_parameters(m)]))
    if scheme == "llm_int8":  # its forward quantizes activations too: close to the fp32 gradient, not equal
        assert (grads[0] - grads[1]).norm() < 0.1 * grads[1].norm()
    else:
        torch.testing.assert_close(grads[0], grads[1], atol=1e-4 * grads[1].abs().max().item(), rtol=0)


ROUTED = ["lora", "ia3", "bitfit", "adapter-houlsby", "adapter-pfeiffer", "prefix", "ptuning2", "prompt-random",
          "ptuning-lstm"]


@pytest.mark.parametrize("case", ROUTED)
def test_routed_batch_on_a_quantized_base_matches_each_sample_alone(case):
    model = bert("int8")
    for name, config in zip(("a", "b", "unused"), cases()[case]):
        delta.attach(model, config, name)
    perturb(model)
    batch = padded_batch()
    with torch.no_grad():
        check_outputs(model, batch, ["a", "b", None, "a"])
        check_outputs(model, batch, ["b"] * 4)


def real_rows(out, rows: int) -> list[torch.Tensor]:
    """Per row, the logits of its 7 real positions (soft prompt tokens come first, padding is marked)."""
    mask = out.attention_mask if out.attention_mask is not None else torch.ones(rows, out.logits.shape[1])
    return [row[m.bool()][-7:] for row, m in zip(out.logits, mask)]


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt", "ia3"])
def test_routed_llama_rows_on_a_quantized_base_match_each_row_alone(method):
    model = llama("nf4")
    base_ids = {id(p) for p in model.parameters()}
    for name in ("a", "b"):
        delta.attach(model, METHODS[method](), name)
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in base_ids:
                p.add_(0.2 * torch.randn_like(p))
        ids = torch.randint(3, LLAMA_VOCAB, (2, 7))
        alone = {}
        for name in ("a", "b", None):
            for row in range(2):
                if name is None:
                    with delta.bare(model):
                        out = model(ids[row:row + 1])
                else:
                    delta.set_active(model, name)
                    out = model(ids[row:row + 1])
                alone[name, row] = real_rows(out, 1)[0]
        for names in (["a", "b"], ["b", None]):
            with delta.route(model, names):
                out = model(ids, attention_mask=torch.ones(2, 7, dtype=torch.long))
            for row, name in enumerate(names):
                torch.testing.assert_close(real_rows(out, 2)[row], alone[name, row], atol=1e-5, rtol=0)


def test_no_fp32_copy_of_a_quantized_weight_is_saved_or_kept():
    model = bert("nf4")
    shapes = weight_shapes(model)
    delta.attach(model, delta.LoraConfig(r=4, targets="all-linear", init=False), "d")
    delta.freeze_base(model)
    for module in model.modules():
        if isinstance(module, DeltaQuantLinear):
            assert "weight" not in module._parameters and "weight" not in module._buffers
    assert not any(k.endswith(".weight") and "lora" not in k and k.rsplit(".", 2)[-2] in ("query", "up", "down")
                   for k in model.state_dict())
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch_for("bert")).loss
    leaked = [s for s, dtype in saved if s in shapes and dtype.is_floating_point]
    assert not leaked, f"autograd saved weight-shaped fp tensors {leaked}"
    assert saved, "the hook saw nothing: the check checks nothing"
    loss.backward()
    del loss
    gc.collect()
    warnings.simplefilter("ignore", FutureWarning)  # isinstance() on torch's deprecated module attributes
    own = {id(t) for t in [*model.parameters(), *model.buffers()]} | {
        id(p.grad) for p in model.parameters() if p.grad is not None}
    alive = [tuple(o.shape) for o in gc.get_objects()
             if isinstance(o, torch.Tensor) and id(o) not in own and o.is_floating_point() and tuple(o.shape) in shapes]
    assert not alive, f"fp32 tensors shaped like quantized weights outlive the step: {alive}"


def test_packed_tensors_keep_their_names_move_with_the_model_and_detach_restores_the_layer():
    model = bert("nf4")
    names = set(model.state_dict())
    delta.attach(model, delta.LoraConfig(r=2), "d")
    wrapped = model.backbone.layers[0].attn.query
    assert isinstance(wrapped, DeltaQuantLinear)
    assert {n for n in model.state_dict() if ".lora." not in n} == names
    model.double()  # float buffers (block scales) convert in the shared tables, seen by the packed layer too
    assert wrapped.quantized.scale.dtype == torch.float64
    model.float()
    delta.detach(model, "d")
    assert isinstance(model.backbone.layers[0].attn.query, QuantizedLinear)
    assert set(model.state_dict()) == names


def test_merging_into_a_quantized_base_in_place_is_refused_and_changes_nothing():
    model = bert("nf4")
    delta.attach(model, delta.LoraConfig(r=2, init=False), "d")
    before = packed(model)
    with pytest.raises(DeltaError, match="quantized"):
        delta.merge(model, "d")
    assert delta.deltas(model) == {"d": "lora"} and not delta.delta_parameters(model)[0].grad
    after = packed(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_delta_saved_on_a_quantized_base_reloads_and_predicts_the_same(tmp_path):
    model = bert("nf4")
    delta.attach(model, delta.LoraConfig(r=4, init=False, targets="all-linear"), "d")
    batch = padded_batch()
    with torch.no_grad():
        want = model(**batch).logits
    delta.save_delta(model, tmp_path / "d", "d")
    fresh = bert("nf4")
    delta.load_delta(fresh, tmp_path / "d")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, want, atol=1e-6, rtol=0)
