"""The one mechanism every delta method shares: named deltas stacked per layer, routed by index.

* A **part** (:class:`StackedDelta`) belongs to one method on one layer and stores the parameters of every
  delta of that method there, stacked on a leading axis: slot ``k`` holds delta ``part.slots[k]``.
* A :class:`DeltaRouter`, shared by all parts of a model, says which slots apply to the current batch:
  the active deltas (every sample alike), nothing (``bare``), or one delta name per sample (``route``).
  It hands each part a :class:`Selection`; the part gathers its slices by index and applies them with
  batched matmuls. A batch that uses one delta takes the fast path (no gather, plain matmuls).
* Linear and LayerNorm layers that carry parts are replaced by a :class:`DeltaWrapper` that keeps the
  wrapped layer's own ``weight``/``bias`` parameters under the same names, so the base state dict, HF
  name maps and optimizers holding base parameters all keep working.
* A :class:`Method` (one per module: lora, ia3, ...) knows how to attach, detach, save, load and merge.

Why stacks and an index rather than a dict of modules: one code path then serves single-delta batches and
batches mixing deltas, with no Python loop over samples, and the gradient of a stacked parameter is zero in
the rows of deltas no sample used.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DeltaformerError
from ..nn.dropout import dropout
from ..nn.linear import PLAIN_LINEARS, Linear, linear

#: Index a routed sample uses for "no delta" (the bare model).
BARE = -1
#: Prefix of module keys in peft's adapter files (a tuner's ``base_model.model.<module>...``).
PEFT_PREFIX = "base_model.model."


class DeltaError(DeltaformerError):
    """A delta cannot be attached, routed, merged, saved or loaded; the message says what to do."""


# --- configs ----------------------------------------------------------------------------------------


@dataclass
class DeltaConfig:
    """Base of every method's config. ``method`` names the method; fields are plain JSON values.

    ``modules_to_save``: head modules trained and saved with the delta (peft's name); None = the model's
    task head (``classifier``) when it has one.
    """

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeltaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DeltaError(f"{cls.__name__} has no field(s) {', '.join(unknown)}: fields are {', '.join(sorted(known))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# --- routing ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which slots of one part apply to the current batch. Exactly one form is set:

    * ``slot``: every sample uses this slot (the fast path: no gather);
    * ``slots``: every sample uses all of these (several active deltas of one method, composed);
    * ``index``: routed, ``index[b]`` is sample b's slot (clamped to a valid slot), ``keep[b]`` is 0.0 for
      samples whose delta is not in this part (None when every sample's is); ``used`` lists the slots used.
    """

    slot: int | None = None
    slots: tuple[int, ...] = ()
    index: Tensor | None = None
    keep: Tensor | None = None
    used: tuple[int, ...] = ()

    @property
    def each(self) -> tuple[int, ...]:
        """Slots applied to every sample (fast path and composition)."""
        return (self.slot,) if self.slot is not None else self.slots

    def keep_like(self, x: Tensor, dims: int = 0) -> Tensor | None:
        """``keep`` as x's dtype with ``dims`` trailing singleton dims, or None when all samples keep."""
        if self.keep is None:
            return None
        return self.keep.to(x.dtype).view(-1, *([1] * dims))


@dataclass
class DeltaInfo:
    method: str
    config: DeltaConfig


class DeltaRouter:
    """Shared by every part of one model: the attached deltas and which of them the next forward uses.

    ``index`` is the current per-sample tensor (batch,) of positions in ``deltas`` (``BARE`` = no delta),
    set by :func:`route`; without it the ``active`` deltas apply to every sample.
    """

    def __init__(self) -> None:
        self.deltas: dict[str, DeltaInfo] = {}
        self.active: tuple[str, ...] = ()
        self.merged: dict[str, None] = {}  # in merge order: unmerge() undoes them in reverse
        self.route_names: tuple[str | None, ...] | None = None
        self.index: Tensor | None = None
        self.bare = 0
        self._cache: dict[Any, Selection | None] = {}

    def changed(self) -> None:
        self._cache.clear()

    def position(self, name: str) -> int:
        return list(self.deltas).index(name)

    def check_names(self, names: Sequence[str | None]) -> None:
        for name in names:
            if name is not None and name not in self.deltas:
                raise DeltaError(f"no delta named {name!r} is attached: attached are {', '.join(self.deltas) or 'none'}")

    def select(self, slots: Sequence[str], merged: set[str], batch: int, device: torch.device) -> Selection | None:
        """The :class:`Selection` of a part holding ``slots`` for a batch of ``batch`` samples, or None."""
        if self.bare or not slots:
            return None
        key = (tuple(slots), frozenset(merged), batch if self.route_names is not None else None, device)
        if key in self._cache:
            return self._cache[key]
        if self.route_names is not None:
            sel = self._routed(slots, batch, device)
        else:
            each = tuple(i for i, n in enumerate(slots) if n in self.active and n not in merged)
            sel = None if not each else Selection(slot=each[0]) if len(each) == 1 else Selection(slots=each)
        self._cache[key] = sel
        return sel

    def _routed(self, slots: Sequence[str], batch: int, device: torch.device) -> Selection | None:
        names = self.route_names
        assert names is not None
        if len(names) != batch:
            raise DeltaError(f"route() names {len(names)} sample(s) but the batch has {batch}: give one name per sample")
        where = {n: i for i, n in enumerate(slots)}
        local = [where.get(n, BARE) if n is not None else BARE for n in names]
        used = sorted(set(local) - {BARE})
        if not used:
            return None
        if len(set(local)) == 1:
            return Selection(slot=local[0])
        index = torch.tensor([max(i, 0) for i in local], dtype=torch.long, device=device)
        keep = None
        if BARE in local:
            keep = torch.tensor([float(i != BARE) for i in local], device=device)
        return Selection(index=index, keep=keep, used=tuple(used))


# --- stacked parameters -----------------------------------------------------------------------------


def pad_to(t: Tensor, shape: Sequence[int]) -> Tensor:
    """Zero-pad the trailing dims of ``t`` up to ``shape`` (zero rows/columns keep LoRA/adapters exact)."""
    pads: list[int] = []
    for have, want in zip(reversed(t.shape), reversed(shape)):
        pads += [0, want - have]
    return F.pad(t, pads) if any(pads) else t


class StackedDelta(nn.Module):
    """Base of every method's per-layer store: parameters stacked on a leading delta axis, one slot per name.

    Subclasses list their stacked parameters in ``stacked``, the plain per-slot lists they keep beside them
    (ranks, scales, lengths, ...) in ``slot_lists``, rebuild tensors derived from those lists in
    :meth:`refresh`, and implement the hooks they need: ``on_input``/``on_output`` (wrapped layers),
    ``merge_slot``, ``slot_state``/``load_slot_state`` (files).
    """

    method: ClassVar[str] = ""
    stacked: ClassVar[tuple[str, ...]] = ()
    slot_lists: ClassVar[tuple[str, ...]] = ()

    def __init__(self, router: DeltaRouter) -> None:
        super().__init__()
        self.router = router
        self.slots: list[str] = []
        self.merged: set[str] = set()

    def select(self, batch: int, device: torch.device) -> Selection | None:
        return self.router.select(self.slots, self.merged, batch, device)

    def slot(self, name: str) -> int:
        return self.slots.index(name)

    def stack_add(self, name: str, rows: dict[str, Tensor]) -> int:
        """Append a slot: each row is zero-padded (or the stack is) to the larger trailing shape."""
        for pname, row in rows.items():
            old = getattr(self, pname, None)
            if old is None:
                new = row[None]
            else:
                shape = [max(a, b) for a, b in zip(old.shape[1:], row.shape)]
                new = torch.cat([pad_to(old.detach(), [old.shape[0], *shape]), pad_to(row, shape)[None]])
            grad = True if old is None else old.requires_grad
            self.register_parameter(pname, nn.Parameter(new, requires_grad=grad))
        self.slots.append(name)
        self.router.changed()
        return len(self.slots) - 1

    def stack_remove(self, name: str) -> int:
        index = self.slot(name)
        for pname in self.stacked:
            old = getattr(self, pname, None)
            if old is not None:
                keep = [i for i in range(old.shape[0]) if i != index]
                new = old.detach()[keep].clone()
                self.register_parameter(pname, nn.Parameter(new, requires_grad=old.requires_grad))
        for attr in self.slot_lists:
            getattr(self, attr).pop(index)
        self.slots.pop(index)
        self.merged.discard(name)
        self.refresh()
        self.router.changed()
        return index

    def refresh(self) -> None:
        """Rebuild tensors derived from the per-slot lists, after a slot was added or removed."""

    def on_input(self, x: Tensor, sel: Selection) -> Tensor:
        return x

    def on_output(self, x: Tensor, y: Tensor, sel: Selection) -> Tensor:
        return y

    def slot_numel(self, slot: int) -> int:
        """Parameters delta ``slot`` really has here (without padding)."""
        return sum(getattr(self, p)[slot].numel() for p in self.stacked if getattr(self, p, None) is not None)


def per_sample(vectors: Tensor, sel: Selection, x: Tensor, neutral: float) -> Tensor:
    """Gather (n, dim) per-slot vectors for a batch shaped like ``x``: (B, 1.., dim), ``neutral`` for bare."""
    if sel.index is None:
        out = vectors[sel.each[0]]
        for s in sel.each[1:]:
            out = out * vectors[s] if neutral == 1.0 else out + vectors[s]
        return out
    out = vectors[sel.index]
    keep = sel.keep_like(out, 1)
    if keep is not None:
        out = neutral + keep * (out - neutral) if neutral else keep * out
    return out.view(out.shape[0], *([1] * (x.dim() - 2)), out.shape[-1])


def sample_dropout(x: Tensor, p: Tensor | float, training: bool) -> Tensor:
    """Dropout with one rate, or one rate per sample ((B,) tensor), as each sample's own delta asks."""
    if not training:
        return x
    if isinstance(p, float):
        return dropout(x, p) if p > 0 else x
    keep = (1.0 - p).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return x * torch.bernoulli(keep.expand_as(x)) / keep.clamp_min(1e-12)


# --- wrapped layers ---------------------------------------------------------------------------------

#: Order in which parts of different methods apply inside one wrapped layer.
PART_ORDER = ("ia3", "bitfit", "lora", "adapter")


class DeltaWrapper(nn.Module):
    """Stands in for a wrapped layer: its ``weight``/``bias`` parameters (same names) plus method parts.

    ``forward``: input-side parts (IA3 input scaling), the base layer, then output-side parts in
    :data:`PART_ORDER`. With nothing selected it is exactly the base layer.
    """

    def __init__(self, base: nn.Module, router: DeltaRouter) -> None:
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.router = router
        self.part_names: list[str] = []

    def base_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def unwrap(self) -> nn.Module:
        raise NotImplementedError

    def part(self, method: str) -> StackedDelta | None:
        return self._modules.get(method)  # type: ignore[return-value]

    def add_part(self, part: StackedDelta) -> StackedDelta:
        part.train(self.training)  # a new part starts in training mode; an eval model must not drop out
        self.add_module(part.method, part)
        self.part_names = [m for m in PART_ORDER if m in self._modules]
        return part

    def remove_part(self, method: str) -> None:
        del self._modules[method]
        self.part_names = [m for m in PART_ORDER if m in self._modules]

    def chosen(self, x: Tensor) -> list[tuple[StackedDelta, Selection]]:
        """The parts that apply to this batch, with their selections, in :data:`PART_ORDER`."""
        chosen = []
        for method in self.part_names:
            part: StackedDelta = self._modules[method]  # type: ignore[assignment]
            sel = part.select(x.shape[0], x.device)
            if sel is not None:
                chosen.append((part, sel))
        return chosen

    def output_side(self, x: Tensor) -> Callable[[Tensor], Tensor] | None:
        """For a caller that computes the base product itself (a fused QKV projection): the function turning
        the base output for input ``x`` into this layer's output, or None when a part changes the input."""
        chosen = self.chosen(x)
        if any(type(part).on_input is not StackedDelta.on_input for part, _ in chosen):
            return None

        def finish(y: Tensor) -> Tensor:
            for part, sel in chosen:
                y = part.on_output(x, y, sel)
            return y

        return finish

    def forward(self, x: Tensor) -> Tensor:
        chosen = self.chosen(x)
        if not chosen:
            return self.base_forward(x)
        h = x
        for part, sel in chosen:
            h = part.on_input(h, sel)
        y = self.base_forward(h)
        for part, sel in chosen:
            y = part.on_output(x, y, sel)
        return y


class DeltaLinear(DeltaWrapper):
    """A wrapped ``nn.Linear`` (not a subclass: fused paths that only trust plain linears skip it)."""

    def __init__(self, base: nn.Linear, router: DeltaRouter) -> None:
        super().__init__(base, router)
        self.in_features = base.in_features
        self.out_features = base.out_features

    def base_forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)

    def unwrap(self) -> nn.Linear:
        plain = Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = self.weight
        plain.bias = self.bias
        return plain


