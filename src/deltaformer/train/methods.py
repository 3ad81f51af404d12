"""Which parameters a fine-tuning method trains, and how its delta is attached, saved and merged.

``full`` and ``probe`` are training modes, not deltas: they only set ``requires_grad`` (``probe`` trains the
task head alone). Every other method is a delta from :mod:`deltaformer.delta`, attached under one name,
with the base frozen and the new classification head trainable (the head is fresh, so every method must
learn it). Everything else about a delta method is read from the method itself: its name and mergeability
from its :class:`~deltaformer.delta.method.Method`, its options, their help, fine-tuning defaults, option
names and aliases from its config's field metadata, its learning rate from ``finetune_lr``. A new delta
method therefore needs no line here.

Any delta method may train on a frozen quantized base (option ``quantize``, ``--quantize`` on the command line:
see :data:`QUANTIZE`); :data:`RECIPES` are methods that are another method on a quantized base, such as
``qlora`` (LoRA on NF4 with double quantization, on every linear layer: Dettmers et al., 2023).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .. import delta
from ..delta.targets import head_paths
from ..errors import ConfigError

#: Training modes (no delta) and their default learning rates: small for full fine-tuning.
MODES = {"full": 5e-5, "probe": 1e-3}


@dataclass(frozen=True)
class Recipe:
    """A method that is another delta method on a quantized base, with its own option defaults."""

    method: str
    quantize: str
    defaults: dict[str, Any]


#: The targets keyword for every linear layer but the heads (``--targets all-linear``).
ALL_LINEAR = "all-linear"
#: QLoRA (Dettmers et al., 2023): LoRA on every linear layer of an NF4 base with double quantization.
RECIPES: dict[str, Recipe] = {"qlora": Recipe("lora", "nf4", {"targets": [ALL_LINEAR]})}
METHODS: tuple[str, ...] = (*MODES, *delta.METHODS, *RECIPES)
DELTA_NAME = "default"
#: Methods whose result folds into a plain checkpoint (the modes change only existing weights).
MERGEABLE = frozenset({*MODES, *(name for name, m in delta.METHODS.items() if m.mergeable),
                       *(name for name, r in RECIPES.items() if delta.METHODS[r.method].mergeable)})
#: Default learning rates: small for full fine-tuning, larger for the few parameters of a delta.
DEFAULT_LR: dict[str, float] = {**MODES, **{name: m.config_class.finetune_lr for name, m in delta.METHODS.items()},
                                **{name: delta.METHODS[r.method].config_class.finetune_lr for name, r in RECIPES.items()}}
#: ``--quantize`` names: the frozen base's scheme and its settings (``quant.layers.quantize`` arguments).
QUANTIZE: dict[str, dict[str, Any]] = {
    "int8": {"scheme": "int8", "granularity": "channel"},  # absmax per output channel
    "llm.int8": {"scheme": "llm_int8"},  # int8 products, outlier features (|x| >= 6) in fp32
    "nf4": {"scheme": "nf4", "blocksize": 64, "double_quant": True},  # QLoRA's NormalFloat4 + double quantization
    "fp4": {"scheme": "fp4", "blocksize": 64, "double_quant": True},
}
#: The option that names the base's quantization (kept with the method options, so run.json records it).
QUANTIZE_OPTION = "quantize"


def delta_method(name: str) -> str:
    """The delta method a method name trains (a recipe's own method; the name itself otherwise)."""
    return RECIPES[name].method if name in RECIPES else name


def check_quantize(name: str) -> str:
    if name not in QUANTIZE:
        raise ConfigError(f"unknown --quantize {name!r}: choose one of {', '.join(QUANTIZE)}")
    return name


@dataclass(frozen=True)
class MethodOption:
    """One option of a delta method, as a config field declares it (see :class:`~deltaformer.delta.DeltaConfig`).

    ``kind`` is ``int``, ``float``, ``bool`` or ``list`` (names; comma-separated on the command line).
    """

    name: str
    field: str
    kind: type
    help: str
    default: Any = None


def method_options(method: str) -> dict[str, MethodOption]:
    """The options ``method`` offers on the command line, by option name (empty for the modes)."""
    if method in MODES:
        return {}
    cls = delta.config_class(delta_method(method))
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        name = f.metadata.get("cli")
        if name:
            default = RECIPES[method].defaults.get(name) if method in RECIPES else None
            out[name] = MethodOption(name, f.name, _kind(hints[f.name]), f.metadata.get("help", ""),
                                     f.metadata.get("finetune") if default is None else tuple(default))
    return out


def _kind(hint: Any) -> type:
    args = set(typing.get_args(hint)) or {hint}
    if any(typing.get_origin(a) is tuple for a in args):
        return list
    for kind in (bool, int, float, str):
        if kind in args:
            return kind
    raise TypeError(f"no command-line kind for a field of type {hint}")


def all_options() -> dict[str, tuple[MethodOption, tuple[str, ...]]]:
    """Every option of every method, with the methods that offer it (what the command line shows)."""
    out: dict[str, tuple[MethodOption, tuple[str, ...]]] = {}
    for method in METHODS:
        for name, option in method_options(method).items():
            shown, methods = out.get(name, (option, ()))
            if shown.default is None and option.default is not None:  # help of a method that sets a default
                shown = option
            out[name] = (shown, (*methods, method))
    return out


@dataclass
class MethodSpec:
    """A method and its options (option names as :func:`method_options` gives them, or field names).

    The option ``quantize`` (a :data:`QUANTIZE` name; a recipe's own by default) quantizes the frozen base.
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ConfigError(f"unknown method {self.name!r}: use one of {', '.join(METHODS)}")
        defaults = {name: list(o.default) if isinstance(o.default, tuple) else o.default
                    for name, o in method_options(self.name).items() if o.default is not None}
        if self.name in RECIPES:
            defaults[QUANTIZE_OPTION] = RECIPES[self.name].quantize
        self.options = {**defaults, **{k: v for k, v in self.options.items() if v is not None}}
        if self.quantize is not None:
            check_quantize(self.quantize)
            if self.name == "full":
                raise ConfigError("--method full trains every base weight, and a quantized base is frozen: "
                                  "drop --quantize, or train a delta (lora, qlora, ...) on the quantized base")

    @property
    def is_delta(self) -> bool:
        return self.name not in MODES

    @property
    def quantize(self) -> str | None:
        """The base's :data:`QUANTIZE` name, or None for an fp32 base."""
        value = self.options.get(QUANTIZE_OPTION)
        return None if value is None else str(value)


def quantize_base(model: nn.Module, name: str) -> nn.Module:
    """Quantize every linear layer of ``model`` but its heads (the task head, a decoder's vocabulary projection)
    in place, as :data:`QUANTIZE` says for ``name``; the heads stay fp32 (small, and the task head trains)."""
    from ..quant.layers import quantize

    skip = tuple(head_paths(model))
    output = getattr(model, "output_layer_path", None)
    return quantize(model, skip=(*skip, output) if output else skip, **QUANTIZE[check_quantize(name)])


def apply_method(model: nn.Module, spec: MethodSpec) -> nn.Module:
    """Set up ``model`` for ``spec``: quantize the base (if asked), attach the delta (if any) and choose the
    trainable parameters."""
    if spec.quantize is not None:
        quantize_base(model, spec.quantize)
    if spec.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if spec.name == "probe":
        heads = {id(p) for p in delta.head_parameters(model)}
        for p in model.parameters():
            p.requires_grad_(id(p) in heads)
        return model
    delta.attach(model, delta_config(spec), DELTA_NAME)
    return delta.freeze_base(model)  # the delta's parameters and the task head train


def delta_config(spec: MethodSpec) -> delta.DeltaConfig:
    """Build the :mod:`deltaformer.delta` config of ``spec``: option names, field names and the fields'
    ``aliases`` all name a field."""
    cls = delta.config_class(delta_method(spec.name))
    names: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        for alias in (f.name, f.metadata.get("cli"), *f.metadata.get("aliases", ())):
            if alias:
                names.setdefault(alias, f.name)
    kwargs: dict[str, Any] = {}
    for option, value in spec.options.items():
        if option == QUANTIZE_OPTION:
            continue
        target = names.get(option)
        if target is None:
            raise ConfigError(
                f"method {spec.name!r} has no option {option!r}: its options are "
                f"{', '.join(sorted(f.name for f in dataclasses.fields(cls)))}"
            )
        if isinstance(value, list | tuple) and list(value) == [ALL_LINEAR]:
            value = ALL_LINEAR  # the name list of one keyword: targets every linear layer but the heads
        kwargs[target] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def save_method_delta(model: nn.Module, spec: MethodSpec, directory: Path) -> Path | None:
    """Write the delta in the delta module's own (peft-style) format, when the method has one."""
    if not spec.is_delta:
        return None
    delta.save_delta(model, directory, DELTA_NAME)
    return directory


def merge_method(model: nn.Module, spec: MethodSpec) -> nn.Module:
    """Fold the delta into the base weights, giving a plain model; errors for methods that cannot merge."""
    if not spec.is_delta:
        return model
    return delta.merge_and_unload(model, DELTA_NAME)
