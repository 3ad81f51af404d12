"""The user-facing verbs: attach, detach, activate, route, bare, freeze, merge, summarise.

Every function takes the model (a bare backbone or a task model) and finds its shared
:class:`~deltaformer.delta.routing.DeltaRouter` and changes it through the router's own methods; none of them
changes a forward signature.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DeltaError
from .config import DeltaConfig
from .host import drop_router, find_router, get_router, require_router
from .method import method_for
from .parts import StackedDelta
from .routing import BARE, DeltaRouter
from .targets import head_paths, module_type
from .wrappers import PART_ORDER, DeltaWrapper

NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def attach(model: nn.Module, config: DeltaConfig, name: str = "default") -> nn.Module:
    """Attach a new delta named ``name`` and make it the (only) active one; returns the model.

    Target layers are wrapped on first use; several deltas, of one or several methods, may share them.
    An optimizer built before this call does not see the new parameters: build it afterwards.
    """
    if not isinstance(config, DeltaConfig):
        raise DeltaError(f"attach() needs a delta config such as LoraConfig(...), got {type(config).__name__}")
    if not NAME.match(name):
        raise DeltaError(f"delta name {name!r} must be letters, digits, '_' or '-' (no dots): choose another")
    router = get_router(model)
    if name in router.deltas:
        raise DeltaError(f"a delta named {name!r} is already attached: detach it first or choose another name")
    method = method_for(config.method)
    router.add(name, method.name, config)
    try:
        method.attach(model, config, name, router)
    except Exception:
        try:
            method.detach(model, name)
        finally:
            router.remove(name)
        raise
    router.activate((name,))
    return model


def detach(model: nn.Module, name: str) -> nn.Module:
    """Remove delta ``name`` (unmerging it first if merged); layers left without deltas are unwrapped."""
    router = _router_with(model, name)
    if name in router.merged:
        unmerge(model, name)
    method_for(router.deltas[name].method).detach(model, name)
    router.remove(name)
    return model


def deltas(model: nn.Module) -> dict[str, str]:
    """Attached delta names and their methods, in attach order."""
    router = find_router(model)
    return {} if router is None else {n: i.method for n, i in router.deltas.items()}


def set_active(model: nn.Module, names: str | Sequence[str] | None) -> nn.Module:
    """Deltas applied to every sample when no :func:`route` is in force (several compose; none = bare)."""
    router = require_router(model)
    router.activate(() if names is None else (names,) if isinstance(names, str) else tuple(names))
    return model


def active(model: nn.Module) -> tuple[str, ...]:
    router = find_router(model)
    return () if router is None else router.active


@contextmanager
def bare(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: no delta applies inside the block (merged deltas must be unmerged first)."""
    router = find_router(model)
    if router is None:
        yield model
        return
    with router.bare():
        yield model


@contextmanager
def route(model: nn.Module, names: Sequence[str | None] | Tensor) -> Iterator[Tensor]:
    """Give each sample of the next forwards its own delta: ``names[b]`` (None = the bare model).

    ``names`` may also be a (batch,) tensor of positions in attach order with -1 for bare. Yields that
    (batch,) tensor of positions (for the caller's bookkeeping; nothing in the model reads it): each part
    turns the routed names into an index of its own slots, once per routing block, and gathers by it, with
    no Python loop over samples.
    """
    router = require_router(model)
    order = list(router.deltas)
    if isinstance(names, Tensor):
        positions = names.tolist()
        if any(p != BARE and not 0 <= p < len(order) for p in positions):
            raise DeltaError(f"route index must hold positions 0..{len(order) - 1} or {BARE}: got {positions}")
        names = [order[p] if p != BARE else None for p in positions]
    names = tuple(names)
    with router.routing(names):
        yield torch.tensor([order.index(n) if n is not None else BARE for n in names], dtype=torch.long)


def _router_with(model: nn.Module, name: str) -> DeltaRouter:
    router = require_router(model)
    if name not in router.deltas:
        raise DeltaError(f"no delta named {name!r} is attached: attached are {', '.join(router.deltas)}")
    return router