class DeltaLayerNorm(DeltaWrapper):
    """A wrapped ``nn.LayerNorm`` (BitFit trains bias deltas of LayerNorms too)."""

    def __init__(self, base: nn.LayerNorm, router: DeltaRouter) -> None:
        super().__init__(base, router)
        self.normalized_shape = base.normalized_shape
        self.eps = base.eps
        self.out_features = base.normalized_shape[-1]

    def base_forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def unwrap(self) -> nn.LayerNorm:
        plain = nn.LayerNorm(self.normalized_shape, eps=self.eps, bias=self.bias is not None, device="meta")
        plain.weight = self.weight
        plain.bias = self.bias
        return plain


WRAPPERS: dict[type, type[DeltaWrapper]] = {
    **{kind: DeltaLinear for kind in PLAIN_LINEARS}, nn.LayerNorm: DeltaLayerNorm}


# --- model plumbing ---------------------------------------------------------------------------------


def find_router(model: nn.Module) -> DeltaRouter | None:
    router = getattr(model, "delta_router", None)
    if isinstance(router, DeltaRouter):
        return router
    for module in model.modules():
        router = getattr(module, "delta_router", None) or getattr(module, "router", None)
        if isinstance(router, DeltaRouter):
            return router
    return None


def get_router(model: nn.Module) -> DeltaRouter:
    """The model's router, created on first use (kept as the plain attribute ``model.delta_router``)."""
    router = find_router(model)
    if router is None:
        router = DeltaRouter()
    if getattr(model, "delta_router", None) is not router:
        model.delta_router = router
    return router


