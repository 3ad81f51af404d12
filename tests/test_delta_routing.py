"""Per-sample routing: every sample of a mixed batch gets exactly what its own delta gives it alone.

Each method gets two deltas of different sizes (so the stacks are zero-padded) plus an unused third; a
padded batch routes samples to them and to the bare model. Outputs must equal single-sample runs, and
gradients of the routed batch must equal the sum of single-sample gradients, zero for the unused delta.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from deltaformer import delta
from deltaformer.config import BertConfig
from deltaformer.delta.base import StackedDelta
from deltaformer.models import BertForSequenceClassification

Batch = dict[str, torch.Tensor]
Names = list[str | None]

VOCAB = 4000  # MiniLM tokenizer ids of the "text" prompt init ("great movie") fit
PLACEHOLDER = 7
LENGTHS = (9, 6, 4, 8)


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: these models are tiny, and on a shared machine a second thread only waits."""
    torch.set_num_threads(1)


def tiny_model() -> BertForSequenceClassification:
    """A random 2-layer BERT without dropout (train-mode gradients are deterministic); weights at std 0.2,
    not 0.02, so logits are O(1) and a 1e-5 tolerance on them means something."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, extra={"num_labels": 3})
    return BertForSequenceClassification(config).eval()


def padded_batch(lengths: tuple[int, ...] | list[int] = LENGTHS, placeholders: int = 0) -> Batch:
    """Right-padded ids (pad id 0) with ``placeholders`` placeholder tokens after [CLS] in every sample."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (len(lengths), max(lengths)), generator=gen)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        ids[b, 1:1 + placeholders] = PLACEHOLDER
    ids[:, 0] = 101
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def sample(batch: Batch, b: int) -> Batch:
    """Sample b alone, without its padding."""
    n = int(batch["attention_mask"][b].sum())
    return {k: v[b:b + 1, :n] for k, v in batch.items()}


def perturb(model: nn.Module) -> None:
    """Move adapters and BitFit off their identity init (only parts where zero padding stays exact)."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, StackedDelta):
                for name in ("up", "up_bias", "delta"):
                    p = getattr(module, name, None)
                    if p is not None:
                        p.add_(0.3 * torch.randn(p.shape, generator=gen))


def alone(model: nn.Module, batch: Batch, b: int, name: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample b run by itself with only ``name`` active (None: the bare model), through the fast path."""
    delta.set_active(model, name)
    out = model(**sample(batch, b), output_hidden_states=True)
    return out.logits[0], out.hidden_states[-1][0]


