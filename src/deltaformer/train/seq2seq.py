"""Sequence-to-sequence runs: train an encoder-decoder on a text-to-text task, write with it, score ROUGE.

What ``deltaformer finetune MODEL --task bbc-headlines`` and ``deltaformer evaluate RUN`` call for seq2seq
tasks. MODEL is a named size of the original Transformer (:data:`SIZES`, fresh weights, with a WordPiece
tokenizer trained on the task's training split unless one is given) or an encoder-decoder checkpoint
(LED, a saved Transformer) with its tokenizer. Training is the shared :class:`~deltaformer.train.trainer.Trainer`
with teacher forcing (the model shifts the labels right behind its start token; the Transformer's loss is
label-smoothed by its config), keeping the checkpoint of lowest validation loss. Writing is
:func:`deltaformer.generation.generate` (greedy or beam search); ROUGE is
:func:`~deltaformer.train.metrics.rouge_scores`.

Run directory: ``run.json`` (``task_type: "seq2seq"``), the trainer's files, ``model/`` (config.json,
model.safetensors and the tokenizer, loadable by :func:`deltaformer.models.auto.load_model`) and
``results.json`` with the test split's ROUGE.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TransformerConfig
from ..data.collate import Seq2SeqCollator, Seq2SeqEncoded, encode_pairs
from ..data.tasks import SPLITS, TextPair, load_seq2seq_task
from ..errors import CheckpointError, ConfigError
from ..models.base import PreTrainedModel
from .distributed import DistEnv, all_reduce_sum, barrier, init_distributed
from .evaluation import _loader, autocast, move
from .finetune import _check_out, model_reference, peak_memory_mb
from .metrics import rouge_scores
from .runs import _read_json_object
from .seeding import seed_everything
from .trainer import RESULTS, TrainConfig, Trainer, write_json

TASK_TYPE = "seq2seq"
#: Fresh Transformers by name: (layers per stack, d_model, heads, feed-forward width).
SIZES = {"transformer-tiny": (2, 128, 4, 512), "transformer-small": (3, 256, 4, 1024),
         "transformer-base": (6, 512, 8, 2048)}


@dataclass
class Seq2SeqSpec:
    """Everything a seq2seq ``deltaformer finetune`` takes."""

    model: str
    out: Path
    task: str
    tokenizer: str | None = None
    vocab_size: int = 8000
    max_source_length: int | None = None  # default: the task's
    max_target_length: int | None = None
    beams: int = 4
    dropout: float = 0.1
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-4, metric="loss"))
    resume: bool = False
    overwrite: bool = False
    limit: int | None = None  # first N examples of each split: quick runs


def settings(model: nn.Module) -> Any:
    """An encoder-decoder's config (LEDConfig, TransformerConfig: both name the tokens generation needs)."""
    return model.config


def is_fresh(model: str) -> bool:
    return model in SIZES


def fresh_transformer(size: str, tokenizer: Any, max_positions: int, dropout: float = 0.1) -> PreTrainedModel:
    """A Transformer of a named size over ``tokenizer``'s vocabulary ([CLS] starts, [SEP] ends, [PAD] pads)."""
    from ..models.transformer import TransformerForConditionalGeneration

    layers, dim, heads, ffn = SIZES[size]
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in (("pad", tokenizer.pad_token),
                                                               ("start", tokenizer.cls_token or tokenizer.bos_token),
                                                               ("end", tokenizer.sep_token or tokenizer.eos_token))}
    if any(v is None for v in ids.values()):
        raise ConfigError("the tokenizer needs pad, start ([CLS] or bos) and end ([SEP] or eos) tokens")
    config = TransformerConfig(vocab_size=len(tokenizer), d_model=dim, nhead=heads, num_encoder_layers=layers,
                               num_decoder_layers=layers, dim_feedforward=ffn, dropout=dropout,
                               max_position_embeddings=max_positions, pad_token_id=ids["pad"],
                               bos_token_id=ids["start"], eos_token_id=ids["end"], decoder_start_token_id=ids["start"])
    return TransformerForConditionalGeneration(config)


