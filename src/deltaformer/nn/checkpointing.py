"""Gradient checkpointing: a layer keeps only its inputs in the forward and runs again in the backward.

:func:`checkpoint_layers` makes each layer of a stack call itself through ``torch.utils.checkpoint``
(non-reentrant, so no input needs ``requires_grad`` and keyword arguments, non-tensor arguments and nested
autograd Functions such as a quantized layer's blockwise product all work). The module tree, parameter names
and state dict are unchanged: the layer's ``forward`` is shadowed by an instance attribute (a ``partial``, so
``copy.deepcopy`` and pickling carry it over to the copy), removed again by ``enable=False``.

Recomputation sees what the forward saw:

* torch's RNG state (CPU, and each device of the tensor arguments) is put back, so a dropout mask is drawn
  again identically (:mod:`deltaformer.nn.dropout` seeds its generator from torch's);
* ``context``, when given, is called at forward time and returns a factory of the context manager the
  recomputation runs under: a model passes its delta router's state, so a backward that runs after a routing
  block closed recomputes with the routing of the forward.

A layer runs plainly (nothing saved, nothing recomputed) outside training mode, with gradients off, or when
an argument is a KV cache layer: recomputing would write the cache twice.

:func:`chunked_loss` is the same idea for a model's output head: the loss of ``rows`` at a time, each chunk's
logits recomputed in the backward, so the (tokens x vocabulary) logits, their log-softmax and their gradient
never exist whole.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .kv_cache import LayerCache

#: ``context()`` at forward time -> a factory of the context manager the recomputation runs under.
RecomputeContext = Callable[[], Callable[[], contextlib.AbstractContextManager[Any]]]


def checkpoint_layers(layers: Iterable[nn.Module], enable: bool = True,
                      context: RecomputeContext | None = None) -> int:
    """Checkpoint (or, with ``enable=False``, stop checkpointing) each of ``layers``; returns how many."""
    count = 0
    for layer in layers:
        if enable:
            layer.__dict__["forward"] = functools.partial(_checkpointed, layer, context)
        else:
            layer.__dict__.pop("forward", None)
        count += 1
    return count


def is_checkpointed(layer: nn.Module) -> bool:
    forward = layer.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _checkpointed


def _checkpointed(layer: nn.Module, context: RecomputeContext | None, *args: Any, **kwargs: Any) -> Any:
    forward = type(layer).forward
    if (not layer.training or not torch.is_grad_enabled()
            or any(isinstance(a, LayerCache) for a in (*args, *kwargs.values()))):
        return forward(layer, *args, **kwargs)
    if context is None:
        return checkpoint(forward, layer, *args, use_reentrant=False, **kwargs)
    restored = context()
    return checkpoint(forward, layer, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), restored()), **kwargs)


def chunked_loss(head: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor, rows: int,
                 ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of ``head(hidden)`` (fp32) against ``targets`` over the targets that are not
    ``ignore_index``, computed ``rows`` positions at a time with each chunk checkpointed: equal to
    ``F.cross_entropy(head(hidden).float(), targets, ignore_index=...)`` (up to the order of the sum), without
    the whole logits. ``hidden`` is (N, H), ``targets`` (N,)."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")

    def part(h: Tensor, t: Tensor) -> Tensor:
        logits = head(h).float()
        return torch.nn.functional.cross_entropy(logits, t, ignore_index=ignore_index, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start:start + rows], targets[start:start + rows]
        if bool((t != ignore_index).any()):
            total = total + checkpoint(part, h, t, use_reentrant=False)
    return total / (targets != ignore_index).sum()
