"""Position-wise feed-forward blocks and the activations configs name."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .linear import Linear

#: In-place variants, used when no gradient is recorded: saves one large allocation per layer.
INPLACE_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": torch.ops.aten.gelu_,
    "relu": torch.relu_,
    "silu": lambda x: F.silu(x, inplace=True),
    "swish": lambda x: F.silu(x, inplace=True),
}

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": F.tanh,
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """Look up an activation by its Hugging Face config name."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"unknown activation {name!r}: use one of {', '.join(sorted(ACTIVATIONS))}") from None


class FeedForward(nn.Module):
    """``down(act(up(x)))``: the two-layer MLP of BERT and GPT-2."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        self.up = Linear(dim, hidden, bias=bias)
        self.down = Linear(hidden, dim, bias=bias)
        self.act_name = act
        self.act = activation(act)
        self.act_inplace = INPLACE_ACTIVATIONS.get(act)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.up(x)
        if self.act_inplace is not None and not torch.is_grad_enabled():
            return self.down(self.act_inplace(hidden))
        return self.down(self.act(hidden))


class GatedFeedForward(nn.Module):
    """``down(act(gate(x)) * up(x))``: the gated MLP of Llama (SwiGLU with ``act="silu"``; Shazeer 2020)."""

    def __init__(self, dim: int, hidden: int, act: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.gate = Linear(dim, hidden, bias=bias)
        self.up = Linear(dim, hidden, bias=bias)
        self.down = Linear(hidden, dim, bias=bias)
        self.act_name = act
        self.act = activation(act)
        self.act_inplace = INPLACE_ACTIVATIONS.get(act)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate(x)
        if self.act_inplace is not None and not torch.is_grad_enabled():
            return self.down(self.act_inplace(gate).mul_(self.up(x)))
        return self.down(self.act(gate) * self.up(x))
