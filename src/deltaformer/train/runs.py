"""A fine-tuning run directory: what was trained, on what, and how to load it back.

Layout (``deltaformer finetune --out RUN``)::

    RUN/run.json          base model, method + options, data, max_length, training settings
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints.io import load_state_dict, save_state_dict
from ..data.tabular import LabelMap
from ..errors import CheckpointError, ConfigError
from ..models.base import PreTrainedModel, resolve_path
from .methods import MethodSpec, apply_method, save_method_delta
from .trainer import write_json

RUN_FORMAT = 1


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
    from ..config import load_config
    from ..models import auto  # noqa: F401  (fills the registry: a converted Longformer finds its class)

    config = load_config(resolve_path(base))
    for cls in PreTrainedModel.registry.values():
        if cls.config_class is type(config) and cls.hf_architecture.endswith("ForSequenceClassification"):
            return cls
    raise ConfigError(f"no sequence-classification model for model_type {config.model_type!r}")


def build_classifier(base: str, labels: LabelMap, spec: MethodSpec, **config_changes: Any) -> PreTrainedModel:
    """Base weights + a fresh head for ``labels`` + the method's delta (fresh)."""
    model = classifier_class(base).from_pretrained(base, num_labels=len(labels), **config_changes)
    set_labels(model, labels)
    apply_method(model, spec)
    return model


def set_labels(model: PreTrainedModel, labels: LabelMap) -> None:
    """Record the label names in the model config, as HF's ``id2label`` / ``label2id``."""
    model.config.extra = {**model.config.extra, **labels.to_json()}
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
    return json.loads(path.read_text(encoding="utf-8"))


def load_run(directory: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Load the trained model, its tokenizer and label map from a run directory."""
    from ..tokenizer import AutoTokenizer

    directory = Path(directory)
    info = read_run_info(directory)
    labels = LabelMap.from_json(json.loads((directory / "label2id.json").read_text(encoding="utf-8")))
    spec = MethodSpec(info["method"], info.get("method_options", {}))
    model_dir = directory / "model"
    if not model_dir.is_dir():
        raise CheckpointError(f"{directory} has no trained model yet (no model/): finish or resume the run first")
    if spec.name == "full":
        model = classifier_class(model_dir).from_pretrained(model_dir)
        tok_dir = model_dir if (model_dir / "tokenizer.json").is_file() or (model_dir / "vocab.txt").is_file() \
            else info["base_model"]
    else:
        model = build_classifier(info["base_model"], labels, spec)
        state = load_state_dict(model_dir / "trainable.safetensors")
        expected = trainable_state(model)
        missing = sorted(set(expected) - set(state))
        if missing:
            raise CheckpointError(f"{model_dir / 'trainable.safetensors'} lacks {missing[0]}: the run is "
                                  "incomplete or from another version; re-run finetune")
        with torch.no_grad():
            for name, tensor in expected.items():
                tensor.copy_(state[name])
        tok_dir = info["base_model"]
    set_labels(model, labels)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    return LoadedRun(model=model.to(device).eval(), tokenizer=tokenizer, labels=labels, info=info,
                     directory=directory)
