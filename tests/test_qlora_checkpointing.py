"""Gradient checkpointing (nn/checkpointing.py, models.base.set_gradient_checkpointing): the same loss and the
same gradients as without it, with dropout on, for every delta method, on an fp32 and a quantized base, under
per-sample routing whose block closed before the backward; the chunked causal-LM loss equals the whole one;
the module tree, state dict and copies are unchanged; the trainer flag and the CLI reach it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from deltaformer import delta
from deltaformer.config import BertConfig, LlamaConfig
from deltaformer.errors import ConfigError
from deltaformer.models import BertForSequenceClassification, LlamaForCausalLM, decoder
from deltaformer.models.base import set_gradient_checkpointing
from deltaformer.nn.checkpointing import chunked_loss, is_checkpointed
from deltaformer.quant.layers import quantize

from .test_qlora import METHODS

VOCAB = 99


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def llama(quantized: bool, dropout: float = 0.1) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.1, attention_dropout=dropout)
    model = LlamaForCausalLM(config)
    return quantize(model, "nf4", skip=("lm_head",)) if quantized else model


def bert(quantized: bool) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=40, initializer_range=0.2,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, extra={"num_labels": 3})
    model = BertForSequenceClassification(config)
    return quantize(model, "nf4", skip=("classifier",)) if quantized else model


def llama_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def bert_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, VOCAB, (4, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 11:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 2])}


def loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor], seed: int = 5):
    """One training forward/backward from a fixed RNG state: the loss and every trainable parameter's gradient."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
def test_lora_on_llama_has_the_same_loss_and_gradients_with_checkpointing(quantized, monkeypatch):
    monkeypatch.setattr(decoder, "LOSS_CHUNK", 7 * VOCAB)  # the loss in chunks of 7 positions
    model = llama(quantized)
    delta.attach(model, delta.LoraConfig(r=4, alpha=8.0, dropout=0.1, targets="all-linear"), "d")
    delta.freeze_base(model)
    batch = llama_batch()
    plain = loss_and_grads(model, batch)
    assert set_gradient_checkpointing(model) == 3 and model.is_gradient_checkpointing
    assert all(is_checkpointed(layer) for layer in model.backbone.layers)
    assert model(**batch).logits is None  # the loss was computed in chunks: no whole logits
    assert_same(plain, loss_and_grads(model, batch))
    set_gradient_checkpointing(model, False)
    assert not any(is_checkpointed(layer) for layer in model.backbone.layers)
    assert model(**batch).logits is not None
    assert_same(plain, loss_and_grads(model, batch))


def test_checkpointing_saves_activation_memory_on_a_quantized_llama():
    """The autograd graph keeps each checkpointed layer's input only: far fewer saved bytes."""
    def saved_bytes(model) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**llama_batch()).loss.sum()
        return total

    model = llama(True, dropout=0.0)
    delta.attach(model, delta.LoraConfig(r=4, targets="all-linear"), "d")
    delta.freeze_base(model)
    before = saved_bytes(model)
    model.gradient_checkpointing_enable()
    assert saved_bytes(model) < before / 3


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
def test_every_delta_on_bert_has_the_same_gradients_with_checkpointing(method, quantized):
    model = bert(quantized)
    delta.attach(model, METHODS[method](), "d")
    delta.freeze_base(model)
    batch = bert_batch()
    plain = loss_and_grads(model, batch)
    model.gradient_checkpointing_enable()
    assert_same(plain, loss_and_grads(model, batch))


def test_a_backward_after_the_routing_block_closed_recomputes_with_the_forwards_routing():
    model = bert(False)
    delta.attach(model, delta.LoraConfig(r=4, targets="all-linear"), "a")
    delta.attach(model, delta.AdapterConfig(bottleneck=8), "b")
    delta.freeze_base(model)
    batch = bert_batch()
    names = ["a", "b", None, "a"]

    def run():
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        with delta.route(model, names):
            loss = model(**batch).loss
        loss.backward()  # outside the block: a recomputation must not see the model's plain state
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = run()
    model.gradient_checkpointing_enable()
    assert_same(plain, run())


def test_chunked_loss_equals_the_whole_loss_and_its_gradients():
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    targets[[0, 5, 36]] = -100
    targets[8:16] = -100  # a whole chunk ignored

    def grads(loss):
        return torch.autograd.grad(loss, [hidden, head.weight, head.bias])

    whole = F.cross_entropy(head(hidden), targets, ignore_index=-100)
    chunked = chunked_loss(head, hidden, targets, rows=8)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads(chunked), grads(whole)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="rows"):
        chunked_loss(head, hidden, targets, rows=0)


def test_names_state_dict_copies_and_evaluation_are_unchanged():
    model = llama(False)
    delta.attach(model, delta.LoraConfig(r=4, targets="all-linear"), "d")
    names = [n for n, _ in model.named_parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.gradient_checkpointing_enable()
    assert [n for n, _ in model.named_parameters()] == names
    assert model.state_dict().keys() == state.keys()
    twin = copy.deepcopy(model)  # the copy's layers run themselves, not the original's
    assert all(is_checkpointed(layer) for layer in twin.backbone.layers)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.01)
    batch = llama_batch()
    assert_same(loss_and_grads(twin, batch), loss_and_grads(twin, batch))
    model.eval()
    twin.eval()
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, twin(**batch).logits)


def test_a_kv_cache_runs_unrecomputed_in_training_mode():
    model = llama(False, dropout=0.0)
    ids = llama_batch()["input_ids"]
    reference = model(ids).logits
    model.gradient_checkpointing_enable()
    model.train()
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    first = model(ids[:, :12], cache=cache).logits
    second = model(ids[:, 12:], cache=cache, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(torch.cat([first, second], 1), reference, rtol=1e-5, atol=1e-5)


def test_a_model_without_a_layer_stack_is_refused():
    with pytest.raises(ConfigError, match="no layer stack"):
        set_gradient_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_the_trainer_flag_and_the_cli_turn_it_on(tmp_path):
    from deltaformer.cli.finetune import train_config_from_args
    from deltaformer.cli.main import build_parser
    from deltaformer.data.collate import Encoded, PadCollator
    from deltaformer.train.trainer import TrainConfig, Trainer

    args = build_parser().parse_args(["finetune", "minilm", "--task", "rt-polarity", "--out", str(tmp_path / "x"),
                                      "--gradient-checkpointing"])
    assert train_config_from_args(args).gradient_checkpointing
    model = bert(True)
    delta.attach(model, delta.LoraConfig(r=4), "d")
    delta.freeze_base(model)
    rows = [Encoded(list(range(5, 5 + n)), [0] * n, n % 3) for n in range(4, 12)]
    config = TrainConfig(epochs=1, batch_size=4, lr=1e-3, progress=False, device="cpu", gradient_checkpointing=True)
    Trainer(model, config, rows, PadCollator(0), tmp_path / "run").train()
    assert model.is_gradient_checkpointing
