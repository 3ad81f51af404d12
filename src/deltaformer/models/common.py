"""What the model assemblies share: input checks and masks, the residual add, head init, the classification loss.

BERT, Longformer and LED (and the decoders) use these; they live here so no model file borrows from another.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import ConfigError, InputError


def residual_add(branch: Tensor, x: Tensor) -> Tensor:
    """``branch + x``, in place into the fresh ``branch`` when no gradient is recorded (one allocation less)."""
    return branch.add_(x) if not torch.is_grad_enabled() else branch + x


def embed_inputs(
    tokens: nn.Embedding, input_ids: Tensor | None, inputs_embeds: Tensor | None,
    attention_mask: Tensor | None, token_type_ids: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The first step of every encoder forward: checked token embeddings (or the caller's), and the default
    all-ones attention mask and all-zeros segment ids where none are given."""
    if (input_ids is None) == (inputs_embeds is None):
        raise InputError("pass exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        assert input_ids is not None  # exactly one of them is given
        check_token_ids(input_ids, tokens.num_embeddings)
        inputs_embeds = tokens(input_ids)
    batch, seq = inputs_embeds.shape[:2]
    device = inputs_embeds.device
    if attention_mask is None:
        attention_mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    if token_type_ids is None:
        token_type_ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    return inputs_embeds, attention_mask, token_type_ids


def check_token_ids(input_ids: Tensor, vocab_size: int) -> None:
    """Out-of-range ids would index garbage (or crash on GPU); say which id is wrong instead."""
    if torch.compiler.is_compiling():  # a data-dependent check would break the graph; eager runs check
        return
    if input_ids.numel() and (int(input_ids.max()) >= vocab_size or int(input_ids.min()) < 0):
        bad = int(input_ids.max()) if int(input_ids.max()) >= vocab_size else int(input_ids.min())
        raise InputError(f"token id {bad} is outside the vocabulary (size {vocab_size}): use the model's tokenizer")


def check_length(seq: int, limit: int) -> None:
    if seq > limit:
        raise InputError(
            f"input of {seq} tokens is longer than the model's {limit} positions: truncate it "
            "(tokenizer truncation=True, max_length) or convert the model to a Longformer (deltaformer convert-long)"
        )


def key_mask_from(attention_mask: Tensor) -> Tensor | None:
    """(B, S) 0/1 mask -> bool key mask, or None when nothing is padded (lets SDPA take its fastest kernel)."""
    mask = attention_mask.to(torch.bool)
    if torch.compiler.is_compiling():
        return mask
    return None if bool(mask.all()) else mask


def classification_loss(logits: Tensor, labels: Tensor, num_labels: int, problem_type: str | None = None) -> Tensor:
    """The loss of HF's ``problem_type``: cross-entropy (single-label classification, the default), mean squared
    error (regression), binary cross-entropy per label (multi-label). The number of labels never picks it: a
    one-class classifier would otherwise silently become a regression."""
    if problem_type == "regression":
        target = labels.to(logits.dtype)
        return F.mse_loss(logits.view(-1), target.view(-1)) if num_labels == 1 else F.mse_loss(logits, target)
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    if problem_type not in (None, "single_label_classification"):
        raise ConfigError(f"unknown problem_type {problem_type!r}: use single_label_classification, "
                          "multi_label_classification or regression")
    if num_labels < 2:
        raise InputError(f"a classification head needs at least two labels, this one has {num_labels}: for a "
                         "regression head set problem_type='regression' in the model config")
    valid = labels[labels != -100]
    if valid.numel() and (int(valid.max()) >= num_labels or int(valid.min()) < 0):
        bad = int(valid.max()) if int(valid.max()) >= num_labels else int(valid.min())
        raise InputError(f"label {bad} is outside the label set 0..{num_labels - 1}: check the label mapping")
    return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1), ignore_index=-100)


def init_head(model: nn.Module, config: ModelConfig, only: tuple[nn.Module, ...] | None = None) -> None:
    """Initialise head modules the way the backbone is initialised (normal(0, initializer_range))."""
    for module in only or (model,):
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                nn.init.normal_(sub.weight, std=config.initializer_range)
                nn.init.zeros_(sub.bias)
            elif isinstance(sub, nn.LayerNorm):
                nn.init.ones_(sub.weight)
                nn.init.zeros_(sub.bias)
