"""Weights on disk: ``model.safetensors`` (and sharded indexes) first, ``pytorch_model.bin`` safely.

Pickles run code when loaded, so ``.bin`` files are read with ``torch.load(weights_only=True)`` and must
hold a plain mapping of names to tensors; anything else is refused with a message saying what to do.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path, PurePath

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def find_weights(directory: Path) -> Path:
    """The weights file of a model directory, preferring safetensors."""
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(
        f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}; is this a model directory?"
    )


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from a directory or a weights file (safetensors, index, or weights-only .bin)."""
    path = Path(path)
    if path.is_dir():
        path = find_weights(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist: check the path")
    if path.name.endswith(".index.json"):
        return _load_sharded(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{path} is truncated or corrupted ({exc}); re-download or re-save the checkpoint"
            ) from exc
    return _load_bin(path)


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(
            f"{path} could not be loaded as a weights-only PyTorch file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); convert it to safetensors from a trusted source"
        ) from exc
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise CheckpointError(
            f"{path} is not a plain state dict of name -> tensor (found {type(data).__name__}); "
            "save it with model.state_dict() or as safetensors"
        )
    return data


def _load_sharded(index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index} is not a valid shard index ({exc}); re-download the checkpoint") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index} is not a valid shard index (weight_map must map names to file names); "
                              "re-download the checkpoint")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(load_state_dict(index.parent / _shard_name(index, shard)))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(f"shards of {index} lack {len(missing)} tensor(s) such as {missing[0]}; re-download")
    return state


def _shard_name(index: Path, shard: str) -> str:
    """A shard named by an index must be a file of the model directory: an absolute path or ``..`` would let
    a downloaded index read any file the user can. Checked on the name, not the resolved path, so a directory
    of symbolic links (the Hugging Face cache) still loads."""
    name = PurePath(shard)
    if not shard or name.is_absolute() or ".." in name.parts:
        raise CheckpointError(f"{index} names shard {shard!r}, outside the model directory: refusing to load it; "
                              "re-download the checkpoint from a trusted source")
    return shard


#: What :func:`atomic_write` leaves beside ``path`` when killed mid-write: ``.<name>.<8 random characters>.tmp``
#: (``tempfile.mkstemp``'s names).
_PARTIAL_WRITE = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def remove_partial_writes(directory: Path) -> list[Path]:
    """Delete the temporary files that writes killed midway left in ``directory`` (their targets are intact:
    the rename never happened); returns the paths removed."""
    removed = []
    for path in sorted(Path(directory).glob(".*.tmp")):
        if _PARTIAL_WRITE.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, fsync, then rename over ``path``.

    A crash leaves either the old file or the new one, never half of either.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save as safetensors atomically; tensors sharing storage are copied, as safetensors requires."""
    tensors, seen = {}, set()
    for name, tensor in state.items():
        tensor = tensor.detach().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        tensors[name] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})}))