def routed(model: nn.Module, batch: Batch, names: Names | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with delta.route(model, names):
        out = model(**batch, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def check_outputs(model: nn.Module, batch: Batch, names: Names) -> None:
    logits, hidden = routed(model, batch, names)
    for b, name in enumerate(names):
        want_logits, want_hidden = alone(model, batch, b, name)
        if name is not None:  # the delta really does something, so a wrong route would show
            assert (want_logits - alone(model, batch, b, None)[0]).abs().max() > 1e-4, f"{name} is the identity"
        torch.testing.assert_close(logits[b], want_logits, atol=1e-5, rtol=0, msg=f"sample {b} ({name})")
        n = want_hidden.shape[0]  # the sample's own positions (soft tokens + input); the rest is padding
        torch.testing.assert_close(hidden[b, :n], want_hidden, atol=1e-5, rtol=0, msg=f"sample {b} ({name})")


def text_prompt(k: int, minilm_dir: Path | None) -> delta.PromptConfig:
    """The tokenizer is MiniLM's (its directory once the fixture fetched it; the asset name only lists cases)."""
    return delta.PromptConfig(num_virtual_tokens=k, init="text", init_text="great movie",
                              tokenizer=str(minilm_dir or "minilm"))


def cases(minilm_dir: Path | None = None) -> dict[str, tuple[delta.DeltaConfig, delta.DeltaConfig, delta.DeltaConfig]]:
    """Per method: two deltas of different sizes and a third that no sample uses."""
    return {
        "lora": (delta.LoraConfig(r=2, init=False), delta.LoraConfig(r=4, alpha=2.0, targets=("query", "key", "mlp.up"),
                                                                     init=False), delta.LoraConfig(init=False)),
        "ia3": (delta.IA3Config(init=False), delta.IA3Config(init=False), delta.IA3Config(init=False)),
        "bitfit": (delta.BitFitConfig(), delta.BitFitConfig(targets=("query", "attn_norm")), delta.BitFitConfig()),
        "adapter-houlsby": (delta.AdapterConfig(bottleneck=4), delta.AdapterConfig(bottleneck=8, non_linearity="gelu"),
                            delta.AdapterConfig(bottleneck=2)),
        "adapter-pfeiffer": (delta.AdapterConfig(kind="pfeiffer", bottleneck=4),
                             delta.AdapterConfig(kind="pfeiffer", bottleneck=6, residual=False),
                             delta.AdapterConfig(kind="pfeiffer")),
        "prefix": (delta.PrefixConfig(num_virtual_tokens=2), delta.PrefixConfig(num_virtual_tokens=4, projection=True),
                   delta.PrefixConfig(num_virtual_tokens=3)),
        "ptuning2": (delta.PTuningV2Config(num_virtual_tokens=2),
                     delta.PTuningV2Config(num_virtual_tokens=5, position_offset=False),
                     delta.PTuningV2Config(num_virtual_tokens=3)),
        "prompt-random": (delta.PromptConfig(3, init="random"), delta.PromptConfig(5, init="random"),
                          delta.PromptConfig(2, init="random")),
        "prompt-vocab": (delta.PromptConfig(3, init="vocab"), delta.PromptConfig(5, init="vocab"),
                         delta.PromptConfig(2, init="vocab")),
        "prompt-text": (text_prompt(3, minilm_dir), text_prompt(5, minilm_dir), text_prompt(2, minilm_dir)),
        "ptuning-mlp": (delta.PTuningConfig(3), delta.PTuningConfig(4, encoder_hidden_size=16),
                        delta.PTuningConfig(2)),
        "ptuning-lstm": (delta.PTuningConfig(3, encoder="lstm"), delta.PTuningConfig(4, encoder="lstm"),
                         delta.PTuningConfig(2, encoder="lstm")),
        "ptuning-placeholder": (delta.PTuningConfig(2, placeholder_id=PLACEHOLDER),
                                delta.PTuningConfig(3, encoder="lstm"),
                                delta.PTuningConfig(2, placeholder_id=PLACEHOLDER)),
    }


CASES = list(cases())
NAMES = ["a", "b", None, "a"]


def with_deltas(case: str, minilm_dir: Path | None) -> nn.Module:
    model = tiny_model()
    for name, config in zip(("a", "b", "unused"), cases(minilm_dir)[case]):
        delta.attach(model, config, name)
    perturb(model)
    return model


def needs_tokenizer(case: str, request: pytest.FixtureRequest) -> Path | None:
    return request.getfixturevalue("minilm_dir") if case == "prompt-text" else None


@pytest.mark.parametrize("case", CASES)
def test_routed_batch_matches_each_sample_alone(case, request):
    model = with_deltas(case, needs_tokenizer(case, request))
    batch = padded_batch(placeholders=2 if case == "ptuning-placeholder" else 0)
    with torch.no_grad():
        check_outputs(model, batch, NAMES)
        check_outputs(model, batch, ["b", "a", "b", "a"])  # no bare sample: no keep mask
        check_outputs(model, batch, ["b"] * 4)  # one delta: the fast path


def test_route_by_index_tensor_equals_route_by_names():
    model = with_deltas("lora", None)
    batch = padded_batch()
    with torch.no_grad():
        by_names = routed(model, batch, NAMES)[0]
        by_index = routed(model, batch, torch.tensor([0, 1, -1, 0]))[0]
    torch.testing.assert_close(by_index, by_names, atol=0, rtol=0)


def mixture(minilm_dir: Path) -> nn.Module:
    """One model carrying a delta of every method (and two LoRAs)."""
    model = tiny_model()
    configs = {
        "lora": delta.LoraConfig(r=2, init=False), "lora2": delta.LoraConfig(r=3, targets=("value", "attn.out"), init=False),
        "ia3": delta.IA3Config(init=False), "bitfit": delta.BitFitConfig(), "adapter": delta.AdapterConfig(bottleneck=4),
        "pfeiffer": delta.AdapterConfig(kind="pfeiffer", bottleneck=3), "prefix": delta.PrefixConfig(3),
        "ptuning2": delta.PTuningV2Config(2), "prompt": delta.PromptConfig(4, init="random"),
        "text": text_prompt(2, minilm_dir), "ptuning": delta.PTuningConfig(3, encoder="lstm"),
        "placeholder": delta.PTuningConfig(2, placeholder_id=PLACEHOLDER), "unused": delta.LoraConfig(init=False),
    }
    for name, config in configs.items():
        delta.attach(model, config, name)
    perturb(model)
    return model


def test_routing_after_detaching_deltas(minilm_dir):
    """Detaching shifts the slots of later deltas; every stack and per-slot vector must follow."""
    model = mixture(minilm_dir)
    for name in ("lora", "ia3", "prompt", "ptuning2", "pfeiffer"):
        delta.detach(model, name)
    names = ["lora2", "prefix", "text", None, "bitfit", "adapter", "placeholder", "ptuning"]
    batch = padded_batch([4 + (3 * b) % 7 for b in range(len(names))], placeholders=2)
    with torch.no_grad():
        check_outputs(model, batch, names)


MIXED = ["lora", "prefix", "prompt", None, "ia3", "bitfit", "adapter", "pfeiffer", "ptuning2", "ptuning",
         "placeholder", "lora2", "text", "lora"]


def test_mixture_of_methods_in_one_batch(minilm_dir):
    model = mixture(minilm_dir)
    lengths = [4 + (3 * b) % 7 for b in range(len(MIXED))]
    batch = padded_batch(lengths, placeholders=2)
    with torch.no_grad():
        check_outputs(model, batch, MIXED)
        check_outputs(model, batch, ["lora", "prefix", "prompt", None] * 3 + ["lora"] * 2)


# --- training ---------------------------------------------------------------------------------------


def loss_weights(batch: int, labels: int) -> torch.Tensor:
    return torch.arange(1, batch * labels + 1, dtype=torch.float32).view(batch, labels).sin()


def loss_of(logits: torch.Tensor) -> torch.Tensor:
    """A fixed linear loss: per-sample terms add up, so batch and single-sample gradients compare."""
    return (logits * loss_weights(*logits.shape)).sum()


def grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    out = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def routed_and_summed_grads(model: nn.Module, batch: Batch, names: Names) -> tuple[dict, dict]:
    """(gradients of one routed batch, sums of single-sample gradients), by parameter name."""
    model.train()
    delta.freeze_base(model)
    with delta.route(model, names):
        loss_of(model(**batch).logits).backward()
    batched = grads(model)
    summed: dict[str, torch.Tensor] = {}
    for b, name in enumerate(names):
        delta.set_active(model, name)
        single = model(**sample(batch, b)).logits
        (single[0] * loss_weights(len(names), single.shape[1])[b]).sum().backward()
        for n, g in grads(model).items():
            if g is not None:
                summed[n] = summed[n] + g if n in summed else g
    return batched, summed


def check_grads(model: nn.Module, batch: Batch, names: Names) -> None:
    batched, summed = routed_and_summed_grads(model, batch, names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n in trainable:
        got, want = batched[n], summed.get(n)
        if want is None:
            assert got is None or not got.any(), f"{n}: no sample uses it, yet it has a gradient"
        else:
            assert got is not None, f"{n}: the routed batch gave no gradient"
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=n)
    assert all(batched[n] is None for n in set(batched) - trainable), "a frozen base weight got a gradient"
    stacked = {id(p) for p in delta.delta_parameters(model)}
    assert any(batched[n] is not None and batched[n].any() for n, p in model.named_parameters() if id(p) in stacked)


def check_unused_get_nothing(model: nn.Module, names: Names) -> None:
    """Rows of stacked parameters of deltas no sample used, and their own modules, get no gradient."""
    batch = padded_batch([6] * len(names), placeholders=2)
    model.train()
    with delta.route(model, names):
        loss_of(model(**batch).logits).backward()
    used = set(names)
    for module in model.modules():
        if not isinstance(module, StackedDelta):
            continue
        for pname in module.stacked:
            p = getattr(module, pname, None)
            if p is None:
                continue
            for slot, name in enumerate(module.slots):
                if name not in used:
                    assert p.grad is None or not p.grad[slot].any(), f"{module.method}.{pname}[{name}] got a gradient"
        for sub in ("encoders", "projections"):
            for name, encoder in getattr(module, sub, {}).items():
                if name not in used:
                    assert all(p.grad is None or not p.grad.any() for p in encoder.parameters()), name
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("case", CASES)
def test_routed_gradients_equal_sum_of_single_gradients(case, request):
    model = with_deltas(case, needs_tokenizer(case, request))
    batch = padded_batch(placeholders=2 if case == "ptuning-placeholder" else 0)
    check_grads(model, batch, NAMES)
    check_unused_get_nothing(model, NAMES)


def test_mixture_gradients_equal_sum_of_single_gradients(minilm_dir):
    model = mixture(minilm_dir)
    names = MIXED[:8] + ["ptuning2", "placeholder", "ptuning"]
    batch = padded_batch([4 + (3 * b) % 7 for b in range(len(names))], placeholders=2)
    check_grads(model, batch, names)
    check_unused_get_nothing(model, names)


# --- errors -----------------------------------------------------------------------------------------


def test_route_refuses_bad_names_and_counts():
    model = with_deltas("lora", None)
    batch = padded_batch()
    with pytest.raises(delta.DeltaError, match="no delta named 'nope'"):
        with delta.route(model, ["a", "nope", None, "a"]):
            pass
    with pytest.raises(delta.DeltaError, match="one name per sample"):
        with delta.route(model, ["a", "b"]):
            model(**batch)
    with pytest.raises(delta.DeltaError, match="positions 0..2 or -1"):
        with delta.route(model, torch.tensor([0, 5, -1, 0])):
            pass
    delta.merge(model, "a")
    with pytest.raises(delta.DeltaError, match="unmerge"):
        with delta.route(model, NAMES):
            pass
