"""LoRA (Hu et al., 2021): ``W x + (alpha / r) B A x`` with A (r, in), B (out, r) trained, W frozen.

Stacked per layer as ``A`` (n_deltas, r_max, in) and ``B`` (n_deltas, out, r_max); a delta of smaller rank
is zero-padded, which is exact (padded rows of A meet zero columns of B, and neither gets a gradient).
Initialised as peft does: A kaiming-uniform(a=sqrt(5)), B zeros, so a fresh delta changes nothing.
Files use peft's format (``...query.lora_A.weight``), so adapters load both ways.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DeltaError
from .config import DeltaConfig
from .files import base_model_name, task_type
from .method import WrapperMethod, register
from .ops import add_product, check_shape, kaiming_rows, sample_dropout
from .routing import DeltaRouter, Selection
from .targets import backbone_relative, hf_name, match_targets, pattern_value, without_excluded
from .wrappers import DeltaWrapper, LayerPart


@dataclass
class LoraConfig(DeltaConfig):
    """``targets``: module names (ours or HF's, last components), a regex, or ``"all-linear"``.

    ``rslora``: scale by alpha / sqrt(r) (Kalajdzievski, 2023) instead of alpha / r. ``rank_pattern`` /
    ``alpha_pattern``: per-module overrides keyed by (a regex of) the name's end, as in peft. ``layers``:
    only these layer indices. ``init=False`` gives B random too (a delta that is not the identity).
    """

    method: ClassVar[str] = "lora"
    finetune_lr: ClassVar[float] = 2e-3
    #: Fine-tuning defaults (``finetune`` metadata) chosen on rt-polarity with MiniLM: over 3 seeds, r=16
    #: (alpha 32) on query/value at lr 2e-3 for 3 epochs reached 0.816 test accuracy against 0.809 for full
    #: fine-tuning (r=8 at 1e-3: 0.791). The field defaults are peft's.
    r: int = field(default=8, metadata={"help": "LoRA rank r", "cli": "rank", "finetune": 16})
    alpha: float = field(default=8.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)",
                                                 "cli": "alpha", "finetune": 32.0, "aliases": ("lora_alpha",)})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the delta's input", "cli": "dropout",
                                                   "finetune": 0.1, "aliases": ("lora_dropout",)})
    targets: tuple[str, ...] | str = field(default=("query", "value"), metadata={
        "help": "module names the delta wraps (ours or HF's, last components), a regex, or all-linear",
        "cli": "targets", "finetune": ("query", "value"), "aliases": ("target_modules",)})
    rslora: bool = field(default=False, metadata={"help": "scale by alpha / sqrt(r) instead of alpha / r"})
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "per-module ranks, by name regex"})
    alpha_pattern: dict[str, float] = field(default_factory=dict, metadata={"help": "per-module alphas, by name regex"})
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "only these layer indices"})
    init: bool = field(default=True, metadata={"help": "B starts at zero (False: random, not the identity)"})
    modules_to_save: tuple[str, ...] | None = field(default=None, metadata={
        "help": "head modules trained and saved with the delta (None: the model's task head)"})

    def __post_init__(self) -> None:
        if self.r < 1:
            raise DeltaError(f"LoRA rank r={self.r} must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise DeltaError(f"LoRA dropout {self.dropout} must be in [0, 1)")


class LoraPart(LayerPart[LoraConfig]):
    """LoRA matrices of every LoRA delta on one linear layer."""

    method = "lora"
    stacked = ("A", "B")
    slot_lists = ("ranks", "scales", "dropouts")
    A: Tensor  # (n_deltas, r_max, in), registered by stack_add
    B: Tensor  # (n_deltas, out, r_max)
    scale_vec: Tensor
    dropout_vec: Tensor

    def __init__(self, router: DeltaRouter, wrapper: DeltaWrapper) -> None:
        super().__init__(router)
        self.in_features = wrapper.in_features
        self.out_features = wrapper.out_features
        self.ranks: list[int] = []
        self.scales: list[float] = []
        self.dropouts: list[float] = []
        self.register_buffer("scale_vec", torch.zeros(0), persistent=False)
        self.register_buffer("dropout_vec", torch.zeros(0), persistent=False)

    def add_slot(self, name: str, config: LoraConfig, wrapper: DeltaWrapper, options: Mapping[str, Any]) -> None:
        rank, alpha = int(options["rank"]), float(options["alpha"])
        like = wrapper.like
        a = kaiming_rows(rank, self.in_features, like)
        b = kaiming_rows(self.out_features, rank, like) if not config.init else like.new_zeros(self.out_features, rank)
        self.stack_add(name, {"A": a.detach(), "B": b.detach()})
        self.ranks.append(rank)
        self.scales.append(alpha / math.sqrt(rank) if config.rslora else alpha / rank)
        self.dropouts.append(config.dropout)
        self.refresh()

    def refresh(self) -> None:
        device = self.A.device
        self.scale_vec = torch.tensor(self.scales, dtype=self.A.dtype, device=device)
        self.dropout_vec = torch.tensor(self.dropouts, dtype=torch.float32, device=device)

    def on_output(self, x: Tensor, y: Tensor, sel: Selection) -> Tensor:
        """``y + scale * (x A^T) B^T``: the rank-r product first, then one fused addmm/baddbmm into ``y``."""
        if sel.index is None:
            for s in sel.each:
                r = self.ranks[s]
                h = F.linear(sample_dropout(x, self.dropouts[s], self.training), self.A[s, :r])
                y = add_product(y, h, self.B[s, :, :r], self.scales[s])
            return y
        index, r = sel.index, max(self.ranks[s] for s in sel.used)
        rates = {self.dropouts[s] for s in sel.used}
        p = rates.pop() if len(rates) == 1 else self.dropout_vec[index]
        xs = sample_dropout(x, p, self.training).reshape(x.shape[0], -1, self.in_features)
        scale = self.scale_vec[index]
        keep = sel.keep_like(scale)
        if keep is not None:
            scale = scale * keep
        h = torch.bmm(xs, self.A[index, :r].transpose(1, 2)) * scale[:, None, None]
        return add_product(y, h, self.B[index, :, :r], 1.0)

    def merge_slot(self, wrapper: DeltaWrapper, s: int, sign: float) -> None:
        r = self.ranks[s]
        update = (self.B[s, :, :r] @ self.A[s, :r]) * (sign * self.scales[s])
        wrapper.weight.add_(update.to(wrapper.weight.dtype))

    def slot_state(self, s: int) -> dict[str, Tensor]:
        r = self.ranks[s]
        return {"lora_A.weight": self.A[s, :r].detach(), "lora_B.weight": self.B[s, :, :r].detach()}

    def load_slot_state(self, s: int, tensors: dict[str, Tensor]) -> None:
        r = self.ranks[s]
        check_shape("lora_A.weight", tensors["lora_A.weight"], (r, self.in_features))
        check_shape("lora_B.weight", tensors["lora_B.weight"], (self.out_features, r))
        with torch.no_grad():
            self.A[s].zero_()
            self.B[s].zero_()
            self.A[s, :r].copy_(tensors["lora_A.weight"])
            self.B[s, :, :r].copy_(tensors["lora_B.weight"])

    def slot_numel(self, slot: int) -> int:
        return self.ranks[slot] * (self.in_features + self.out_features)


class Lora(WrapperMethod[LoraConfig, LoraPart]):
    name = "lora"
    config_class = LoraConfig
    peft_type = "LORA"
    mergeable = True
    part_class = LoraPart
    part_keys = ("lora_A.weight", "lora_B.weight")

    def new_part(self, wrapper: DeltaWrapper, router: DeltaRouter, options: dict[str, Any]) -> LoraPart:
        return LoraPart(router, wrapper)

    def targets(self, model: nn.Module, config: LoraConfig) -> dict[str, dict[str, Any]]:
        out = {}
        for path in match_targets(model, config.targets, (nn.Linear,), config.layers):
            names = (path, hf_name(model, path))
            out[path] = {
                "rank": int(pattern_value(config.rank_pattern, names, config.r)),
                "alpha": float(pattern_value(config.alpha_pattern, names, config.alpha)),
            }
        return out

    def file_config(self, model: nn.Module, name: str, config: LoraConfig) -> dict[str, Any]:
        modules, ranks, alphas = [], {}, {}
        for path, _, part in self.parts(model, name):
            hf = backbone_relative(model, hf_name(model, path))
            modules.append(hf)
            s = part.slot(name)
            if part.ranks[s] != config.r:
                ranks[hf] = part.ranks[s]
            alpha = part.scales[s] * (math.sqrt(part.ranks[s]) if config.rslora else part.ranks[s])
            if not math.isclose(alpha, config.alpha):
                alphas[hf] = alpha
        return {
            "peft_type": self.peft_type, "task_type": task_type(model, prompt_learning=False),
            "base_model_name_or_path": base_model_name(model), "inference_mode": True,
            "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
            "target_modules": sorted(modules), "use_rslora": config.rslora,
            "rank_pattern": ranks, "alpha_pattern": alphas, "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
            "modules_to_save": None,
        }

    def config_from_file(self, data: dict[str, Any], model: nn.Module) -> LoraConfig:
        unsupported = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "layer_replication": None,
                       "use_qalora": False}
        for key, ok in unsupported.items():
            if data.get(key, ok) not in (ok, [], {}):
                raise DeltaError(f"this LoRA file uses {key}={data[key]!r}, which deltaformer does not support: "
                                 "re-train without it")
        if data.get("bias", "none") != "none":
            raise DeltaError(f"this LoRA file trains biases (bias={data['bias']!r}); deltaformer's LoRA does not: "
                             "re-train with bias='none' or add a BitFit delta")
        targets = data.get("target_modules")
        if not targets:
            raise DeltaError("this LoRA adapter_config.json has no target_modules: the file is incomplete")
        layers = data.get("layers_to_transform")
        return LoraConfig(
            r=int(data.get("r", 8)), alpha=float(data.get("lora_alpha", 8)), dropout=float(data.get("lora_dropout", 0.0)),
            targets=without_excluded(model, targets, data.get("exclude_modules")), rslora=bool(data.get("use_rslora", False)),
            rank_pattern=dict(data.get("rank_pattern") or {}), alpha_pattern=dict(data.get("alpha_pattern") or {}),
            layers=(layers,) if isinstance(layers, int) else tuple(layers) if layers else None,
            modules_to_save=tuple(data["modules_to_save"]) if data.get("modules_to_save") else None,
        )


register(Lora())
