"""The training loop: AdamW over trainable parameters, warmup + decay, accumulation, clipping, bf16,
periodic evaluation, best-weights keeping, early stopping, exact resume and torchrun data parallel.

Determinism is by construction: the run is seeded once at its start; each epoch's order is a function of
``seed + epoch`` (:class:`~deltaformer.train.distributed.ResumableSampler`); the data loader draws from its own
generator, never the global one; and a checkpoint stores every generator's state with the data position,
so a run killed at any step and resumed reaches bit-identical weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..checkpoints.io import atomic_write, load_state_dict, remove_partial_writes, save_state_dict
from ..errors import CheckpointError, ConfigError
from ..models.base import set_gradient_checkpointing
from .checkpoint import TrainingCheckpoint, load_checkpoint, save_checkpoint
from .distributed import DistEnv, ResumableSampler, all_reduce_sum, barrier, init_distributed
from .evaluation import autocast, evaluate, move
from .logs import MetricsLog, plot_metrics
from .schedule import SCHEDULES, make_scheduler
from .seeding import capture_rng, restore_rng, seed_everything

log = logging.getLogger("deltaformer")

CHECKPOINT = "checkpoint.safetensors"
BEST = "best.safetensors"
METRICS = "metrics.jsonl"
PLOT = "metrics.png"
RESULTS = "results.json"

#: TrainConfig fields that do not shape a run (where it runs, what it shows, how often it logs or saves): a
#: resumed run may change them. Any other change would continue the run under settings it did not start with
#: (the learning-rate schedule, for one, is fixed by the original length), so resuming refuses it.
RESUME_FREE = frozenset({"progress", "device", "log_every", "save_every", "eval_batch_size", "checkpoint_full_model",
                         "gradient_checkpointing"})


@dataclass
class TrainConfig:
    """Settings of one training run; ``batch_size`` is per process and per micro-batch."""

    epochs: int = 3
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    bf16: bool = False
    eval_every: int | None = None  # optimizer steps; None evaluates at the end of each epoch
    save_every: int | None = None  # optimizer steps; checkpoints are also written at every evaluation
    eval_batch_size: int = 64
    metric: str = "accuracy"  # "accuracy", "macro_f1" (higher is better) or "loss"
    patience: int | None = None  # evaluations without improvement before stopping early
    load_best: bool = True  # end with the weights of the best evaluation
    seed: int = 0
    max_steps: int | None = None  # stop after N optimizer steps (overrides epochs)
    log_every: int = 10
    progress: bool = True
    device: str | None = None
    checkpoint_full_model: bool = False  # else only trainable parameters (the delta and head)
    #: Recompute each layer (and a causal LM's loss, in chunks) in the backward instead of keeping activations:
    #: less memory, about one more forward of time, the same gradients (``models.base.set_gradient_checkpointing``).
    gradient_checkpointing: bool = False

    def check(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.metric not in ("accuracy", "macro_f1", "loss"):
            raise ConfigError(f"unknown metric {self.metric!r}: use accuracy, macro_f1 or loss")
        for name in ("epochs", "batch_size", "grad_accum", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_eval: dict[str, float] | None = None
    last_eval: dict[str, float] | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    examples_seen: int = 0
    # what the next train log record averages over; checkpointed so a resumed run logs the same numbers
    window_loss: float = 0.0
    window_steps: int = 0
    window_examples: int = 0


@dataclass
class Trainer:
    """Train ``model`` (whose forward takes a collated batch with ``labels`` and returns ``.loss``/``.logits``).

    ``run_dir`` receives ``metrics.jsonl``, ``metrics.png``, ``results.json``, ``checkpoint.safetensors`` (the
    resumable state) and ``best.safetensors`` (trainable weights of the best evaluation).
    """

    model: nn.Module
    config: TrainConfig
    train_data: Sequence
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    run_dir: Path
    eval_data: Sequence | None = None
    num_labels: int | None = None
    on_step: Callable[[int], None] | None = None
    env: DistEnv = field(default_factory=DistEnv)
    #: ``evaluator(model, dataset, collate, batch_size, env, bf16) -> metrics`` for models that are not
    #: classifiers (causal LMs: :func:`~deltaformer.train.evaluation.evaluate_lm`); default: classification.
    evaluator: Callable[..., dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self.config.check()
        self.run_dir = Path(self.run_dir)
        if self.num_labels is None:
            self.num_labels = int(getattr(getattr(self.model, "config", None), "num_labels", 2))
        self.metrics_log = MetricsLog(self.run_dir / METRICS)

    # ---- public ---------------------------------------------------------------------------------------

    def train(self, resume: bool = False) -> dict[str, Any]:
        """Run (or, with ``resume``, continue) training; returns what ``results.json`` holds."""
        cfg = self.config
        self.env = env = init_distributed(cfg.device)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for path in remove_partial_writes(self.run_dir):
                log.warning("removed %s, left by a write that was interrupted", path.name)
        model = self.model.to(env.device)
        model.train()
        if cfg.gradient_checkpointing:
            set_gradient_checkpointing(model, True)
        seed_everything(cfg.seed)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError("the model has no trainable parameters: check the method (nothing to train)")
        self.params = [p for _, p in named]
        optimizer = torch.optim.AdamW(_param_groups(named, cfg.weight_decay), lr=cfg.lr)

        sampler = ResumableSampler(self.train_data, env.world_size, env.rank, seed=cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        loader: DataLoader = DataLoader(cast(Any, self.train_data), batch_size=cfg.batch_size, sampler=sampler,
                            collate_fn=self.collate, generator=generator)
        batches_per_epoch = len(loader)
        steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
        total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
        scheduler = make_scheduler(optimizer, total_steps, round(cfg.warmup_ratio * total_steps), cfg.schedule)

        progress = Progress()
        ckpt_path = self.run_dir / CHECKPOINT
        if resume and ckpt_path.is_file():
            progress = self._restore(ckpt_path, model, optimizer, scheduler, generator)
            log.warning("resuming %s at step %d (epoch %d)", self.run_dir, progress.global_step, progress.epoch)
        elif env.is_main:
            if resume:
                log.warning("no checkpoint in %s: starting from the beginning", self.run_dir)
            self.metrics_log.reset()  # a fresh run in an old directory must not resume or report stale state
            for stale in (BEST, CHECKPOINT, RESULTS, PLOT,
                          *(p.name for p in self.run_dir.glob("rng-rank*.safetensors"))):
                (self.run_dir / stale).unlink(missing_ok=True)
        barrier(env)

        wrapped: nn.Module = model
        if env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            wrapped = DistributedDataParallel(model, device_ids=ids)

        bar = tqdm(total=total_steps, initial=progress.global_step, disable=not (cfg.progress and env.is_main),
                   desc="train", dynamic_ncols=True, leave=True)
        window_start = segment_start = time.perf_counter()
        seconds_before = progress.train_seconds
        max_epochs = math.inf if cfg.max_steps else cfg.epochs
        done = progress.global_step >= total_steps or progress.stopped_early
        while not done and progress.epoch < max_epochs:
            sampler.set_epoch(progress.epoch)
            sampler.skip = progress.step_in_epoch * cfg.grad_accum * cfg.batch_size
            remaining = batches_per_epoch - progress.step_in_epoch * cfg.grad_accum
            batches = iter(loader)
            while remaining > 0 and not done:
                group = min(cfg.grad_accum, remaining)
                self._optimizer_step(wrapped, batches, group, optimizer, scheduler, progress)
                remaining -= group
                progress.global_step += 1
                progress.step_in_epoch += 1
                end_of_epoch = remaining == 0
                if end_of_epoch:
                    progress.epoch += 1
                    progress.step_in_epoch = 0
                done = progress.global_step >= total_steps
                bar.update(1)

                step = progress.global_step
                if step % cfg.log_every == 0 or done or end_of_epoch:
                    self._log_train(progress, float(scheduler.get_last_lr()[0]), steps_per_epoch,
                                    time.perf_counter() - window_start, bar)
                    window_start = time.perf_counter()

                evaluated = False
                if self.eval_data is not None and (
                    (cfg.eval_every and step % cfg.eval_every == 0) or (not cfg.eval_every and end_of_epoch) or done
                ):
                    evaluated = True
                    if self._evaluate(model, progress, step, steps_per_epoch):
                        done = True
                progress.train_seconds = seconds_before + time.perf_counter() - segment_start
                if evaluated or end_of_epoch or done or (cfg.save_every and step % cfg.save_every == 0):
                    self._save(ckpt_path, model, optimizer, scheduler, generator, progress)
                if self.on_step is not None:
                    self.on_step(step)
        bar.close()
        return self._finish(model, progress, total_steps)

    def evaluate(self, dataset: Sequence) -> dict[str, float]:
        """Metrics of the current model on ``dataset``."""
        return self._metrics(self.model, dataset)

    def _metrics(self, model: nn.Module, dataset: Sequence) -> dict[str, Any]:
        cfg = self.config
        if self.evaluator is not None:
            return self.evaluator(model, dataset, self.collate, cfg.eval_batch_size, self.env, cfg.bf16)
        return evaluate(model, dataset, self.collate, self.num_labels or 2, cfg.eval_batch_size, self.env, cfg.bf16)

    # ---- internals ------------------------------------------------------------------------------------

    def _optimizer_step(self, wrapped: nn.Module, batches, group: int, optimizer, scheduler,
                        progress: Progress) -> None:
        """Forward/backward ``group`` micro-batches (gradients all-reduced only on the last), clip, step."""
        cfg, env = self.config, self.env
        step_loss = torch.zeros((), device=env.device)
        for i in range(group):
            batch = move(next(batches), env.device)
            sync = not env.distributed or i == group - 1
            with contextlib.nullcontext() if sync else cast(DistributedDataParallel, wrapped).no_sync():
                with autocast(env.device, cfg.bf16):
                    loss = wrapped(**batch).loss / group
                loss.backward()
            step_loss += loss.detach().float()
            progress.window_examples += int(batch["labels"].shape[0])
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.window_loss += step_loss.item()
        progress.window_steps += 1

    def _log_train(self, progress: Progress, lr: float, steps_per_epoch: int, seconds: float, bar) -> None:
        """One ``train`` record: loss averaged over the steps (and processes) since the last record."""
        stats = torch.tensor([progress.window_loss, progress.window_steps, progress.window_examples],
                             dtype=torch.float64, device=self.env.device)
        all_reduce_sum(stats, self.env)
        step = progress.global_step
        record = {"split": "train", "step": step, "epoch": round(step / steps_per_epoch, 4),
                  "loss": stats[0].item() / stats[1].item(), "lr": lr,
                  "examples_per_second": stats[2].item() / max(1e-9, seconds)}
        progress.examples_seen += int(stats[2].item())
        progress.window_loss, progress.window_steps, progress.window_examples = 0.0, 0, 0
        if self.env.is_main:
            self.metrics_log.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", ex_s=f"{record['examples_per_second']:.1f}")

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.config.checkpoint_full_model:
            return dict(model.state_dict())
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def _evaluate(self, model: nn.Module, progress: Progress, step: int, steps_per_epoch: int) -> bool:
        """Evaluate, keep the best weights, and say whether to stop early."""
        cfg = self.config
        assert self.eval_data is not None  # only called with evaluation data
        result = self._metrics(model, self.eval_data)
        progress.last_eval = result
        if self.env.is_main:
            self.metrics_log.append({"split": "validation", "step": step,
                                     "epoch": round(step / steps_per_epoch, 4), **result})
        value = result[cfg.metric]
        better = progress.best_metric is None or (
            value < progress.best_metric if cfg.metric == "loss" else value > progress.best_metric
        )
        if better:
            progress.best_metric, progress.best_step, progress.best_eval = value, step, result
            progress.bad_evals = 0
            if self.env.is_main:
                save_state_dict(self.trainable_state(model), self.run_dir / BEST,
                                metadata={"step": str(step), cfg.metric: repr(value)})
        else:
            progress.bad_evals += 1
        if self._chatty():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "examples")
            tqdm.write(f"step {step}: validation {shown}")
        if cfg.patience is not None and progress.bad_evals >= cfg.patience:
            progress.stopped_early = True
            if self._chatty():
                tqdm.write(f"stopping early: no improvement in {cfg.patience} evaluation(s)")
            return True
        return False

    def _chatty(self) -> bool:
        return self.config.progress and self.env.is_main

    def _save(self, path: Path, model: nn.Module, optimizer, scheduler, generator, progress: Progress) -> None:
        rng_meta, rng_tensors = capture_rng(generator)
        if self.env.rank > 0:  # ranks draw different dropout masks: each keeps its own RNG beside the checkpoint
            rank_file = path.with_name(f"rng-rank{self.env.rank}.safetensors")
            save_state_dict(rng_tensors, rank_file, metadata={"rng": json.dumps(rng_meta)})
        barrier(self.env)
        if self.env.is_main:
            save_checkpoint(path, TrainingCheckpoint(
                model=self.trainable_state(model), optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), rng_meta=rng_meta, rng_tensors=rng_tensors,
                state={"progress": asdict(progress), "config": asdict(self.config),
                       "world_size": self.env.world_size},
            ))
        barrier(self.env)

    def _restore(self, path: Path, model: nn.Module, optimizer, scheduler, generator) -> Progress:
        ckpt = load_checkpoint(path)
        expected = self.trainable_state(model)
        missing = sorted(set(expected) - set(ckpt.model))
        if missing:
            raise CheckpointError(
                f"checkpoint {path} lacks trainable weight {missing[0]} (and {len(missing) - 1} more): it was "
                "made with another method or model; resume with the same settings or use a new --out"
            )
        changed = settings_differences(ckpt.state.get("config", {}), asdict(self.config), RESUME_FREE)
        if changed:
            raise ConfigError(f"checkpoint {path} was made with {', '.join(changed)}: resume with the settings the run "
                              "started with, or start a new run in another directory")
        if ckpt.state.get("world_size", 1) != self.env.world_size:
            log.warning("checkpoint was written by %s process(es), resuming with %d: data order changes",
                        ckpt.state.get("world_size"), self.env.world_size)
        with torch.no_grad():
            for name, tensor in expected.items():
                tensor.copy_(ckpt.model[name])
        optimizer.load_state_dict(ckpt.optimizer)
        scheduler.load_state_dict(ckpt.scheduler)
        rng_meta, rng_tensors = ckpt.rng_meta, ckpt.rng_tensors
        rank_file = path.with_name(f"rng-rank{self.env.rank}.safetensors")
        if self.env.rank > 0 and rank_file.is_file():
            from safetensors import safe_open

            with safe_open(str(rank_file), framework="pt") as fh:
                rng_meta = json.loads(fh.metadata()["rng"])
                rng_tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        restore_rng(rng_meta, rng_tensors, generator)
        progress = Progress(**ckpt.state["progress"])
        if self.env.is_main:
            self.metrics_log.truncate(progress.global_step)
        return progress

    def _finish(self, model: nn.Module, progress: Progress, total_steps: int) -> dict[str, Any]:
        """Load the best weights (if asked), write results.json and the plot."""
        best = self.run_dir / BEST
        barrier(self.env)
        if self.config.load_best and progress.best_step is not None and best.is_file():
            state = load_state_dict(best)
            with torch.no_grad():
                for name, tensor in self.trainable_state(model).items():
                    if name in state:
                        tensor.copy_(state[name])
        results = {
            "steps": progress.global_step,
            "total_steps": total_steps,
            "epochs_completed": progress.epoch,
            "stopped_early": progress.stopped_early,
            "best_step": progress.best_step,
            "validation": progress.best_eval if self.config.load_best else progress.last_eval,
            "last_validation": progress.last_eval,
            "train_seconds": round(progress.train_seconds, 3),
            "examples_per_second": round(progress.examples_seen / max(1e-9, progress.train_seconds), 2),
            "world_size": self.env.world_size,
        }
        if self.env.is_main:
            write_json(self.run_dir / RESULTS, results)
            plot_metrics(self.metrics_log.read(), self.run_dir / PLOT, self.config.metric)
        return results


def _param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm weights (the usual BERT recipe); decay elsewhere."""
    no_decay = [p for n, p in named if n.endswith("bias") or "norm" in n.lower()]
    decay = [p for n, p in named if not (n.endswith("bias") or "norm" in n.lower())]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def settings_differences(saved: dict[str, Any], now: dict[str, Any], free: frozenset[str] = frozenset()) -> list[str]:
    """``name=old (now new)`` for each setting outside ``free`` that differs. A name ``saved`` lacks was not
    recorded by the version that wrote it, so there is nothing to compare it with."""
    return [f"{name}={saved[name]!r} (now {value!r})" for name, value in now.items()
            if name in saved and name not in free and saved[name] != value]


def write_json(path: Path, data: Any) -> None:
    """Pretty JSON, written atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