# --- merging ----------------------------------------------------------------------------------------


def merge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold delta ``name`` (default: the active ones) into the base weights; the delta stays attached and
    stops applying on its own, so outputs do not change. LoRA, IA3 and BitFit can; others raise why not."""
    router = require_router(model)
    for n in _in_part_order(router, _names(router, name)):
        if n in router.merged:
            continue
        method_for(router.deltas[n].method).merge(model, n, +1.0)
        router.record_merge(n)
    return model


def unmerge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Undo :func:`merge`: subtract (or divide out) the delta again, restoring the base weights. Without a
    name, every merged delta, the latest first (IA3 merged after LoRA also scaled the merged LoRA update)."""
    router = require_router(model)
    if name is not None:
        _check_unmerge_order(router, name)
    for n in _names(router, name, merged_only=True):
        method_for(router.deltas[n].method).merge(model, n, -1.0)
        router.record_unmerge(n)
    return model


def _check_unmerge_order(router: DeltaRouter, name: str) -> None:
    """Refuse to unmerge ``name`` out of order when IA3 (which scales, not adds) makes the order matter."""
    order = list(router.merged)
    if name not in order:
        return
    later = order[order.index(name) + 1:]
    methods = {router.deltas[n].method for n in [name, *later]}
    if later and "ia3" in methods:
        raise DeltaError(f"cannot unmerge {name!r} exactly while {', '.join(later)} (merged after it) stay merged: "
                         f"IA3 scales weights, so unmerge {later[-1]!r} first, or call unmerge(model) for all")


def deltas_to_merge(router: DeltaRouter, names: str | Sequence[str] | None, error: type[Exception],
                    action: str) -> list[str]:
    """The deltas a merge-and-unload folds in (default: all attached), checked before anything changes: every
    one attached and mergeable, and none left over (removing the wrappers would drop it). ``error`` and
    ``action`` name the caller in the messages (``delta.merge_and_unload``, ``quant.merge``)."""
    chosen = list(router.deltas) if names is None else [names] if isinstance(names, str) else list(names)
    rest = [n for n in router.deltas if n not in chosen]
    if rest:
        raise error(f"{action} would drop unmerged delta(s) {', '.join(rest)}: detach them first or merge them too")
    for n in chosen:
        if n not in router.deltas:
            raise error(f"no delta named {n!r} is attached: attached are {', '.join(router.deltas)}")
        method = method_for(router.deltas[n].method)
        if not method.mergeable:
            raise error(f"{method.name} delta {n!r} cannot merge ({method.merge_reason}): detach it before "
                        f"{action}, or save it with save_delta")
    return chosen


def merge_and_unload(model: nn.Module, names: str | Sequence[str] | None = None) -> nn.Module:
    """Merge the named deltas (default: all attached) and remove every wrapper, leaving a plain model whose
    ``save_pretrained`` writes an ordinary HF checkpoint. Deltas that cannot merge must be detached first."""
    router = require_router(model)
    chosen = deltas_to_merge(router, names, DeltaError, "merge_and_unload")
    for n in _in_part_order(router, chosen):
        merge(model, n)
    return unload(model)


def unload(model: nn.Module) -> nn.Module:
    """Remove all delta machinery without merging (merged deltas stay in the weights)."""
    router = find_router(model)
    if router is None:
        return model
    for n in list(router.deltas):
        method_for(router.deltas[n].method).detach(model, n)
    router.clear()
    drop_router(model, router)
    return model


def _in_part_order(router: DeltaRouter, names: list[str]) -> list[str]:
    """Merge in the order parts apply inside a layer (IA3 scales what BitFit and LoRA then add), unmerge in
    reverse (see :func:`_names`): another order would scale a merged LoRA update by IA3 and change the outputs."""
    rank = {method: i for i, method in enumerate(PART_ORDER)}
    return sorted(names, key=lambda n: rank.get(router.deltas[n].method, len(rank)))


