"""Dropout whose random mask is cheap on CPU.

On CPU, drawing the mask is most of dropout's cost, and dropout is a large part of a training step: torch's
CPU generator hands out one number per element under a lock (``bernoulli_`` on 38M elements took 408 ms on
a 2-core machine, while the softmax it follows took 102 ms). Attention-probability dropout on long inputs
makes it the largest single cost of a Longformer training step (35% of CPU time at 8 x 512 tokens).

Here the mask comes from numpy's PCG64 instead: one 64-bit word gives four 16-bit lanes, and a lane below
``round(p * 65536)`` drops its element (77 ms for the same 38M elements). So the rate is ``p`` to within
1/131072, and kept elements are scaled by ``1 / (1 - rate)`` for that exact rate, so expectations are
unchanged. The generator is seeded by one draw from torch's own generator: ``torch.manual_seed`` makes
runs repeatable and a saved torch RNG state resumes them exactly, as with ``F.dropout``. Other devices,
small tensors and rates that round to 0 or 1 keep ``F.dropout``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Elements below which F.dropout's own mask is as cheap as setting up a generator.
MIN_PACKED = 1 << 16
_LEVELS = 1 << 16


def drop_mask(shape: torch.Size | tuple[int, ...], p: float) -> tuple[Tensor, float]:
    """A CPU bool mask, True = drop, at rate ``round(p * 65536) / 65536``, and the scale for kept elements."""
    levels = round(p * _LEVELS)
    count = math.prod(shape)
    seed = int(torch.randint(0, 2**62, ()))  # one draw: torch.manual_seed and torch's RNG state govern the mask
    words = np.random.Generator(np.random.PCG64(seed)).bit_generator.random_raw(-(-count // 4))
    lanes = torch.from_numpy(words.view(np.int16)[:count])
    return (lanes < levels - _LEVELS // 2).view(shape), _LEVELS / (_LEVELS - levels)


def packable(x: Tensor, p: float) -> bool:
    """Whether :func:`drop_mask` serves ``x``: a large CPU tensor and a rate that does not round to 0 or 1."""
    return x.device.type == "cpu" and x.numel() >= MIN_PACKED and 0 < round(p * _LEVELS) < _LEVELS


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout`` with a cheap mask on CPU (see the module docstring); the backward keeps only the mask."""
    if not training or p == 0:
        return x
    if not packable(x, p):
        return F.dropout(x, p, True)
    drop, scale = drop_mask(x.shape, p)
    return (x * scale).masked_fill_(drop, 0)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, same state) computed by :func:`dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            return F.dropout(x, self.p, self.training, inplace=True)
        return dropout(x, self.p, self.training)
