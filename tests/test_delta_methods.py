"""Delta lifecycle on tiny random models: merging, frozen-base training, several named deltas, files,
parameter counts and per-layer probe features."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltaformer import delta
from deltaformer.delta.base import DeltaError, DeltaWrapper, StackedDelta
from deltaformer.models import BertModel
from deltaformer.train.probe import layer_features

from .test_delta_routing import padded_batch, perturb, sample, tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: these models are tiny, and on a shared machine a second thread only waits."""
    torch.set_num_threads(1)


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def structure(model: nn.Module) -> list[tuple[str, str]]:
    return [(name, type(m).__name__) for name, m in model.named_modules()]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def base_names(model: nn.Module) -> list[str]:
    """Names of base (non-delta, non-head) parameters."""
    own = {id(p) for p in delta.delta_parameters(model)} | {id(p) for p in delta.head_parameters(model)}
    return [n for n, p in model.named_parameters() if id(p) not in own]


# --- merging ----------------------------------------------------------------------------------------

MERGEABLE = {
    "lora": lambda: delta.LoraConfig(r=4, alpha=8.0, targets=("query", "value", "mlp.up"), init=False),
    "ia3": lambda: delta.IA3Config(init=False),
    "bitfit": lambda: delta.BitFitConfig(),
}


