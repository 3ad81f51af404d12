"""Training checkpoints: one safetensors file, written atomically, that resumes a run exactly.

Why one file: the model, optimizer and RNG tensors and the JSON state (progress, scheduler, best metric)
must change together. They are saved as the tensors and the metadata header of a single safetensors file
written through :func:`~deltaformer.checkpoints.io.atomic_write` (temp file, fsync, rename), so a run killed
at any instant leaves either the previous checkpoint or the new one, never a mix. Nothing is pickled.

Tensor names: ``model.<param>`` (trainable parameters only, or the whole model), ``optim.<i>.<key>``
(AdamW moments per parameter index), ``rng.*`` (generator states). Metadata ``deltaformer.trainer``: JSON with
``progress``, ``optimizer`` (param groups and non-tensor state), ``scheduler``, ``rng`` and ``trainer``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..checkpoints.io import save_state_dict
from ..errors import CheckpointError

FORMAT_VERSION = 1
META_KEY = "deltaformer.trainer"


@dataclass
class TrainingCheckpoint:
    """Everything a resumed run needs, split the way it is stored."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng_meta: dict[str, Any]
    rng_tensors: dict[str, torch.Tensor]
    state: dict[str, Any] = field(default_factory=dict)


def optimizer_to_parts(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Split ``optimizer.state_dict()`` into JSON (groups, scalar state) and tensors (moments, step)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return {"param_groups": state_dict["param_groups"], "scalars": scalars}, tensors


def optimizer_from_parts(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_parts`."""
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def save_checkpoint(path: Path, ckpt: TrainingCheckpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically."""
    optim_meta, optim_tensors = optimizer_to_parts(ckpt.optimizer)
    tensors = {f"model.{k}": v.detach().cpu() for k, v in ckpt.model.items()}
    tensors.update({k: v.detach().cpu() for k, v in optim_tensors.items()})
    tensors.update({k: v.detach().cpu() for k, v in ckpt.rng_tensors.items()})
    meta = {
        "format": FORMAT_VERSION,
        "optimizer": optim_meta,
        "scheduler": ckpt.scheduler,
        "rng": ckpt.rng_meta,
        "trainer": ckpt.state,
    }
    save_state_dict(tensors, path, metadata={META_KEY: json.dumps(meta)})


def load_checkpoint(path: Path) -> TrainingCheckpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; errors say what is wrong with the file."""
    if not path.is_file():
        raise CheckpointError(f"no training checkpoint at {path}: start without --resume")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"training checkpoint {path} is unreadable ({exc}): delete it to start over") from exc
    if META_KEY not in header:
        raise CheckpointError(f"{path} is not a deltaformer training checkpoint (no {META_KEY} metadata)")
    meta = json.loads(header[META_KEY])
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format')}, this version reads {FORMAT_VERSION}")
    group: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optim": {}, "rng": {}}
    for name, tensor in tensors.items():
        kind, _, rest = name.partition(".")
        if kind == "model":
            group["model"][rest] = tensor
        elif kind == "optim":
            group["optim"][name] = tensor
        elif kind == "rng":
            group["rng"][name] = tensor
    return TrainingCheckpoint(
        model=group["model"],
        optimizer=optimizer_from_parts(meta["optimizer"], group["optim"]),
        scheduler=meta["scheduler"],
        rng_meta=meta["rng"],
        rng_tensors=group["rng"],
        state=meta["trainer"],
    )
