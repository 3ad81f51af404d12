"""Fine-tune a classifier end to end: data, tokenizer, model + method, trainer, saved run, test score.

This is what ``deltaformer finetune``, ``deltaformer demo`` and the benchmark table call; it works the same
under ``torchrun`` (each process runs it; only rank 0 writes files).
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.collate import PadCollator, encode_examples
from ..data.tabular import DataError, Example, Fields, LabelMap, read_table
from ..data.tasks import load_task, stratified_split
from ..errors import ConfigError
from .distributed import barrier, init_distributed
from .evaluation import evaluate
from .methods import MethodSpec
from .runs import TASK_TYPE, build_classifier, read_run_info, save_run_model, trainable_state, write_run_info
from .seeding import seed_everything
from .trainer import CHECKPOINT, RESULTS, RESUME_FREE, TrainConfig, Trainer, settings_differences, write_json

log = logging.getLogger("deltaformer")


@dataclass
class FinetuneSpec:
    """Everything ``deltaformer finetune`` takes: data from a task or files, a method, training settings."""

    model: str
    out: Path
    method: MethodSpec = field(default_factory=lambda: MethodSpec("lora"))
    task: str | None = None
    train_file: Path | None = None
    validation_file: Path | None = None
    test_file: Path | None = None
    fields: Fields = field(default_factory=Fields)
    skip_bad_rows: bool = False
    max_length: int | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: bool = False
    overwrite: bool = False  # replace a run already in ``out`` (else only ``resume`` may use it)
    limit: int | None = None  # keep only the first N examples of each split: quick smoke runs on CPU


@dataclass
class Splits:
    labels: LabelMap
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    max_length: int
    skipped: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)


def load_splits(spec: FinetuneSpec) -> Splits:
    """Task splits, or user files (validation carved from train, 10% stratified, when not given)."""
    if (spec.task is None) == (spec.train_file is None):
        raise ConfigError("give either a task (--task) or a training file (--train), not both")
    if spec.task is not None:
        task = load_task(spec.task)
        return Splits(LabelMap(task.labels), task.split("train"), task.split("validation"), task.split("test"),
                      spec.max_length or task.max_length, source={"task": spec.task})
    assert spec.train_file is not None  # no task, so a training file (checked above)
    skipped: list[str] = []
    train = read_table(spec.train_file, spec.fields, skip_bad_rows=spec.skip_bad_rows)
    skipped += train.skipped
    labels = LabelMap.from_examples(train.examples)
    if len(labels) < 2:
        raise DataError(f"{spec.train_file}: every example has the label {labels.labels[0]!r}, and classification "
                        f"needs at least two classes: check the file and --label-field ({spec.fields.label!r})")
    if spec.validation_file is not None:
        val = read_table(spec.validation_file, spec.fields, skip_bad_rows=spec.skip_bad_rows)
        skipped += val.skipped
        train_examples, val_examples = train.examples, val.examples
    else:
        train_examples, val_examples = stratified_split(train.examples, (0.9, 0.1), seed=spec.train.seed)
        if not val_examples:
            raise DataError(f"{spec.train_file} is too small to hold out a validation set: pass --validation")
    test_examples: list[Example] = []
    if spec.test_file is not None:
        test = read_table(spec.test_file, spec.fields, skip_bad_rows=spec.skip_bad_rows)
        skipped += test.skipped
        test_examples = test.examples
    source = {"train": str(Path(spec.train_file).resolve()), "fields": asdict(spec.fields),
              "validation": str(Path(spec.validation_file).resolve()) if spec.validation_file else None,
              "test": str(Path(spec.test_file).resolve()) if spec.test_file else None}
    return Splits(labels, train_examples, val_examples, test_examples, spec.max_length or 128, skipped, source)


def limit_splits(splits: Splits, limit: int | None) -> Splits:
    """The first ``limit`` examples of every split (splits are shuffled, so a random sample of each)."""
    if limit is None:
        return splits
    if limit < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}: drop it to use every example")
    splits.train, splits.validation, splits.test = (x[:limit] for x in (splits.train, splits.validation,
                                                                      splits.test))
    splits.source = {**splits.source, "limit": limit}
    return splits


def model_reference(name_or_path: str) -> str:
    """Keep asset names as names; make paths absolute so the run loads from any working directory."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def finetune(spec: FinetuneSpec) -> dict[str, Any]:
    """Train, save the run and score the test split; returns the run's results (also in results.json)."""
    from ..tokenizer import AutoTokenizer

    start = time.perf_counter()
    env = init_distributed(spec.train.device)
    out = Path(spec.out)
    _check_out(out, spec.resume, spec.overwrite)
    splits = limit_splits(load_splits(spec), spec.limit)
    info = {
        "base_model": model_reference(spec.model),
        "task_type": TASK_TYPE,
        "method": spec.method.name,
        "method_options": spec.method.options,
        "max_length": splits.max_length,
        "data": splits.source,
        "labels": splits.labels.labels,
        "train_config": asdict(spec.train),
    }
    if spec.resume and (out / "run.json").is_file():
        _check_same_run(read_run_info(out), info, out)
    barrier(env)  # every process has looked at ``out`` before the main one writes to it
    seed_everything(spec.train.seed)  # the fresh head and delta are initialised from the seed
    model = build_classifier(spec.model, splits.labels, spec.method)
    tokenizer = AutoTokenizer.from_pretrained(spec.model)

    skipped = list(splits.skipped)
    encoded = {name: encode_examples(tokenizer, examples, splits.max_length, splits.labels,
                                     spec.skip_bad_rows, skipped)
               for name, examples in (("train", splits.train), ("validation", splits.validation),
                                      ("test", splits.test))}
    if skipped and env.is_main:
        print(f"skipped {len(skipped)} bad row(s); first: {skipped[0]}", file=sys.stderr)
    if env.is_main:
        write_run_info(out, info, splits.labels)
    barrier(env)

    collate = PadCollator(tokenizer.pad_token_id or 0)
    trainer = Trainer(model, spec.train, encoded["train"], collate, out, eval_data=encoded["validation"] or None,
                      num_labels=len(splits.labels))
    results = trainer.train(resume=spec.resume)
    weights = None
    if env.is_main:
        weights = save_run_model(out, model, spec.method, tokenizer)
    if encoded["test"]:
        results["test"] = evaluate(model, encoded["test"], collate, len(splits.labels),
                                   spec.train.eval_batch_size, trainer.env, spec.train.bf16)
    total = base_size(model)
    trainable = sum(p.numel() for p in trainable_state(model).values())
    results.update({
        "method": spec.method.name,
        "quantize": spec.method.quantize,
        "task": spec.task,
        "seed": spec.train.seed,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": 100.0 * trainable / max(1, total),
        "saved_bytes": weights.stat().st_size if weights is not None else None,
        "wall_seconds": round(time.perf_counter() - start, 2),
        "peak_memory_mb": peak_memory_mb(trainer.env.device),
        "skipped_rows": len(skipped),
        "split_sizes": {k: len(v) for k, v in encoded.items()},
    })
    if env.is_main:
        write_json(out / RESULTS, results)
    barrier(env)
    return results


