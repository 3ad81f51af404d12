"""A tiny Transformer trained from scratch (the library's trainer, teacher forcing, label smoothing) copies,
reverses and sorts held-out sequences exactly, greedy and beam search alike; training is repeatable."""

from __future__ import annotations

import pytest
import torch

from deltaformer.config import TransformerConfig
from deltaformer.data.collate import Seq2SeqCollator
from deltaformer.data.synthetic import END, PAD, START, synthetic_task, vocab_size
from deltaformer.data.tabular import DataError
from deltaformer.generation import generate
from deltaformer.models.transformer import TransformerForConditionalGeneration
from deltaformer.train.seeding import seed_everything
from deltaformer.train.trainer import TrainConfig, Trainer


@pytest.fixture
def one_thread():
    """Tiny products run fastest on one thread (and two threads on a busy machine spin against each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0) -> TransformerForConditionalGeneration:
    seed_everything(seed)
    return TransformerForConditionalGeneration(TransformerConfig(
        vocab_size=vocab_size(10), d_model=64, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
        dim_feedforward=128, dropout=0.0, max_position_embeddings=16, label_smoothing=0.1, pad_token_id=PAD,
        bos_token_id=START, eos_token_id=END, decoder_start_token_id=START))


def train(model, data, run_dir, epochs: int, max_steps: int | None = None, lr: float = 1e-3) -> list[float]:
    config = TrainConfig(epochs=epochs, max_steps=max_steps, batch_size=32, lr=lr, warmup_ratio=0.05, seed=0,
                         progress=False, log_every=5)
    trainer = Trainer(model, config, data, Seq2SeqCollator(PAD), run_dir)
    trainer.train()
    return [r["loss"] for r in trainer.metrics_log.read() if r["split"] == "train"]


def exact_match(model, test, beams: int) -> float:
    batch = Seq2SeqCollator(PAD)(test)
    ids = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=12, num_beams=beams)
    right = 0
    for row, example in zip(ids[:, 1:].tolist(), test):  # drop the start token
        right += row[:row.index(END) + 1 if END in row else len(row)] == example.labels
    return right / len(test)


@pytest.mark.parametrize(("task", "epochs", "lr"), [("copy", 6, 1e-3), ("reverse", 6, 1e-3), ("sort", 8, 2e-3)])
def test_learns_synthetic_tasks_exactly(tmp_path, one_thread, task, epochs, lr):
    """Sorting (by content, counting repeats: [12, 12, 12] is the hard case) takes more training to get
    exactly right than copying by position."""
    train_data, test_data = synthetic_task(task, train_size=3000, test_size=200, seed=1)
    model = tiny_model()
    losses = train(model, train_data, tmp_path, epochs=epochs, lr=lr)
    assert losses[-1] < 0.5 * losses[0]
    assert exact_match(model, test_data, beams=1) == 1.0
    assert exact_match(model, test_data, beams=3) == 1.0


def test_training_is_repeatable_under_a_seed(tmp_path, one_thread):
    data, _ = synthetic_task("reverse", train_size=320, test_size=10)
    runs = []
    for i in range(2):
        model = tiny_model(seed=3)
        losses = train(model, data, tmp_path / str(i), epochs=1, max_steps=10)
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_synthetic_splits_are_disjoint_and_checked():
    train_data, test_data = synthetic_task("sort", train_size=500, test_size=100, seed=2)
    assert not {tuple(e.input_ids) for e in train_data} & {tuple(e.input_ids) for e in test_data}
    example = test_data[0]
    assert example.labels == sorted(example.input_ids[:-1]) + [END] and example.input_ids[-1] == END
    with pytest.raises(DataError, match="unknown synthetic task"):
        synthetic_task("shuffle")
    with pytest.raises(DataError, match="distinct sequences"):
        synthetic_task("copy", train_size=100, test_size=10, symbols=2, min_length=1, max_length=3)