@pytest.mark.parametrize("method", list(MERGEABLE))
def test_merge_keeps_outputs_and_unmerge_restores_base(method):
    model = tiny_model()
    batch = padded_batch()
    base_state, base_out = snapshot(model), logits(model, batch)
    delta.attach(model, MERGEABLE[method](), "d")
    perturb(model)
    unmerged = logits(model, batch)
    assert not torch.allclose(unmerged, base_out, atol=1e-3)
    delta.merge(model, "d")
    merged_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(logits(model, batch), unmerged, atol=1e-5, rtol=0)
    assert any(not torch.equal(merged_weights[n], base_state[n]) for n in base_state if n in merged_weights)
    delta.unmerge(model, "d")
    for name, value in base_state.items():
        torch.testing.assert_close(model.state_dict()[name], value, atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(logits(model, batch), unmerged, atol=1e-5, rtol=0)
    delta.merge(model, "d")
    delta.detach(model, "d")  # detaching a merged delta unmerges it first
    assert set(model.state_dict()) == set(base_state)
    torch.testing.assert_close(logits(model, batch), base_out, atol=1e-5, rtol=0)


def test_merge_of_several_active_deltas_equals_their_composition():
    model = tiny_model()
    batch = padded_batch()
    for name, make in MERGEABLE.items():
        delta.attach(model, make(), name)
    perturb(model)
    delta.set_active(model, list(MERGEABLE))
    composed = logits(model, batch)
    base_state = {k: v for k, v in snapshot(model).items() if "lora" not in k and "ia3" not in k}
    delta.set_active(model, None)
    base_out = logits(model, batch)
    delta.set_active(model, list(MERGEABLE))
    delta.merge(model)  # attach order is lora, ia3, bitfit; merging must follow the order parts apply
    torch.testing.assert_close(logits(model, batch), composed, atol=1e-5, rtol=0)
    with pytest.raises(delta.DeltaError, match="unmerge"):
        with delta.bare(model):
            pass
    delta.unmerge(model)
    for name, value in base_state.items():
        torch.testing.assert_close(model.state_dict()[name], value, atol=1e-6, rtol=0, msg=name)
    with delta.bare(model):  # weights agree to 1e-6 (above); logits of these large-init models to 1e-5
        torch.testing.assert_close(logits(model, batch), base_out, atol=1e-5, rtol=0)


def test_merges_at_different_times_keep_outputs_and_unmerge_in_reverse():
    model = tiny_model()
    batch = padded_batch()
    base_state = snapshot(model)
    delta.attach(model, MERGEABLE["lora"](), "first")
    delta.attach(model, MERGEABLE["ia3"](), "second")
    delta.set_active(model, ["first", "second"])
    delta.merge(model, "first")
    composed = logits(model, batch)  # the runtime IA3 now scales the merged LoRA update too
    delta.merge(model, "second")
    torch.testing.assert_close(logits(model, batch), composed, atol=1e-5, rtol=0)
    with pytest.raises(DeltaError, match="unmerge 'second' first"):
        delta.unmerge(model, "first")  # out of order with IA3 merged after it: refused, nothing changed
    torch.testing.assert_close(logits(model, batch), composed, atol=1e-5, rtol=0)
    delta.unmerge(model)
    for name, value in base_state.items():
        torch.testing.assert_close(model.state_dict()[name], value, atol=1e-6, rtol=0, msg=name)


def test_merge_and_unload_writes_a_checkpoint_transformers_loads(tmp_path):
    import transformers

    model = tiny_model()
    plain = structure(model)
    batch = padded_batch()
    for name, make in MERGEABLE.items():
        delta.attach(model, make(), name)
    perturb(model)
    delta.set_active(model, list(MERGEABLE))
    want = logits(model, batch)
    merged = delta.merge_and_unload(model)
    assert structure(merged) == plain
    assert not any(isinstance(m, (DeltaWrapper, StackedDelta)) for m in merged.modules())
    assert delta.deltas(merged) == {}
    torch.testing.assert_close(logits(merged, batch), want, atol=1e-5, rtol=0)
    merged.save_pretrained(tmp_path)
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        got = hf(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


UNMERGEABLE = {
    "adapter": (lambda: delta.AdapterConfig(bottleneck=4), "non-linearity"),
    "prefix": (lambda: delta.PrefixConfig(3), "softmax"),
    "ptuning2": (lambda: delta.PTuningV2Config(3), "softmax"),
    "prompt": (lambda: delta.PromptConfig(3, init="random"), "lengthen the input"),
    "ptuning": (lambda: delta.PTuningConfig(3), "prompt encoder"),
}


@pytest.mark.parametrize("method", list(UNMERGEABLE))
def test_unmergeable_methods_refuse_and_say_why(method):
    make, reason = UNMERGEABLE[method]
    model = tiny_model()
    batch = padded_batch()
    delta.attach(model, make(), "d")
    perturb(model)
    before = logits(model, batch)
    with pytest.raises(delta.DeltaError, match=f"cannot be merged.*{reason}"):
        delta.merge(model, "d")
    with pytest.raises(delta.DeltaError, match=f"cannot merge.*{reason}"):
        delta.merge_and_unload(model)
    assert delta.deltas(model) == {"d": method}
    torch.testing.assert_close(logits(model, batch), before, atol=0, rtol=0)


# --- training ---------------------------------------------------------------------------------------

TRAINABLE = {
    "lora": lambda: delta.LoraConfig(r=2),
    "ia3": lambda: delta.IA3Config(),
    "bitfit": lambda: delta.BitFitConfig(),
    "adapter": lambda: delta.AdapterConfig(bottleneck=4),
    "pfeiffer": lambda: delta.AdapterConfig(kind="pfeiffer", bottleneck=4),
    "prefix": lambda: delta.PrefixConfig(3),
    "prefix-projection": lambda: delta.PrefixConfig(3, projection=True, encoder_hidden_size=8),
    "ptuning2": lambda: delta.PTuningV2Config(3),
    "prompt": lambda: delta.PromptConfig(3),
    "ptuning-mlp": lambda: delta.PTuningConfig(3),
    "ptuning-lstm": lambda: delta.PTuningConfig(3, encoder="lstm", encoder_hidden_size=8),
}


@pytest.mark.parametrize("method", list(TRAINABLE))
def test_training_changes_only_delta_and_head(method):
    """A few AdamW steps over *all* parameters (weight decay on): frozen base weights stay bit-for-bit."""
    model = tiny_model().train()
    delta.attach(model, TRAINABLE[method](), "d")
    delta.freeze_base(model)
    before = snapshot(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    batch = padded_batch()
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch, labels=torch.tensor([0, 1, 2, 1])).loss.backward()
        optimizer.step()
    after = dict(model.named_parameters())
    for name in base_names(model):
        assert torch.equal(after[name], before[name]), f"base weight {name} changed"
    trained = {id(p) for p in delta.delta_parameters(model)} | {id(p) for p in delta.head_parameters(model)}
    for name, p in after.items():
        if method == "prefix-projection" and name.endswith("prefix.kv"):
            continue  # a placeholder row: the MLP computes this delta's slots until export_prefix
        if id(p) in trained:
            assert p.requires_grad and not torch.equal(p, before[name]), f"{name} did not train"


# --- several deltas, activation, detach, errors -----------------------------------------------------


def test_several_named_deltas_active_bare_and_detach():
    model = tiny_model()
    batch = padded_batch()
    plain, state, base_out = structure(model), snapshot(model), logits(model, batch)
    delta.attach(model, delta.LoraConfig(r=2, init=False), "sst")
    delta.attach(model, delta.IA3Config(init=False), "news")
    delta.attach(model, delta.PromptConfig(3, init="random"), "soft")
    delta.attach(model, delta.AdapterConfig(bottleneck=4), "adapt")
    perturb(model)
    assert delta.deltas(model) == {"sst": "lora", "news": "ia3", "soft": "prompt", "adapt": "adapter"}
    assert delta.active(model) == ("adapt",)  # attach activates the newest delta alone
    outs = {}
    for name in ("sst", "news", "soft", "adapt"):
        delta.set_active(model, name)
        assert delta.active(model) == (name,)
        outs[name] = logits(model, batch)
        assert not torch.allclose(outs[name], base_out, atol=1e-3), name
        with delta.bare(model):
            assert torch.equal(logits(model, batch), base_out)
    delta.set_active(model, ["sst", "news"])
    both = logits(model, batch)
    assert not torch.allclose(both, outs["sst"], atol=1e-3) and not torch.allclose(both, outs["news"], atol=1e-3)
    delta.set_active(model, None)
    assert torch.equal(logits(model, batch), base_out)
    delta.detach(model, "news")
    delta.set_active(model, "sst")
    torch.testing.assert_close(logits(model, batch), outs["sst"], atol=1e-6, rtol=0)
    for name in ("sst", "soft", "adapt"):
        delta.detach(model, name)
    assert structure(model) == plain and delta.deltas(model) == {}
    assert model.backbone.prompt is None
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(logits(model, batch), base_out)


def test_attach_errors_are_clear_and_leave_the_model_unchanged():
    model = tiny_model()
    delta.attach(model, delta.LoraConfig(r=2), "a")
    plain = structure(model)
    with pytest.raises(delta.DeltaError, match="must be letters, digits"):
        delta.attach(model, delta.LoraConfig(r=2), "bad.name")
    with pytest.raises(delta.DeltaError, match="already attached"):
        delta.attach(model, delta.IA3Config(), "a")
    with pytest.raises(delta.DeltaError, match="matched no module"):
        delta.attach(model, delta.LoraConfig(targets=("nonexistent",)), "b")
    with pytest.raises(delta.DeltaError, match="matched no module"):
        delta.attach(model, delta.BitFitConfig(targets=("nothing_here",)), "c")
    with pytest.raises(delta.DeltaError, match="needs a delta config"):
        delta.attach(model, {"r": 2}, "d")  # type: ignore[arg-type]
    assert structure(model) == plain and delta.deltas(model) == {"a": "lora"}
    with pytest.raises(delta.DeltaError, match="no delta named 'zzz'"):
        delta.set_active(model, "zzz")
    with pytest.raises(delta.DeltaError, match="no delta named 'zzz'"):
        delta.detach(model, "zzz")
    with pytest.raises(delta.DeltaError, match="no deltas attached"):
        delta.set_active(tiny_model(), "a")


# --- files ------------------------------------------------------------------------------------------

OWN_FORMAT = {
    "bitfit": lambda: delta.BitFitConfig(targets=("query", "attn_norm", "mlp.down")),
    "adapter": lambda: delta.AdapterConfig(bottleneck=4, non_linearity="gelu"),
    "pfeiffer": lambda: delta.AdapterConfig(kind="pfeiffer", bottleneck=6, residual=False),
    "ptuning-mlp": lambda: delta.PTuningConfig(3, encoder_hidden_size=16),
    "ptuning-lstm": lambda: delta.PTuningConfig(3, encoder="lstm"),
    "ptuning-placeholder": lambda: delta.PTuningConfig(2, placeholder_id=7),
    "ptuning2": lambda: delta.PTuningV2Config(3, position_offset=False),
}


@pytest.mark.parametrize("method", list(OWN_FORMAT))
def test_save_and_load_round_trip(method, tmp_path):
    model = tiny_model()
    config = OWN_FORMAT[method]()
    delta.attach(model, config, "task")
    perturb(model)
    with torch.no_grad():
        model.classifier.weight.mul_(-2.0)  # the head travels with the delta
    batch = padded_batch(placeholders=2)
    want = logits(model, batch)
    delta.save_delta(model, tmp_path, "task")
    fresh = tiny_model()
    assert not torch.allclose(logits(fresh, batch), want, atol=1e-3)
    delta.attach(fresh, OWN_FORMAT[method](), "other")  # the loaded delta lands in slot 1 of the stacks
    delta.load_delta(fresh, tmp_path)
    assert delta.deltas(fresh) == {"other": config.method, "task": config.method}
    assert delta.active(fresh) == ("task",)
    assert fresh.delta_router.deltas["task"].config == config
    torch.testing.assert_close(logits(fresh, batch), want, atol=1e-6, rtol=0)


# --- parameter counts -------------------------------------------------------------------------------


def test_trainable_summary_counts_lora_by_hand():
    model = tiny_model()
    delta.attach(model, delta.LoraConfig(r=4, targets=("query", "value")), "l")
    delta.freeze_base(model)
    summary = delta.trainable_summary(model)
    per_module = 4 * (32 + 32)  # A (r, in) + B (out, r) on a 32 -> 32 projection
    head = 32 * 3 + 3
    assert summary["methods"]["lora"]["params"] == per_module * 2 * 2  # 2 modules x 2 layers
    assert summary["modules"]["attn.query"] == summary["modules"]["attn.value"] == per_module * 2
    assert summary["methods"]["head"]["params"] == head
    assert summary["trainable"] == per_module * 4 + head
    assert summary["base"] == sum(p.numel() for p in tiny_model().parameters())
    assert "full" not in summary["methods"]


def test_trainable_summary_counts_bitfit_by_hand():
    model = tiny_model()
    delta.attach(model, delta.BitFitConfig(), "b")
    delta.freeze_base(model)
    summary = delta.trainable_summary(model)
    # per layer: query, key, value, attn.out, attn_norm, mlp.down, mlp_norm (32 each) and mlp.up (64)
    per_layer = 7 * 32 + 64
    embeddings_norm = pooler = 32
    assert summary["methods"]["bitfit"]["params"] == 2 * per_layer + embeddings_norm + pooler
    assert summary["modules"]["mlp.up"] == 2 * 64
    assert summary["trainable"] == 2 * per_layer + embeddings_norm + pooler + 32 * 3 + 3


# --- probe features ---------------------------------------------------------------------------------


def test_layer_features_layers_and_cls():
    model = tiny_model().train()
    batches = [padded_batch(), padded_batch((5, 3))]
    features = layer_features(model, batches)
    assert features.shape == (3, 6, 32) and not features.requires_grad
    assert model.training  # the caller's mode is restored
    with torch.no_grad():
        model.eval()
        states = model.backbone(**batches[0], output_hidden_states=True).hidden_states
    torch.testing.assert_close(features[0, :4], states[0][:, 0])  # layer 0 = the embedding output
    torch.testing.assert_close(features[2, :4], states[2][:, 0])
    with pytest.raises(delta.DeltaError, match="pooling 'max'"):
        layer_features(model, batches, pooling="max")


def test_layer_features_mean_pooling_ignores_padding():
    model = BertModel(tiny_model().config)
    batch = padded_batch()
    batch["input_ids"] = batch["input_ids"] + 500 * (1 - batch["attention_mask"])  # padding ids are not 0
    features = layer_features(model, [batch], pooling="mean")
    for b in range(4):
        alone = layer_features(model, [sample(batch, b)], pooling="mean")
        torch.testing.assert_close(features[:, b], alone[:, 0], atol=1e-5, rtol=0)


def test_layer_features_mean_pooling_with_routed_prompt_deltas():
    """Soft tokens are part of what the model reads: routed and single runs pool the same positions."""
    model = tiny_model()
    delta.attach(model, delta.PromptConfig(3, init="random"), "p3")
    delta.attach(model, delta.PTuningConfig(5), "p5")
    batch = padded_batch()
    names = ["p3", None, "p5", "p3"]
    with delta.route(model, names):
        features = layer_features(model, [batch], pooling="mean")
    for b, name in enumerate(names):
        delta.set_active(model, name)
        alone = layer_features(model, [sample(batch, b)], pooling="mean")
        torch.testing.assert_close(features[:, b], alone[:, 0], atol=1e-5, rtol=0)


def test_layer_features_needs_input_ids_and_an_encoder():
    with pytest.raises(delta.DeltaError, match="no input_ids"):
        layer_features(tiny_model(), [{"attention_mask": torch.ones(1, 3)}])
    with pytest.raises(delta.DeltaError, match="no encoder layers"):
        layer_features(nn.Linear(2, 2), [])