def load_seq2seq_model(path: str | Path) -> PreTrainedModel:
    """An encoder-decoder checkpoint (its saved class); anything else is refused."""
    from ..generation.sessions import is_encoder_decoder
    from ..models.auto import load_model

    model = load_model(path)
    if not is_encoder_decoder(model):
        raise ConfigError(f"{path} holds a {type(model).__name__}, not an encoder-decoder: sequence-to-sequence "
                          f"tasks need one (a fresh {' / '.join(SIZES)}, a Transformer or LED checkpoint)")
    return model


def collator_for(model: nn.Module) -> Seq2SeqCollator:
    """Padding with the model's pad id; LED's Longformer encoder also gets [CLS] as its global token."""
    config = settings(model)
    return Seq2SeqCollator(config.pad_token_id or 0, global_first=config.model_type == "led")


def source_limit(model: nn.Module) -> int:
    config = settings(model)
    return int(getattr(config, "max_encoder_position_embeddings", config.max_position_embeddings))


@torch.no_grad()
def evaluate_seq2seq_loss(model: nn.Module, dataset: Sequence, collate: Any, batch_size: int = 64,
                          env: DistEnv | None = None, bf16: bool = False) -> dict[str, float]:
    """The training loss over every target token of ``dataset`` (token-weighted); the model's mode is kept."""
    env = env or DistEnv(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=env.device)
    for batch in _loader(dataset, collate, batch_size, env):
        batch = move(batch, env.device)
        with autocast(env.device, bf16):
            loss = model(**batch).loss
        n = int((batch["labels"] != -100).sum())
        totals += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=env.device)
    model.train(was_training)
    all_reduce_sum(totals, env)
    return {"loss": totals[0].item() / max(1.0, totals[1].item()), "tokens": int(totals[1].item())}


@torch.no_grad()
def write_targets(model: nn.Module, tokenizer: Any, data: Sequence[Seq2SeqEncoded], max_new_tokens: int,
                  beams: int = 4, batch_size: int = 32, bf16: bool = False) -> list[str]:
    """Generated text for each example of ``data``, in order (greedy for ``beams=1``), special tokens dropped."""
    from ..generation import generate

    device = next(model.parameters()).device
    collate = collator_for(model)
    texts: list[str] = []
    for start in range(0, len(data), batch_size):
        batch = move(collate(list(data[start:start + batch_size])), device)
        with autocast(device, bf16):
            ids = generate(model, batch["input_ids"], batch["attention_mask"],
                           global_attention_mask=batch.get("global_attention_mask"),
                           max_new_tokens=max_new_tokens, num_beams=beams)
        texts += tokenizer.batch_decode(ids.cpu().tolist(), skip_special_tokens=True)
    return texts


def score(model: nn.Module, tokenizer: Any, pairs: Sequence[TextPair], max_source_length: int,
          max_target_length: int, beams: int, batch_size: int = 32, bf16: bool = False,
          samples: int = 3) -> dict[str, Any]:
    """ROUGE-1/2/L F1 of the model's outputs for ``pairs`` against their targets, and a few samples."""
    config = settings(model)
    start = time.perf_counter()
    encoded = encode_pairs(tokenizer, pairs, max_source_length, max_target_length, config.eos_token_id)
    written = write_targets(model, tokenizer, encoded, max_target_length, beams, batch_size, bf16)
    references = [p.target for p in pairs]
    return {**rouge_scores(written, references), "decoding": "greedy" if beams == 1 else f"beam {beams}",
            "generate_seconds": round(time.perf_counter() - start, 2),
            "samples": [{"reference": r, "generated": g} for r, g in zip(references, written)][:samples]}


