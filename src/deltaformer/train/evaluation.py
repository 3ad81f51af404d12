"""Evaluating and predicting with a classifier over a dataset, sharded across processes when distributed."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from .distributed import DistEnv, all_reduce_sum
from .metrics import confusion_matrix, scores


def move(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked for (CPU and CUDA both support it), else nothing."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _loader(dataset: Sequence, collate: Callable, batch_size: int, env: DistEnv) -> DataLoader:
    # Each rank takes every world_size-th example (no padding, so no example counts twice); a private
    # generator keeps the loader from drawing on the global RNG that dropout in training depends on.
    shard: Any = Subset(cast(Any, dataset), range(env.rank, len(dataset), env.world_size)) if env.distributed else dataset  # a sequence is a map-style dataset
    return DataLoader(shard, batch_size=batch_size, shuffle=False, collate_fn=collate,
                      generator=torch.Generator())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Sequence,
    collate: Callable,
    num_labels: int,
    batch_size: int = 64,
    env: DistEnv | None = None,
    bf16: bool = False,
) -> dict[str, float]:
    """Mean loss, accuracy and macro-F1 over ``dataset`` (examples need labels); the model's mode is kept."""
    env = env or DistEnv(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long, device=env.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    for batch in _loader(dataset, collate, batch_size, env):
        batch = move(batch, env.device)
        with autocast(env.device, bf16):
            out = model(**batch)
        n = batch["labels"].shape[0]
        loss_sum += out.loss.double() * n
        confusion += confusion_matrix(out.logits.argmax(-1), batch["labels"], num_labels).to(env.device)
    model.train(was_training)
    all_reduce_sum(confusion, env)
    all_reduce_sum(loss_sum, env)
    total = int(confusion.sum())
    return {"loss": loss_sum.item() / max(1, total), **scores(confusion.cpu()), "examples": total}


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    dataset: Sequence,
    collate: Callable,
    batch_size: int = 64,
    env: DistEnv | None = None,
    bf16: bool = False,
) -> dict[str, float]:
    """A causal LM's next-token loss over every labelled token of ``dataset`` (token-weighted, so short
    blocks count for what they hold) and its perplexity; the model's mode is kept."""
    env = env or DistEnv(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=env.device)  # loss sum, predicted tokens
    for batch in _loader(dataset, collate, batch_size, env):
        batch = move(batch, env.device)
        with autocast(env.device, bf16):
            out = model(**batch)
        n = int((batch["labels"][:, 1:] != -100).sum())
        totals += torch.stack([out.loss.double() * n, torch.tensor(float(n), dtype=torch.float64, device=env.device)])
    model.train(was_training)
    all_reduce_sum(totals, env)
    loss = totals[0].item() / max(1.0, totals[1].item())
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(totals[1].item())}


@torch.no_grad()
def predict_probabilities(
    model: nn.Module, dataset: Sequence, collate: Callable, batch_size: int = 64, bf16: bool = False
) -> torch.Tensor:
    """Softmax probabilities (N, num_labels) for every example, in order (single process)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    for batch in DataLoader(cast(Any, dataset), batch_size=batch_size, shuffle=False, collate_fn=collate):
        batch = move(batch, device)
        batch.pop("labels", None)
        with autocast(device, bf16):
            logits = model(**batch).logits
        chunks.append(logits.float().softmax(-1).cpu())
    model.train(was_training)
    return torch.cat(chunks) if chunks else torch.zeros(0, 0)
