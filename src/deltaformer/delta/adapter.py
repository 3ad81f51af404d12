"""Bottleneck adapters: ``h + up(act(down(h)))`` after a projection, before dropout, residual and LayerNorm.

Houlsby et al. (2019) place one after the attention output projection and one after the feed-forward down
projection; Pfeiffer et al. (2021) only the latter. We wrap ``attn.out`` / ``mlp.down`` and add the
adapter to their output. The up projection starts at zero, so a fresh adapter is the identity.
Stacked per layer: ``down`` (n, r_max, dim), ``down_bias`` (n, r_max), ``up`` (n, dim, r_max), ``up_bias``
(n, dim); smaller sizes are zero-padded, exact because every activation offered maps 0 to 0.
Adapters cannot merge: the non-linearity sits between two matrices, so no single weight equals them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DeltaError
from .config import DeltaConfig
from .method import WrapperMethod, register
from .ops import check_shape, kaiming_rows
from .routing import DeltaRouter, Selection
from .targets import match_targets
from .wrappers import DeltaWrapper, LayerPart

#: Non-linearities with act(0) == 0 (zero padding of smaller adapters stays exact).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu, "swish": F.silu}
PLACES = {"houlsby": ("attn.out", "mlp.down"), "pfeiffer": ("mlp.down",)}


@dataclass
class AdapterConfig(DeltaConfig):
    """``kind``: "houlsby" (after attention and feed-forward) or "pfeiffer" (after feed-forward only);
    ``bottleneck``: size r; ``residual``: add the adapter to its input (False: replace it)."""

    method: ClassVar[str] = "adapter"
    finetune_lr: ClassVar[float] = 1e-3
    kind: str = field(default="houlsby", metadata={"help": "houlsby (after attention and feed-forward) or pfeiffer"})
    bottleneck: int = field(default=64, metadata={"help": "adapter bottleneck size", "cli": "bottleneck",
                                                   "finetune": 64, "aliases": ("reduction", "hidden")})
    non_linearity: str = field(default="relu", metadata={"help": "activation between the two projections"})
    residual: bool = field(default=True, metadata={"help": "add the adapter to its input (False: replace it)"})
    targets: tuple[str, ...] | None = field(default=None, metadata={
        "help": "modules the adapters follow (None: those of kind)", "cli": "targets"})
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "only these layer indices"})
    modules_to_save: tuple[str, ...] | None = field(default=None, metadata={
        "help": "head modules trained and saved with the delta (None: the model's task head)"})

    def __post_init__(self) -> None:
        if self.kind not in PLACES:
            raise DeltaError(f"adapter kind {self.kind!r} is unknown: use one of {', '.join(PLACES)}")
        if self.non_linearity not in ACTIVATIONS:
            raise DeltaError(f"adapter non_linearity {self.non_linearity!r}: use one of {', '.join(ACTIVATIONS)}")
        if self.bottleneck < 1:
            raise DeltaError(f"adapter bottleneck {self.bottleneck} must be at least 1")


class AdapterPart(LayerPart[AdapterConfig]):
    method = "adapter"
    stacked = ("down", "down_bias", "up", "up_bias")
    slot_lists = ("sizes", "acts", "residuals")
    down: Tensor  # (n, r_max, dim), registered by stack_add
    down_bias: Tensor
    up: Tensor
    up_bias: Tensor
    residual_vec: Tensor

    def __init__(self, router: DeltaRouter, wrapper: DeltaWrapper) -> None:
        super().__init__(router)
        self.dim = wrapper.out_features
        self.sizes: list[int] = []
        self.acts: list[str] = []
        self.residuals: list[bool] = []
        self.register_buffer("residual_vec", torch.zeros(0), persistent=False)

    def add_slot(self, name: str, config: AdapterConfig, wrapper: DeltaWrapper, options: Mapping[str, Any]) -> None:
        r, like = config.bottleneck, wrapper.like
        bound = 1 / math.sqrt(self.dim)
        rows = {
            "down": kaiming_rows(r, self.dim, like), "down_bias": like.new_empty(r).uniform_(-bound, bound),
            "up": like.new_zeros(self.dim, r), "up_bias": like.new_zeros(self.dim),
        }
        self.stack_add(name, {k: v.detach() for k, v in rows.items()})
        self.sizes.append(r)
        self.acts.append(config.non_linearity)
        self.residuals.append(config.residual)
        self.refresh()

    def refresh(self) -> None:
        self.residual_vec = torch.tensor([float(r) for r in self.residuals], dtype=self.up.dtype, device=self.up.device)

    def _one(self, h: Tensor, s: int) -> Tensor:
        r = self.sizes[s]
        z = ACTIVATIONS[self.acts[s]](F.linear(h, self.down[s, :r], self.down_bias[s, :r]))
        out = F.linear(z, self.up[s, :, :r], self.up_bias[s])
        return h + out if self.residuals[s] else out

    def on_output(self, x: Tensor, y: Tensor, sel: Selection) -> Tensor:
        if sel.index is None:
            for s in sel.each:
                y = self._one(y, s)
            return y
        index, r = sel.index, max(self.sizes[s] for s in sel.used)
        h = y.reshape(y.shape[0], -1, self.dim)
        z = torch.baddbmm(self.down_bias[index, :r][:, None, :], h, self.down[index, :r].transpose(1, 2))
        acts = {self.acts[s] for s in sel.used}
        if len(acts) == 1:
            z = ACTIVATIONS[acts.pop()](z)
        else:  # one pass per distinct activation (not per sample), each sample picks its own
            kind = torch.tensor([sorted(acts).index(self.acts[s]) if s in sel.used else 0
                                 for s in range(len(self.slots))], device=z.device)[index]
            picked = [torch.where((kind == i)[:, None, None], ACTIVATIONS[a](z), 0.0) for i, a in enumerate(sorted(acts))]
            z = picked[0]
            for more in picked[1:]:
                z = z + more
        out = torch.baddbmm(self.up_bias[index][:, None, :], z, self.up[index, :, :r].transpose(1, 2))
        keep = sel.keep_like(out, 2)
        skip = self.residual_vec[index].to(h.dtype)[:, None, None]
        if keep is not None:
            out, skip = out * keep, 1.0 - keep * (1.0 - skip)
        return (h * skip + out).view_as(y)

    def slot_state(self, s: int) -> dict[str, Tensor]:
        r = self.sizes[s]
        return {"adapter_down.weight": self.down[s, :r].detach(), "adapter_down.bias": self.down_bias[s, :r].detach(),
                "adapter_up.weight": self.up[s, :, :r].detach(), "adapter_up.bias": self.up_bias[s].detach()}

    def load_slot_state(self, s: int, tensors: dict[str, Tensor]) -> None:
        r = self.sizes[s]
        shapes = {"adapter_down.weight": (r, self.dim), "adapter_down.bias": (r,), "adapter_up.weight": (self.dim, r),
                  "adapter_up.bias": (self.dim,)}
        for key, shape in shapes.items():
            check_shape(key, tensors[key], shape)
        with torch.no_grad():
            for param in (self.down, self.down_bias, self.up, self.up_bias):
                param[s].zero_()
            self.down[s, :r].copy_(tensors["adapter_down.weight"])
            self.down_bias[s, :r].copy_(tensors["adapter_down.bias"])
            self.up[s, :, :r].copy_(tensors["adapter_up.weight"])
            self.up_bias[s].copy_(tensors["adapter_up.bias"])

    def slot_numel(self, slot: int) -> int:
        return self.sizes[slot] * (2 * self.dim + 1) + self.dim


class Adapter(WrapperMethod[AdapterConfig, AdapterPart]):
    name = "adapter"
    config_class = AdapterConfig
    peft_type = "DELTAFORMER_ADAPTER"
    merge_reason = "a non-linearity sits between its two projections, so no single weight matrix equals it"
    part_class = AdapterPart
    part_keys = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")

    def new_part(self, wrapper: DeltaWrapper, router: DeltaRouter, options: dict[str, Any]) -> AdapterPart:
        return AdapterPart(router, wrapper)

    def targets(self, model: nn.Module, config: AdapterConfig) -> dict[str, dict[str, Any]]:
        names = config.targets if config.targets is not None else PLACES[config.kind]
        return {p: {} for p in match_targets(model, names, (nn.Linear,), config.layers)}


register(Adapter())
