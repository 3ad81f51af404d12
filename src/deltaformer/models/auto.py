"""Pick the model class a checkpoint was saved as (``architectures`` in config.json or a GGUF file's metadata)
and load it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import bert, gpt2, led, llama, longformer, transformer  # noqa: F401  (imported to register every architecture)
from .base import PreTrainedModel, read_config, resolve_path


def model_class_for(path: str | Path, architecture: str | None = None) -> type[PreTrainedModel]:
    """The class named by ``architecture`` or by the checkpoint's ``architectures``; the bare model else."""
    config = read_config(resolve_path(path))
    names = [architecture] if architecture else list(config.extra.get("architectures") or [])
    for name in names:
        if name in PreTrainedModel.registry:
            return PreTrainedModel.registry[name]
    if architecture:
        known = ", ".join(sorted(PreTrainedModel.registry))
        raise ConfigError(f"unknown architecture {architecture!r}: use one of {known}")
    bare = [c for c in PreTrainedModel.registry.values()
            if c.config_class is type(config) and c.is_bare_class()]
    if not bare:
        raise ConfigError(f"no deltaformer model for model_type {config.model_type!r}")
    return bare[0]


def load_model(path: str | Path, architecture: str | None = None, **config_changes: Any) -> PreTrainedModel:
    """Load a checkpoint directory (or asset name) into the class it was saved as."""
    return model_class_for(path, architecture).from_pretrained(path, **config_changes)
