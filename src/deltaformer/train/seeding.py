"""Seeding and capturing every random number generator a training run touches.

A resumed run must draw exactly the random numbers the uninterrupted run would have drawn (dropout masks,
shuffles), so the checkpoint records the state of Python's, NumPy's and torch's generators (CUDA too) and
of the data loader's own generator, and :func:`restore_rng` puts them back.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) with one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng(loader_generator: torch.Generator | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able states, tensor states) of every generator; tensors go to safetensors, the rest to JSON."""
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    assert isinstance(np_keys, np.ndarray)
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    if loader_generator is not None:
        tensors["rng.loader"] = loader_generator.get_state()
    return meta, tensors


def restore_rng(
    meta: dict[str, Any], tensors: dict[str, torch.Tensor], loader_generator: torch.Generator | None = None
) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if states:
            torch.cuda.set_rng_state_all(states)
    if loader_generator is not None and "rng.loader" in tensors:
        loader_generator.set_state(tensors["rng.loader"])
