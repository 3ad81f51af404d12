"""IA3 (Liu et al., 2022): learned vectors that rescale keys, values and the feed-forward activations.

Keys and values are scaled at the projection's output (``l * (W x + b)``); the feed-forward block at the
input of its down projection (``W (l * x) + b``), as peft's ``feedforward_modules``. Vectors start at
ones (the identity) and merge exactly into the weights. Stacked per layer as ``scale`` (n_deltas, dim).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from ..errors import DeltaError
from .config import DeltaConfig
from .files import base_model_name, task_type
from .method import WrapperMethod, register
from .ops import check_shape, per_sample
from .routing import DeltaRouter, Selection
from .targets import backbone_relative, hf_name, match_targets, without_excluded
from .wrappers import DeltaWrapper, LayerPart


@dataclass
class IA3Config(DeltaConfig):
    """``targets`` and ``feedforward`` name modules as LoRA's targets do; feed-forward ones scale their input."""

    method: ClassVar[str] = "ia3"
    finetune_lr: ClassVar[float] = 3e-3
    targets: tuple[str, ...] | str = field(default=("key", "value", "mlp.down"), metadata={
        "help": "modules whose outputs (or, for feedforward ones, inputs) are scaled", "cli": "targets",
        "aliases": ("target_modules",)})
    feedforward: tuple[str, ...] | str = field(default=("mlp.down",), metadata={
        "help": "targets scaled at their input (peft's feedforward_modules)"})
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "only these layer indices"})
    init: bool = field(default=True, metadata={"help": "vectors start at ones (False: random, not the identity)"})
    modules_to_save: tuple[str, ...] | None = field(default=None, metadata={
        "help": "head modules trained and saved with the delta (None: the model's task head)"})


class IA3Part(LayerPart[IA3Config]):
    """IA3 vectors of every IA3 delta on one layer; all of them scale the same side (input or output)."""

    method = "ia3"
    stacked = ("scale",)
    scale: Tensor  # (n_deltas, dim), registered by stack_add
    acts_on_input = True  # feed-forward IA3 scales the input (output-side parts of this class do not)

    def __init__(self, router: DeltaRouter, wrapper: DeltaWrapper, feedforward: bool) -> None:
        super().__init__(router)
        self.feedforward = feedforward
        self.dim = wrapper.in_features if feedforward else wrapper.out_features

    def add_slot(self, name: str, config: IA3Config, wrapper: DeltaWrapper, options: Mapping[str, Any]) -> None:
        if bool(options["feedforward"]) != self.feedforward:
            side = "input" if self.feedforward else "output"
            raise DeltaError(f"IA3 deltas on one module must scale the same side; earlier ones scale its {side}: "
                             "give this delta the same feedforward modules")
        row = wrapper.like.new_ones(self.dim)
        if not config.init:
            row = row + 0.1 * wrapper.like.new_empty(self.dim).normal_()
        self.stack_add(name, {"scale": row.detach()})

    def on_input(self, x: Tensor, sel: Selection) -> Tensor:
        return x * per_sample(self.scale, sel, x, 1.0) if self.feedforward else x

    def on_output(self, x: Tensor, y: Tensor, sel: Selection) -> Tensor:
        return y if self.feedforward else y * per_sample(self.scale, sel, y, 1.0)

    def merge_slot(self, wrapper: DeltaWrapper, s: int, sign: float) -> None:
        scale = self.scale[s].to(wrapper.weight.dtype)
        scale = scale if sign > 0 else 1.0 / scale
        if self.feedforward:
            wrapper.weight.mul_(scale[None, :])
        else:
            wrapper.weight.mul_(scale[:, None])
            if wrapper.bias is not None:
                wrapper.bias.mul_(scale)

    def _file_shape(self) -> tuple[int, int]:
        return (1, self.dim) if self.feedforward else (self.dim, 1)

    def slot_state(self, s: int) -> dict[str, Tensor]:
        return {"ia3_l": self.scale[s].detach().reshape(self._file_shape())}

    def load_slot_state(self, s: int, tensors: dict[str, Tensor]) -> None:
        check_shape("ia3_l", tensors["ia3_l"], self._file_shape())
        self.scale.data[s].copy_(tensors["ia3_l"].reshape(-1))


class IA3(WrapperMethod[IA3Config, IA3Part]):
    name = "ia3"
    config_class = IA3Config
    peft_type = "IA3"
    mergeable = True
    part_class = IA3Part
    part_keys = ("ia3_l",)

    def targets(self, model: nn.Module, config: IA3Config) -> dict[str, dict[str, Any]]:
        paths = match_targets(model, config.targets, (nn.Linear,), config.layers)
        ff = set(match_targets(model, config.feedforward, (nn.Linear,), config.layers)) if config.feedforward else set()
        stray = ff - set(paths)
        if stray:
            raise DeltaError(f"IA3 feedforward modules must be targets too; {sorted(stray)[0]} is not: add it to targets")
        return {p: {"feedforward": p in ff} for p in paths}

    def new_part(self, wrapper: DeltaWrapper, router: DeltaRouter, options: dict[str, Any]) -> IA3Part:
        return IA3Part(router, wrapper, options["feedforward"])

    def file_config(self, model: nn.Module, name: str, config: IA3Config) -> dict[str, Any]:
        modules, ff = [], []
        for path, _, part in self.parts(model, name):
            hf = backbone_relative(model, hf_name(model, path))
            modules.append(hf)
            if part.feedforward:
                ff.append(hf)
        return {"peft_type": self.peft_type, "task_type": task_type(model, prompt_learning=False),
                "base_model_name_or_path": base_model_name(model), "inference_mode": True,
                "target_modules": sorted(modules), "feedforward_modules": sorted(ff), "fan_in_fan_out": False,
                "init_ia3_weights": True, "modules_to_save": None}

    def config_from_file(self, data: dict[str, Any], model: nn.Module) -> IA3Config:
        if data.get("fan_in_fan_out"):
            raise DeltaError("this IA3 file uses fan_in_fan_out=True (Conv1D layers), which BERT-style models do not "
                             "have: it was trained on another architecture")
        targets = data.get("target_modules")
        if not targets:
            raise DeltaError("this IA3 adapter_config.json has no target_modules: the file is incomplete")
        ff = data.get("feedforward_modules") or ()
        exclude = data.get("exclude_modules")
        targets = without_excluded(model, targets, exclude)
        if exclude and ff:  # feed-forward modules peft excluded are no targets, so no feed-forward ones either
            ff = tuple(p for p in match_targets(model, ff) if p in set(targets))
        return IA3Config(
            targets=targets,
            feedforward=ff if isinstance(ff, str) else tuple(ff),
            modules_to_save=tuple(data["modules_to_save"]) if data.get("modules_to_save") else None,
        )


register(IA3())
