"""Which deltas the server holds, what a request's ``model`` field names, and where deltas may come from.

The base model is served as ``BASE`` and every delta as ``BASE:NAME``. All deltas live on the one model,
stacked and routed per sample, so adding one is a load onto that model, not a copy of it. Deltas given on the
command line are trusted (the operator chose them); deltas added while running (``POST /v1/deltas``) must lie
inside one of the configured roots after every symlink is resolved, so a client cannot make the server read
an arbitrary directory. The registry changes the model, so the scheduler calls it between decode steps only.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .. import delta
from ..errors import DeltaformerError
from .errors import ApiError
from .schemas import model_card

NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


@dataclass
class LoadedDelta:
    name: str
    method: str
    path: str
    created: int
    extra_tokens: int = 0
    """Soft tokens the delta adds to every sequence (prompt tuning, P-tuning): they take cache positions."""


class DeltaRegistry:
    """The deltas attached to the served model, by name, plus the rules for adding and removing them."""

    def __init__(self, model: nn.Module, base_name: str, roots: tuple[str, ...] = ()) -> None:
        if not base_name or ":" in base_name or len(base_name) > 200 or any(c.isspace() for c in base_name):
            raise DeltaformerError(f"served model name {base_name!r} must be 1-200 characters without ':' or "
                                   "spaces: pass --name")
        self.model = model
        self.base = base_name
        self.created = int(time.time())
        self.roots = tuple(Path(r).expanduser().resolve() for r in roots)
        self.deltas: dict[str, LoadedDelta] = {}
        for root in self.roots:
            if not root.is_dir():
                raise DeltaformerError(f"delta root {root} is not a directory: create it or drop --delta-root")

    # --- names ------------------------------------------------------------------------------------------

    def resolve(self, model_field: str) -> str | None:
        """The delta a request's ``model`` names (None = the bare base); 404 when there is no such model."""
        if model_field == self.base:
            return None
        base, sep, name = model_field.partition(":")
        if sep and base == self.base and name in self.deltas:  # dict lookups are safe beside the decode thread
            return name
        served = ", ".join(self.names())
        raise ApiError(404, f"model {model_field!r} does not exist: this server has {served} (GET /v1/models)",
                       param="model", code="model_not_found")

    def extra_tokens(self, name: str | None) -> int:
        return 0 if name is None else self.deltas[name].extra_tokens

    def public_name(self, name: str | None) -> str:
        return self.base if name is None else f"{self.base}:{name}"

    def names(self) -> list[str]:
        return [self.base, *(self.public_name(n) for n in list(self.deltas))]

    def cards(self) -> list[dict[str, Any]]:
        return [model_card(self.base, self.created)] + [
            model_card(self.public_name(d.name), d.created, parent=self.base) for d in list(self.deltas.values())]

    # --- changes (scheduler thread only) ----------------------------------------------------------------

    def add(self, name: str, path: str | Path, *, trusted: bool = False) -> LoadedDelta:
        """Load the delta files in ``path`` as ``name``; untrusted paths must lie inside a root."""
        if not NAME.match(name):
            raise ApiError(400, f"delta name {name!r} must be 1-64 letters, digits, '_' or '-'", param="name",
                           code="invalid_name")
        if name in self.deltas:
            raise ApiError(409, f"a delta named {name!r} is already loaded: remove it first or choose another "
                           "name", param="name", code="delta_exists")
        directory = Path(path).expanduser() if trusted else self._inside_roots(str(path))
        try:
            delta.load_delta(self.model, directory, name, head=False)
            delta.set_active(self.model, None)  # rows pick deltas by routing; nothing applies by default
        except DeltaformerError as exc:
            raise ApiError(400, f"cannot load delta {name!r} from {directory}: {exc}", param="path",
                           code="invalid_delta") from None
        method = delta.deltas(self.model)[name]
        loaded = LoadedDelta(name, method, str(directory), int(time.time()), _virtual_tokens(directory))
        self.deltas[name] = loaded
        return loaded

    def remove(self, name: str) -> None:
        if name not in self.deltas:
            raise ApiError(404, f"no delta named {name!r} is loaded: loaded are {', '.join(self.deltas) or 'none'}",
                           param="name", code="model_not_found")
        delta.detach(self.model, name)
        del self.deltas[name]

    def _inside_roots(self, path: str) -> Path:
        if not self.roots:
            raise ApiError(403, "this server loads no deltas while running: start it with --delta-root DIR",
                           code="delta_loading_disabled")
        if "\x00" in path:
            raise ApiError(400, "path holds a NUL character", param="path", code="invalid_path")
        given = Path(path)
        candidates = [given] if given.is_absolute() else [root / given for root in self.roots]
        for candidate in candidates:
            try:
                real = candidate.resolve(strict=True)
            except (OSError, RuntimeError):
                continue
            if any(real.is_relative_to(root) for root in self.roots) and real.is_dir():
                return real
        roots = ", ".join(map(str, self.roots))
        raise ApiError(400, f"path {path!r} is not a delta directory inside the delta roots ({roots}): "
                       "give a directory under one of them", param="path", code="invalid_path")


def _virtual_tokens(directory: Path) -> int:
    """``num_virtual_tokens`` of a prompt-learning delta's config (peft's field, or ours nested), else 0."""
    try:
        data = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return 0
    ours = data.get("deltaformer") if isinstance(data.get("deltaformer"), dict) else {}
    value = data.get("num_virtual_tokens") or ours.get("num_virtual_tokens") or 0
    return value if isinstance(value, int) and value > 0 else 0