def require_router(model: nn.Module) -> DeltaRouter:
    router = find_router(model)
    if router is None or not router.deltas:
        raise DeltaError("this model has no deltas attached: attach one with deltaformer.delta.attach(model, config)")
    return router


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def wrap(model: nn.Module, path: str, router: DeltaRouter) -> DeltaWrapper:
    """The wrapper at ``path``, replacing the plain layer there on first use."""
    module = model.get_submodule(path)
    if isinstance(module, DeltaWrapper):
        return module
    cls = WRAPPERS.get(type(module))
    if cls is None:
        raise DeltaError(f"{path} is a {type(module).__name__}, not a plain Linear/LayerNorm: target another module")
    wrapper = cls(module, router)
    wrapper.train(module.training)
    parent, child = _parent(model, path)
    setattr(parent, child, wrapper)
    return wrapper


def unwrap_if_empty(model: nn.Module, path: str) -> None:
    module = model.get_submodule(path)
    if isinstance(module, DeltaWrapper) and not module.part_names:
        parent, child = _parent(model, path)
        plain = module.unwrap()
        plain.train(module.training)
        setattr(parent, child, plain)


def name_map_of(model: nn.Module):
    getter = getattr(type(model), "name_map", None)
    return getter() if callable(getter) else None


def hf_name(model: nn.Module, path: str) -> str:
    """HF's name of one of our module paths (our path when the model has no HF name map)."""
    name_map = name_map_of(model)
    hf = name_map.to_hf(path) if name_map is not None else None
    return hf if hf is not None else path