def _names(router: DeltaRouter, name: str | None, merged_only: bool = False) -> list[str]:
    if name is not None:
        if name not in router.deltas:
            raise DeltaError(f"no delta named {name!r} is attached: attached are {', '.join(router.deltas)}")
        return [name] if not merged_only or name in router.merged else []
    pool = list(reversed(router.merged)) if merged_only else list(router.active)  # undo the latest first
    if not pool and not merged_only:
        raise DeltaError("no delta is active to merge: name one, merge(model, 'name')")
    return pool


# --- training ---------------------------------------------------------------------------------------


def delta_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of every attached delta (stacked tensors, prompt encoders, prefix projections)."""
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, StackedDelta):
            for p in module.parameters():
                seen[id(p)] = p
    return list(seen.values())


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for h in head_paths(model) for p in model.get_submodule(h).parameters()]


def freeze_base(model: nn.Module) -> nn.Module:
    """Only delta parameters and the task head train (``requires_grad``). Frozen base weights then get no
    gradient, so backward computes no weight gradients for them."""
    train = {id(p) for p in delta_parameters(model)} | {id(p) for p in head_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in train)
    return model


def trainable_summary(model: nn.Module) -> dict[str, Any]:
    """Parameter counts: base, trainable, and per method / per module type (real delta sizes, no padding).

    ``{"base": n, "trainable": n, "trainable_percent": p, "methods": {m: {"params", "percent", "deltas"}},
    "modules": {"attn.query": n, "classifier": n, ...}}``; percentages are of the base model's parameters.
    """
    router = find_router(model)
    stacked = {id(p) for p in delta_parameters(model)}
    base = sum(p.numel() for p in model.parameters() if id(p) not in stacked)
    methods: dict[str, dict[str, Any]] = {}
    modules: dict[str, int] = {}
    trainable = 0
    for name, info in (router.deltas.items() if router is not None else ()):
        counts = method_for(info.method).counts(model, name)
        entry = methods.setdefault(info.method, {"params": 0, "deltas": []})
        entry["params"] += sum(counts.values())
        entry["deltas"].append(name)
        for kind, n in counts.items():
            modules[kind] = modules.get(kind, 0) + n
    if any(p.requires_grad for p in delta_parameters(model)):
        trainable += sum(e["params"] for e in methods.values())
    head_ids = {id(p) for p in head_parameters(model)}
    head = sum(p.numel() for p in head_parameters(model) if p.requires_grad)
    if head:
        methods["head"] = {"params": head, "deltas": []}
        for h in head_paths(model):
            modules[module_type(h)] = modules.get(module_type(h), 0) + sum(
                p.numel() for p in model.get_submodule(h).parameters() if p.requires_grad)
    base_trainable = sum(p.numel() for p in model.parameters()
                         if p.requires_grad and id(p) not in stacked and id(p) not in head_ids)
    if base_trainable:
        methods.setdefault("full", {"params": 0, "deltas": []})["params"] = base_trainable
        for pname, p in model.named_parameters():
            if p.requires_grad and id(p) not in stacked and id(p) not in head_ids:
                kind = module_type(pname.rsplit(".", 1)[0])
                modules[kind] = modules.get(kind, 0) + p.numel()
    trainable += head + base_trainable
    for entry in methods.values():
        entry["percent"] = 100.0 * entry["params"] / max(base, 1)
    return {"base": base, "trainable": trainable, "trainable_percent": 100.0 * trainable / max(base, 1),
            "methods": methods, "modules": dict(sorted(modules.items()))}


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for a terminal (``deltaformer info`` prints this for a model with deltas)."""
    lines = [f"trainable {summary['trainable']:,} of {summary['base']:,} base parameters "
             f"({summary['trainable_percent']:.3f}%)"]
    for method, entry in summary["methods"].items():
        names = f" [{', '.join(entry['deltas'])}]" if entry["deltas"] else ""
        lines.append(f"  {method:<10}{entry['params']:>14,} ({entry['percent']:.3f}%){names}")
    for kind, n in summary["modules"].items():
        lines.append(f"    {kind:<24}{n:>12,}")
    return "\n".join(lines)


def is_wrapped(module: nn.Module) -> bool:
    return isinstance(module, DeltaWrapper)
