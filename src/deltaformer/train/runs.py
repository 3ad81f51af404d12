"""A fine-tuning run directory: what was trained, on what, and how to load it back.

Layout (``deltaformer finetune --out RUN``)::

    RUN/run.json          base model, task type, method + options, data, max_length, training settings
    RUN/label2id.json     label names <-> ids used in training
    RUN/model/            config.json (with id2label / label2id) and
                            model.safetensors      for ``full``: a plain HF checkpoint (+ tokenizer files)
                            trainable.safetensors  for every other method: head + delta, by deltaformer names
    RUN/delta/            the delta in deltaformer.delta's own (peft-style) format, when the method has one
    RUN/metrics.jsonl, metrics.png, results.json, checkpoint.safetensors, best.safetensors  (the trainer's)

Loading rebuilds the base model, re-attaches the same delta and loads the trained tensors, so only the small
trained part is stored per run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints.io import load_state_dict, save_state_dict
from ..data.tabular import LabelMap
from ..errors import CheckpointError, ConfigError
from ..models.base import LoadReport, PreTrainedModel, resolve_path
from .methods import MethodSpec, apply_method, save_method_delta
from .trainer import write_json

log = logging.getLogger("deltaformer")

RUN_FORMAT = 1
#: What a fine-tuning run learns, saved in run.json; it, never the number of labels, picks the loss, through
#: the model config's ``problem_type`` (HF's name for it, so transformers picks the same loss).
TASK_TYPE = "classification"
PROBLEM_TYPE = "single_label_classification"


@dataclass
class LoadedRun:
    model: PreTrainedModel
    tokenizer: Any
    labels: LabelMap
    info: dict[str, Any]
    directory: Path

    @property
    def method(self) -> MethodSpec:
        return MethodSpec(self.info["method"], self.info.get("method_options", {}))

    @property
    def max_length(self) -> int:
        return int(self.info["max_length"])


def classifier_class(base: str | Path) -> type[PreTrainedModel]:
    """The sequence-classification class for the base checkpoint's model type (BERT, Longformer)."""
    from ..models import auto  # noqa: F401  (fills the registry: a converted Longformer finds its class)
    from ..models.base import read_config

    config = read_config(resolve_path(base))  # config.json or a GGUF file
    for cls in PreTrainedModel.registry.values():
        if cls.config_class is type(config) and cls.hf_architecture.endswith("ForSequenceClassification"):
            return cls
    raise ConfigError(f"no sequence-classification model for model_type {config.model_type!r}")


def build_classifier(base: str, labels: LabelMap, spec: MethodSpec, log_report: bool = True,
                     **config_changes: Any) -> PreTrainedModel:
    """Base weights + a fresh head for ``labels`` + the method's delta (fresh); ``log_report=False`` when the
    caller loads the head and delta next, so the fresh ones are not reported as such."""
    model = classifier_class(base).from_pretrained(base, num_labels=len(labels), log_report=log_report,
                                                   **config_changes)
    set_labels(model, labels)
    apply_method(model, spec)
    return model


def set_labels(model: PreTrainedModel, labels: LabelMap) -> None:
    """Record the label names in the model config, as HF's ``id2label`` / ``label2id``, and that the head
    classifies (HF's ``problem_type``, which picks the loss here and in transformers)."""
    model.config.extra = {**model.config.extra, **labels.to_json(), "problem_type": PROBLEM_TYPE}
    model.config.extra.pop("num_labels", None)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def write_run_info(directory: Path, info: dict[str, Any], labels: LabelMap) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "run.json", {"format": RUN_FORMAT, **info})
    write_json(directory / "label2id.json", labels.to_json())


def save_run_model(directory: Path, model: PreTrainedModel, spec: MethodSpec, tokenizer: Any) -> Path:
    """Save the trained model into ``directory/model`` (and ``directory/delta``); returns the weights file."""
    out = directory / "model"
    out.mkdir(parents=True, exist_ok=True)
    if spec.name == "full":
        model.save_pretrained(out)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(out)
        return out / "model.safetensors"
    model.config.extra = {**model.config.extra, "architectures": [model.hf_architecture]}
    model.config.save(out)
    weights = out / "trainable.safetensors"
    save_state_dict(trainable_state(model), weights, metadata={"method": spec.name})
    save_method_delta(model, spec, directory / "delta")
    return weights


def read_run_info(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / "run.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a deltaformer run directory (no run.json): pass the --out "
                              "directory of `deltaformer finetune`")
    info = _read_json_object(path)
    missing = [key for key in ("base_model", "method", "max_length") if key not in info]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: the run directory is damaged; re-run finetune")
    if info.get("task_type", TASK_TYPE) != TASK_TYPE:
        raise CheckpointError(f"{directory} holds a {info['task_type']!r} run; this version loads {TASK_TYPE} "
                              "runs only")
    return info


def read_labels(directory: Path) -> LabelMap:
    """The run's label map (label2id.json, written when training starts)."""
    path = directory / "label2id.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no label2id.json: the run directory is incomplete or damaged; "
                              "re-run finetune")
    try:
        return LabelMap.from_json(_read_json_object(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} does not hold a label map ({exc!r}): the run directory is damaged; "
                              "re-run finetune") from exc


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}): the run directory is damaged; re-run "
                              "finetune") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object: the run directory is "
                              "damaged; re-run finetune")
    return data


def load_run(directory: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Load the trained model, its tokenizer and label map from a run directory."""
    from ..tokenizer import AutoTokenizer

    directory = Path(directory)
    info = read_run_info(directory)
    labels = read_labels(directory)
    spec = MethodSpec(info["method"], info.get("method_options", {}))
    model_dir = directory / "model"
    if not model_dir.is_dir():
        raise CheckpointError(f"{directory} has no trained model yet (no model/): finish or resume the run first")
    if spec.name == "full":
        model = classifier_class(model_dir).from_pretrained(model_dir)
        tok_dir = model_dir if (model_dir / "tokenizer.json").is_file() or (model_dir / "vocab.txt").is_file() \
            else info["base_model"]
    else:
        model = build_classifier(info["base_model"], labels, spec, log_report=False)
        state = load_state_dict(model_dir / "trainable.safetensors")
        expected = trainable_state(model)
        missing = sorted(set(expected) - set(state))
        if missing:
            raise CheckpointError(f"{model_dir / 'trainable.safetensors'} lacks {missing[0]}: the run is "
                                  "incomplete or from another version; re-run finetune")
        with torch.no_grad():
            for name, tensor in expected.items():
                tensor.copy_(state[name])
        # the base checkpoint lacked the head (and maybe more); report only what the run did not supply
        report = model.load_report
        model.load_report = LoadReport([n for n in report.missing if n not in state], report.unexpected)
        if model.load_report.missing or model.load_report.unexpected:
            log.warning("loading %s: %s", info["base_model"], model.load_report)
        tok_dir = info["base_model"]
    set_labels(model, labels)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    return LoadedRun(model=model.to(device).eval(), tokenizer=tokenizer, labels=labels, info=info,
                     directory=directory)