def backbone_relative(model: nn.Module, hf: str) -> str:
    """Drop HF's backbone prefix (``bert.``) so a name matches the same module in bare and task models."""
    prefix = getattr(model, "hf_backbone_prefix", "")
    return hf[len(prefix):] if prefix and hf.startswith(prefix) else hf


def our_name_from_hf(model: nn.Module, hf: str) -> str | None:
    """Our module path for an HF module path from either the bare or the task class (None if unknown)."""
    name_map = name_map_of(model)
    if name_map is None:
        return hf
    fix = getattr(model, "_hf_name_for_this_class", None)
    if fix is not None:
        hf = fix(hf, name_map)
    return name_map.to_ours(hf)


def backbone_of(model: nn.Module) -> nn.Module:
    """The module that owns the input ``prompt`` hook and the layers (the model itself or ``.backbone``)."""
    if hasattr(model, "prompt") and hasattr(model, "layers"):
        return model
    inner = getattr(model, "backbone", None)
    if isinstance(inner, nn.Module):
        return backbone_of(inner)
    raise DeltaError(f"{type(model).__name__} has no backbone with an input hook: prompt-based deltas need one")


def backbone_path(model: nn.Module) -> str:
    bb = backbone_of(model)
    return next(name for name, m in model.named_modules() if m is bb)


