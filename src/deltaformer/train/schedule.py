"""Learning-rate schedules: linear warmup, then linear or cosine decay (or constant).

The schedule is a small callable object rather than a lambda so ``LambdaLR.state_dict()`` records its
settings as plain numbers, which the checkpoint stores as JSON.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine", "constant")


class WarmupDecay:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""

    def __init__(self, total_steps: int, warmup_steps: int = 0, kind: str = "linear", min_ratio: float = 0.0):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}: use one of {', '.join(SCHEDULES)}")
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, min(int(warmup_steps), self.total_steps))
        self.kind = kind
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * decay


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, kind: str = "linear"
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :class:`WarmupDecay`; warmup starts above zero so step 0 already learns."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(total_steps, warmup_steps, kind))