def finetune_seq2seq(spec: Seq2SeqSpec) -> dict[str, Any]:
    """Train, save the run and score the test split; returns the run's results (also in results.json)."""
    from ..tokenizer import AutoTokenizer, train_tokenizer

    wall = time.perf_counter()
    out = Path(spec.out)
    _check_out(out, spec.resume, spec.overwrite)
    for name, value, least in (("beams", spec.beams, 1), ("limit", spec.limit, 1), ("vocab_size", spec.vocab_size, 10),
                               ("max_target_length", spec.max_target_length, 2),
                               ("max_source_length", spec.max_source_length, 2)):
        if value is not None and value < least:
            raise ConfigError(f"{name} must be at least {least}, got {value}")
    task = load_seq2seq_task(spec.task)
    splits = {name: task.split(name)[:spec.limit] for name in SPLITS}
    source_length = spec.max_source_length or task.max_source_length
    target_length = spec.max_target_length or task.max_target_length
    if spec.train.metric != "loss":
        raise ConfigError("sequence-to-sequence runs keep the checkpoint of lowest validation loss: drop --metric")
    seed_everything(spec.train.seed)  # fresh weights are drawn from the seed
    if is_fresh(spec.model):
        if spec.tokenizer is not None:
            tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer)
        else:
            texts = [t for p in splits["train"] for t in (p.source, p.target)]
            tokenizer = train_tokenizer(texts, "wordpiece", spec.vocab_size)
        model = fresh_transformer(spec.model, tokenizer, max(source_length, target_length), spec.dropout)
    else:
        model = load_seq2seq_model(spec.model)
        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or spec.model)
    if source_length > source_limit(model):
        raise ConfigError(f"--max-length {source_length} is above the model's {source_limit(model)} source "
                          "positions: lower it")
    eos = settings(model).eos_token_id
    encoded = {name: encode_pairs(tokenizer, pairs, source_length, target_length, eos) for name, pairs in splits.items()}
    info = {"format": 1, "task_type": TASK_TYPE, "base_model": model_reference(spec.model), "method": "full",
            "data": {"task": spec.task, **({"limit": spec.limit} if spec.limit else {})},
            "max_source_length": source_length, "max_target_length": target_length, "beams": spec.beams,
            "train_config": asdict(spec.train)}
    env = init_distributed(spec.train.device)
    if env.is_main:  # under torchrun every process trains; the main one writes
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "run.json", info)
    barrier(env)
    trainer = Trainer(model, spec.train, encoded["train"], collator_for(model), out,
                      eval_data=encoded["validation"] or None, evaluator=evaluate_seq2seq_loss)
    results = trainer.train(resume=spec.resume)
    model_dir = out / "model"
    if env.is_main:
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    if splits["test"] and env.is_main:
        results["test"] = score(model, tokenizer, splits["test"], source_length, target_length, spec.beams,
                                spec.train.eval_batch_size, spec.train.bf16)
    results.update({"task": spec.task, "model": spec.model, "seed": spec.train.seed,
                    "total_parameters": sum(p.numel() for p in model.parameters()),
                    "split_sizes": {k: len(v) for k, v in encoded.items()},
                    "wall_seconds": round(time.perf_counter() - wall, 2),
                    "peak_memory_mb": peak_memory_mb(trainer.env.device)})
    if env.is_main:
        write_json(out / RESULTS, results)
    barrier(env)
    return results


def is_seq2seq_run(directory: str | Path) -> bool:
    path = Path(directory) / "run.json"
    return path.is_file() and _read_json_object(path).get("task_type") == TASK_TYPE


def evaluate_seq2seq_run(directory: str | Path, split: str = "test", beams: int | None = None,
                         batch_size: int = 32, device: str = "cpu", limit: int | None = None) -> dict[str, Any]:
    """ROUGE of a seq2seq run's saved model on a split of its task (``beams``: the run's unless given)."""
    from ..tokenizer import AutoTokenizer

    directory = Path(directory)
    info = _read_json_object(directory / "run.json")
    model_dir = directory / "model"
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{directory} has no trained model yet (no model/config.json): finish or resume the run")
    model = load_seq2seq_model(model_dir).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = load_seq2seq_task(info["data"]["task"])
    pairs = task.split(split)[:limit]
    if not pairs:
        raise ConfigError(f"nothing to evaluate: {task.name}/{split} is empty")
    result = score(model, tokenizer, pairs, info["max_source_length"], info["max_target_length"],
                   beams or info.get("beams", 4), batch_size)
    return {"data": f"{task.name}/{split}", **result}
