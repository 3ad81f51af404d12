"""Which modules of a model a delta targets, and their names as Hugging Face and peft write them.

Targets are matched like peft matches ``target_modules``: on our module paths and on HF's names alike, so
``"query"``, ``"attn.query"`` and ``"attention.self.query"`` all name the same layers. Names come from the
model's :class:`~.host.DeltaHost` members (its HF name map and backbone prefix).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..checkpoints.names import NameMap
from ..errors import DeltaError
from .config import DeltaConfig
from .host import host_or_none
from .wrappers import base_type

#: ``...layers.<i>.`` in a module path: the layer index a delta option such as ``layers=(0, 2)`` selects.
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def name_map_of(model: nn.Module) -> NameMap | None:
    host = host_or_none(model)
    return host.name_map() if host is not None else None


def hf_name(model: nn.Module, path: str) -> str:
    """HF's name of one of our module paths (our path when the model has no HF name map)."""
    name_map = name_map_of(model)
    hf = name_map.to_hf(path) if name_map is not None else None
    return hf if hf is not None else path


def backbone_relative(model: nn.Module, hf: str) -> str:
    """Drop HF's backbone prefix (``bert.``) so a name matches the same module in bare and task models."""
    host = host_or_none(model)
    prefix = host.hf_backbone_prefix if host is not None else ""
    return hf[len(prefix):] if prefix and hf.startswith(prefix) else hf


def our_name_from_hf(model: nn.Module, hf: str) -> str | None:
    """Our module path for an HF module path from either the bare or the task class (None if unknown)."""
    host = host_or_none(model)
    if host is None:
        return hf
    name_map = host.name_map()
    return name_map.to_ours(host.hf_name_for_this_class(hf, name_map))


def head_paths(model: nn.Module, config: DeltaConfig | None = None) -> list[str]:
    """Head modules trained and saved with a delta (peft's modules_to_save): ``classifier`` of task models."""
    names: Sequence[str] | None = getattr(config, "modules_to_save", None) if config is not None else None
    if names is None:
        host = host_or_none(model)
        names = [p.rstrip(".") for p in host.head_prefixes] if host is not None else []
    present = dict(model.named_modules())
    return [n for n in names if n in present]


def layer_of(path: str) -> int | None:
    m = LAYER.search(path)
    return int(m.group(1)) if m else None


def module_type(path: str) -> str:
    """``backbone.layers.3.attn.query`` -> ``attn.query``: what a parameter count is grouped by."""
    m = LAYER.search(path)
    return path[m.end():] if m else path


def match_targets(
    model: nn.Module,
    targets: str | Sequence[str],
    kinds: tuple[type, ...] = (nn.Linear,),
    layers: Sequence[int] | None = None,
    exclude: Sequence[str] = (),
) -> list[str]:
    """Our paths of the modules ``targets`` names, matched like peft on our names and HF names alike.

    ``targets``: ``"all-linear"`` (every linear but the head), a regex (full match), or a list of names
    matched on their last component(s) (``"query"``, ``"attn.out"``, ``"attention.output.dense"``).
    A causal LM's vocabulary projection (its ``output_layer_path``, tied to the token embeddings) is left out
    of ``"all-linear"`` and regexes, as peft leaves it out of ``all-linear``; naming it in a list targets it.
    """
    heads = tuple(head_paths(model))
    output_layer = getattr(model, "output_layer_path", None)
    found = []
    for path, module in model.named_modules():
        kind = base_type(module)
        if kind is None or not issubclass(kind, kinds) or path in exclude:
            continue
        if any(path == h or path.startswith(h + ".") for h in heads):
            continue
        if layers is not None and layer_of(path) not in set(layers):
            continue
        names = (path, hf_name(model, path))
        if path == output_layer and isinstance(targets, str):
            continue
        if targets == "all-linear":
            ok = kind is nn.Linear
        elif isinstance(targets, str):
            ok = any(re.fullmatch(targets, n) for n in names)
        else:
            ok = any(n == t or n.endswith("." + t) for n in names for t in targets)
        if ok:
            found.append(path)
    if not found:
        example = next((p for p, m in model.named_modules() if base_type(m) in kinds), "?")
        raise DeltaError(
            f"targets {targets!r} matched no module of {type(model).__name__}: name modules like "
            f"{example!r} or its HF name {hf_name(model, example)!r} (or their last components)"
        )
    return found


def without_excluded(model: nn.Module, targets: str | Sequence[str], exclude: str | Sequence[str] | None) -> str | tuple[str, ...]:
    """peft's ``exclude_modules`` (a regex or names, matched as targets are): the targets left, as our paths."""
    if not exclude:
        return targets if isinstance(targets, str) else tuple(targets)
    try:
        excluded = set(match_targets(model, exclude))
    except DeltaError:  # excluding modules this model lacks excludes nothing
        excluded = set()
    return tuple(p for p in match_targets(model, targets) if p not in excluded)


def pattern_value(patterns: dict[str, Any], names: Sequence[str], default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern: the first key that regex-matches the end of one of ``names``."""
    for key, value in patterns.items():
        if any(re.match(rf"(.*\.)?({key})$", n) for n in names):
            return value
    return default