def base_size(model: torch.nn.Module) -> int:
    """Parameters of the model, a quantized layer's packed weight counted as the weights it holds."""
    from ..delta.wrappers import DeltaQuantLinear
    from ..quant.base import QuantizedLinear

    packed = sum(m.in_features * m.out_features for m in model.modules()
                 if isinstance(m, QuantizedLinear | DeltaQuantLinear))
    return packed + sum(p.numel() for p in model.parameters())


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA; otherwise the process's peak resident set size."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def _check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """``out`` must be a directory, and a run already in it is only continued (resume) or replaced (overwrite)
    when asked: training over it would silently replace its weights and checkpoint."""
    if resume and overwrite:
        raise ConfigError("give --resume (continue the run in --out) or --overwrite (replace it), not both")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory: choose a directory for the run")
    if resume or overwrite or not ((out / "run.json").is_file() or (out / CHECKPOINT).is_file()):
        return
    kind = "a finished run" if (out / RESULTS).is_file() else "an unfinished run"
    raise ConfigError(f"--out {out} already holds {kind}: pass --resume to continue it, --overwrite to replace it, "
                      "or choose another --out")


def _check_same_run(saved: dict[str, Any], now: dict[str, Any], out: Path) -> None:
    """A resumed run must be the run that was started: same model, method, data and every training setting
    that shapes it (:data:`~deltaformer.train.trainer.RESUME_FREE` lists those that may change)."""
    changed = settings_differences(saved, {k: v for k, v in now.items() if k != "train_config"})
    changed += settings_differences(saved.get("train_config", {}), now["train_config"], RESUME_FREE)
    if changed:
        longer = any(name.startswith(("max_steps=", "epochs=")) for name in changed)
        raise ConfigError(
            f"--resume: {out} was trained with {', '.join(changed)}; resume with the run's own settings, or start "
            "a new run (another --out, or --overwrite)"
            + ("; a finished run is not extended, since its learning-rate schedule ends at its own length: to "
               "train longer, start a new run with more steps" if longer else "")
        )