def head_paths(model: nn.Module, config: DeltaConfig | None = None) -> list[str]:
    """Head modules trained and saved with a delta (peft's modules_to_save): ``classifier`` of task models."""
    names = getattr(config, "modules_to_save", None) if config is not None else None
    if names is None:
        names = [p.rstrip(".") for p in getattr(model, "head_prefixes", ())]
    present = dict(model.named_modules())
    return [n for n in names if n in present]


LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(path: str) -> int | None:
    m = LAYER.search(path)
    return int(m.group(1)) if m else None


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
    """
    heads = tuple(head_paths(model))
    found = []
    for path, module in model.named_modules():
        base_type = _base_type(module)
        if base_type is None or not issubclass(base_type, kinds) or path in exclude:
            continue
        if any(path == h or path.startswith(h + ".") for h in heads):
            continue
        if layers is not None and layer_of(path) not in set(layers):
            continue
        names = (path, hf_name(model, path))
        if targets == "all-linear":
            ok = base_type is nn.Linear
        elif isinstance(targets, str):
            ok = any(re.fullmatch(targets, n) for n in names)
        else:
            ok = any(n == t or n.endswith("." + t) for n in names for t in targets)
        if ok:
            found.append(path)
    if not found:
        example = next((p for p, m in model.named_modules() if _base_type(m) in kinds), "?")
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


def _base_type(module: nn.Module) -> type | None:
    if isinstance(module, DeltaLinear) or type(module) in PLAIN_LINEARS:
        return nn.Linear
    if isinstance(module, DeltaLayerNorm):
        return nn.LayerNorm
    return type(module) if type(module) in WRAPPERS else None


def pattern_value(patterns: dict[str, Any], names: Sequence[str], default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern: the first key that regex-matches the end of one of ``names``."""
    for key, value in patterns.items():
        if any(re.match(rf"(.*\.)?({key})$", n) for n in names):
            return value
    return default


# --- methods ----------------------------------------------------------------------------------------


