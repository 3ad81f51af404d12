"""Per-layer features for probing studies: what each layer of an encoder (with its deltas) makes linearly readable.

Probing is a training mode, not a delta, so it lives here. The ``probe`` fine-tuning method
(:mod:`deltaformer.train.methods`) trains the model's own head on its last layer. Probe studies instead fit a separate small classifier on *every* layer, so they need one pooled vector
per example and per layer; :func:`layer_features` extracts them once, under ``no_grad`` and in eval mode,
from the encoder with whatever deltas are active (wrap the call in :func:`~deltaformer.delta.bare` or
:func:`~deltaformer.delta.set_active` to choose).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from ..delta.host import host_or_none
from ..errors import DeltaError

POOLINGS = ("cls", "mean")
#: Batch keys passed on to the encoder; others (labels, ids of examples) are ignored.
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "global_attention_mask")


def layer_features(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], pooling: str = "cls") -> Tensor:
    """(layers + 1, examples, hidden) float32 features on the CPU, examples in batch order.

    Layer 0 is the embedding output, layer i the output of block i. ``pooling``: ``"cls"`` takes the first
    position (what BERT's pooler reads); ``"mean"`` averages the positions the attention mask keeps, so
    padding never counts (with prompt-based deltas, the soft tokens count as the model attends to them).
    """
    if pooling not in POOLINGS:
        raise DeltaError(f"pooling {pooling!r} is unknown: use one of {', '.join(POOLINGS)}")
    encoder = encoder_of(model)
    device = next(encoder.parameters()).device
    was_training = model.training
    model.eval()  # dropout would make features differ between extractions
    try:
        with torch.no_grad():
            chunks = [_pooled(encoder, batch, pooling, device) for batch in batches]
    finally:
        model.train(was_training)
    if not chunks:
        raise DeltaError("layer_features got no batches: pass at least one batch with input_ids")
    return torch.cat(chunks, dim=1)


def encoder_of(model: nn.Module) -> nn.Module:
    """The encoder that owns the layers: the model itself, or its backbone (task models)."""
    host = host_or_none(model)
    encoder = host.delta_backbone() if host is not None else None
    if not isinstance(encoder, nn.Module):
        raise DeltaError(f"{type(model).__name__} has no encoder layers to probe: pass an encoder or task model")
    return encoder


def _pooled(encoder: nn.Module, batch: Mapping[str, Tensor], pooling: str, device: torch.device) -> Tensor:
    """(layers + 1, batch, hidden) pooled states of one batch."""
    inputs = {k: batch[k].to(device) for k in INPUT_KEYS if batch.get(k) is not None}
    if "input_ids" not in inputs:
        raise DeltaError("a batch given to layer_features has no input_ids: pass tokenizer output batches")
    masks: list[Tensor] = []
    host = host_or_none(encoder)
    hook = host.prompt_hook() if host is not None else None
    handle = hook.register_forward_hook(lambda m, args, out: masks.append(out[1])) if hook is not None else None
    try:
        states = torch.stack(encoder(**inputs, output_hidden_states=True).hidden_states)
    finally:
        if handle is not None:
            handle.remove()
    if pooling == "cls":
        return states[:, :, 0].float().cpu()
    mask = masks[-1] if masks else inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    weights = mask[None, :, :, None].to(states.dtype)  # the prompt hook's mask covers its soft tokens too
    return ((states * weights).sum(2) / weights.sum(2).clamp_min(1)).float().cpu()
