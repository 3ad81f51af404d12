"""Trainer: schedules, checkpoint round trip, in-process crash + resume, accumulation, early stopping, outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deltaformer.config import BertConfig
from deltaformer.data.collate import Encoded, PadCollator
from deltaformer.errors import CheckpointError, ConfigError
from deltaformer.models import BertForSequenceClassification
from deltaformer.train import TrainConfig, Trainer, load_checkpoint, save_checkpoint
from deltaformer.train.checkpoint import TrainingCheckpoint
from deltaformer.train.schedule import WarmupDecay


def tiny_model(dropout: float = 0.1, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=32, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(config)


def toy_data(n: int = 48, seed: int = 1) -> list[Encoded]:
    """Sequences of varying length whose label is whether token 7 appears: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        ids = torch.randint(8, 60, (length,), generator=g).tolist()
        label = int(torch.rand(1, generator=g) < 0.5)
        if label:
            ids[int(torch.randint(1, length, (1,), generator=g))] = 7
        data.append(Encoded([2, *ids, 3], [0] * (length + 2), label))
    return data


def config(**changes) -> TrainConfig:
    base = dict(epochs=2, batch_size=4, lr=3e-3, eval_every=3, log_every=2, progress=False, load_best=False)
    return TrainConfig(**{**base, **changes})


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if atol:
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)
        else:
            assert torch.equal(a[name], b[name]), name


def test_schedule_warmup_then_decay():
    linear = WarmupDecay(total_steps=10, warmup_steps=2, kind="linear")
    values = [linear(s) for s in range(10)]
    assert values[0] < values[1] < values[2] == 1.0
    assert all(x > y for x, y in zip(values[2:], values[3:]))
    assert linear(10) == 0.0
    cosine = WarmupDecay(total_steps=10, warmup_steps=0, kind="cosine")
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    assert WarmupDecay(10, 3, "constant")(9) == 1.0
    with pytest.raises(ValueError):
        WarmupDecay(10, 0, "step")


def test_checkpoint_round_trip_restores_optimizer_exactly(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = PadCollator()(toy_data(4))
    model(**batch).loss.backward()
    optimizer.step()
    ckpt = TrainingCheckpoint(model=dict(model.named_parameters()), optimizer=optimizer.state_dict(),
                              scheduler={"last_epoch": 3}, rng_meta={"python": [1]},
                              rng_tensors={"rng.torch": torch.get_rng_state()}, state={"progress": {"epoch": 1}})
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, ckpt)
    loaded = load_checkpoint(path)
    assert_same(loaded.model, {k: v.detach() for k, v in model.named_parameters()})
    other = torch.optim.AdamW(tiny_model().parameters(), lr=1e-3)
    other.load_state_dict(loaded.optimizer)
    for a, b in zip(optimizer.state_dict()["state"].values(), other.state_dict()["state"].values()):
        assert_same(a, b)
    assert other.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert loaded.state == {"progress": {"epoch": 1}} and loaded.scheduler == {"last_epoch": 3}
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", [4, 7])
def test_crash_and_resume_in_process_gives_identical_weights(tmp_path, crash_at):
    data, held_out = toy_data(40), toy_data(12, seed=2)
    settings = dict(grad_accum=2, save_every=1)  # 5 optimizer steps per epoch, dropout on
    reference = tiny_model()
    ref_results = Trainer(reference, config(**settings), data, PadCollator(), tmp_path / "ref",
                          eval_data=held_out).train()

    def crash(step: int) -> None:
        if step == crash_at:
            raise Crash

    interrupted = tiny_model()
    with pytest.raises(Crash):
        Trainer(interrupted, config(**settings), data, PadCollator(), tmp_path / "run", eval_data=held_out,
                on_step=crash).train()
    resumed = tiny_model(seed=123)  # different fresh weights: everything trainable must come from the checkpoint
    results = Trainer(resumed, config(**settings), data, PadCollator(), tmp_path / "run",
                      eval_data=held_out).train(resume=True)
    assert_same(weights(resumed), weights(reference))
    assert results["validation"] == ref_results["validation"]
    strip = [{k: v for k, v in r.items() if k != "examples_per_second"}
             for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    ref = [{k: v for k, v in r.items() if k != "examples_per_second"}
           for r in map(json.loads, (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines())]
    assert strip == ref


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    data = toy_data(32)
    big = tiny_model(dropout=0.0)
    Trainer(big, config(batch_size=8, eval_every=None), data, PadCollator(), tmp_path / "a").train()
    small = tiny_model(dropout=0.0)
    Trainer(small, config(batch_size=4, grad_accum=2, eval_every=None), data, PadCollator(),
            tmp_path / "b").train()
    assert_same(weights(big), weights(small), atol=1e-5)


def test_run_outputs_best_checkpoint_and_early_stopping(tmp_path):
    model = tiny_model()
    cfg = config(epochs=5, lr=1e-9, eval_every=2, patience=2, load_best=True, max_grad_norm=None)
    results = Trainer(model, cfg, toy_data(24), PadCollator(), tmp_path, eval_data=toy_data(8, seed=3)).train()
    # with a negligible learning rate accuracy never improves after the first evaluation
    assert results["stopped_early"] and results["best_step"] == 2 and results["steps"] == 6
    for name in ("metrics.jsonl", "metrics.png", "results.json", "checkpoint.safetensors", "best.safetensors"):
        assert (tmp_path / name).is_file(), name
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "validation"] == [2, 4, 6]
    assert {"loss", "lr", "examples_per_second"} <= set(records[0])
    assert json.loads((tmp_path / "results.json").read_text())["best_step"] == 2


def test_only_trainable_parameters_are_checkpointed_and_trained(tmp_path):
    model = tiny_model()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    Trainer(model, config(epochs=1, bf16=True), toy_data(16), PadCollator(), tmp_path).train()
    assert set(load_checkpoint(tmp_path / "checkpoint.safetensors").model) == {"classifier.weight", "classifier.bias"}
    assert_same(frozen, {k: v for k, v in weights(model).items() if not k.startswith("classifier.")})


def test_bad_settings_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="schedule"):
        Trainer(tiny_model(), config(schedule="step"), toy_data(4), PadCollator(), tmp_path)
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        Trainer(model, config(), toy_data(4), PadCollator(), tmp_path).train()


def test_resume_refuses_a_checkpoint_of_another_method(tmp_path):
    Trainer(tiny_model(), config(epochs=1, max_steps=1), toy_data(8), PadCollator(), tmp_path).train()
    model = tiny_model()
    model.register_parameter("extra_delta", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(CheckpointError, match="another method"):
        Trainer(model, config(epochs=2), toy_data(8), PadCollator(), tmp_path).train(resume=True)


def test_warmup_steps_are_a_fraction_of_total(tmp_path):
    model = tiny_model()
    Trainer(model, config(epochs=1, warmup_ratio=0.5, log_every=1, eval_every=None), toy_data(16), PadCollator(),
            tmp_path).train()
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] < lrs[1] and lrs[1] > lrs[2] and math.isclose(lrs[-1], 0.0, abs_tol=1e-12)