class Method:
    """What one delta method knows: attach/detach, file format, merge. Subclasses live one per module."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[DeltaConfig]] = DeltaConfig
    peft_type: ClassVar[str] = ""
    #: peft's prompt-learning models save the head as ``base_model.<head>``, tuners as ``base_model.model.<head>``.
    prompt_learning: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False
    merge_reason: ClassVar[str] = ""

    def attach(self, model: nn.Module, config: DeltaConfig, name: str, router: DeltaRouter) -> None:
        raise NotImplementedError

    def detach(self, model: nn.Module, name: str) -> None:
        raise NotImplementedError

    def merge(self, model: nn.Module, name: str, sign: float) -> None:
        raise DeltaError(f"{self.name} delta {name!r} cannot be merged into the base weights: {self.merge_reason}")

    def export(self, model: nn.Module, name: str, config: DeltaConfig) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """(adapter_config.json fields, tensors by file key) of delta ``name``, without the head."""
        raise NotImplementedError

    def config_from_file(self, data: dict[str, Any], model: nn.Module) -> DeltaConfig:
        """Our config from an adapter_config.json written by peft or by :meth:`export`."""
        raise NotImplementedError

    def load_tensors(self, model: nn.Module, name: str, tensors: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def counts(self, model: nn.Module, name: str) -> dict[str, int]:
        """Parameters of delta ``name`` per module type (layer index dropped), real sizes without padding."""
        raise NotImplementedError

    def own_config(self, data: dict[str, Any]) -> DeltaConfig:
        """Config of our own file format: ``{"peft_type": ..., "deltaformer": {fields}}``."""
        fields = data.get("deltaformer")
        if not isinstance(fields, dict):
            raise DeltaError(f"adapter_config.json of peft_type {data.get('peft_type')!r} lacks its 'deltaformer' "
                             "fields: re-save the delta with deltaformer.delta.save_delta")
        return self.config_class.from_dict(fields)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def method_for(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise DeltaError(f"unknown delta method {name!r}: use one of {', '.join(METHODS)}") from None


def module_type(path: str) -> str:
    """``backbone.layers.3.attn.query`` -> ``attn.query``: what a parameter count is grouped by."""
    m = LAYER.search(path)
    return path[m.end():] if m else path


class WrapperMethod(Method):
    """A method whose parts live in wrapped Linear/LayerNorm layers (LoRA, IA3, BitFit, adapters).

    Subclasses give ``targets`` (module path -> per-module options) and a part class with ``add_slot``.
    Files name tensors ``base_model.model.<HF module path>.<part key>`` as peft does.
    """

    part_class: ClassVar[type[StackedDelta]]

    def targets(self, model: nn.Module, config: DeltaConfig) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def new_part(self, wrapper: DeltaWrapper, router: DeltaRouter, options: dict[str, Any]) -> StackedDelta:
        return self.part_class(router, wrapper)  # type: ignore[call-arg]

    def attach(self, model: nn.Module, config: DeltaConfig, name: str, router: DeltaRouter) -> None:
        for path, options in self.targets(model, config).items():
            wrapper = wrap(model, path, router)
            part = wrapper.part(self.name) or wrapper.add_part(self.new_part(wrapper, router, options))
            part.add_slot(name, config, wrapper, **options)  # type: ignore[attr-defined]

    def parts(self, model: nn.Module, name: str | None = None) -> Iterator[tuple[str, DeltaWrapper, StackedDelta]]:
        for path, module in list(model.named_modules()):
            if isinstance(module, DeltaWrapper):
                part = module.part(self.name)
                if part is not None and (name is None or name in part.slots):
                    yield path, module, part

    def detach(self, model: nn.Module, name: str) -> None:
        for path, wrapper, part in list(self.parts(model, name)):
            part.stack_remove(name)
            if not part.slots:
                wrapper.remove_part(self.name)
                unwrap_if_empty(model, path)

    def merge(self, model: nn.Module, name: str, sign: float) -> None:
        if not self.mergeable:  # adapters: refuse with the reason, not an AttributeError on merge_slot
            super().merge(model, name, sign)
        for _, wrapper, part in self.parts(model, name):
            with torch.no_grad():
                part.merge_slot(wrapper, part.slot(name), sign)  # type: ignore[attr-defined]
            if sign > 0:
                part.merged.add(name)
            else:
                part.merged.discard(name)
            part.router.changed()

    def file_key(self, model: nn.Module, path: str, key: str) -> str:
        return f"{PEFT_PREFIX}{hf_name(model, path)}.{key}"

    def export(self, model: nn.Module, name: str, config: DeltaConfig) -> tuple[dict[str, Any], dict[str, Tensor]]:
        tensors = {}
        for path, _, part in self.parts(model, name):
            for key, value in part.slot_state(part.slot(name)).items():  # type: ignore[attr-defined]
                tensors[self.file_key(model, path, key)] = value
        return self.file_config(model, name, config), tensors

    def file_config(self, model: nn.Module, name: str, config: DeltaConfig) -> dict[str, Any]:
        return {"peft_type": self.peft_type, "deltaformer": config.to_dict()}

    def config_from_file(self, data: dict[str, Any], model: nn.Module) -> DeltaConfig:
        return self.own_config(data)

    def load_tensors(self, model: nn.Module, name: str, tensors: dict[str, Tensor]) -> None:
        expected: dict[str, tuple[StackedDelta, str]] = {}
        for path, _, part in self.parts(model, name):
            for key in part.slot_state(part.slot(name)):  # type: ignore[attr-defined]
                expected[f"{path}.{key}"] = (part, key)
        given = {}
        for file_key, value in tensors.items():
            ours = _our_key(model, file_key, self.part_keys)
            given[ours if ours is not None else file_key] = value
        check_keys(expected, given)
        by_part: dict[int, dict[str, Tensor]] = {}
        for full, (part, key) in expected.items():
            by_part.setdefault(id(part), {})[key] = given[full]
        for _, _, part in self.parts(model, name):
            part.load_slot_state(part.slot(name), by_part[id(part)])  # type: ignore[attr-defined]

    part_keys: ClassVar[tuple[str, ...]] = ()

    def counts(self, model: nn.Module, name: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for path, _, part in self.parts(model, name):
            kind = module_type(path)
            out[kind] = out.get(kind, 0) + part.slot_numel(part.slot(name))
        return out


def _our_key(model: nn.Module, file_key: str, part_keys: Sequence[str]) -> str | None:
    """``base_model.model.<hf module>.<part key>`` -> ``<our module>.<part key>`` (None when unknown)."""
    key = file_key[len(PEFT_PREFIX):] if file_key.startswith(PEFT_PREFIX) else file_key
    for part_key in sorted(part_keys, key=len, reverse=True):
        if key.endswith("." + part_key):
            module = our_name_from_hf(model, key[: -len(part_key) - 1])
            return None if module is None else f"{module}.{part_key}"
    return None


def check_keys(expected: dict[str, Any], given: dict[str, Tensor]) -> None:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing:
        raise DeltaError(f"the delta file lacks {len(missing)} tensor(s) its config implies, e.g. {missing[0]}: "
                         "the file is incomplete or was saved for another model")
    if unexpected:
        raise DeltaError(f"the delta file has {len(unexpected)} tensor(s) its config does not explain, e.g. "
                         f"{unexpected[0]}: it was saved for another model or with another config")


def check_shape(what: str, value: Tensor, shape: Sequence[int]) -> None:
    if tuple(value.shape) != tuple(shape):
        raise DeltaError(f"{what} has shape {tuple(value.shape)} but this model needs {tuple(shape)}: "
                         "the delta was trained on a model of another size")


def kaiming_rows(rows: int, cols: int, like: Tensor) -> Tensor:
    """nn.Linear's default init (kaiming uniform, a=sqrt(5)), as peft inits LoRA A."""
    t = torch.empty(rows, cols, dtype=like.dtype, device=like.device)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


ActivationFn = Callable[[Tensor], Tensor]
