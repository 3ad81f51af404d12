"""Soft tokens of a template (``{soft}``, ``{soft:N}``), trained as a P-tuning delta at placeholder positions.

The renderer writes a placeholder token id wherever the template has soft tokens; the P-tuning delta
(:class:`deltaformer.delta.PTuningConfig` with ``placeholder_id``) replaces the j-th placeholder's embedding
by its j-th soft token, produced by its prompt encoder. So the soft tokens are an ordinary named delta: saved,
loaded and routed per sample like any other, and combinable with LoRA & co. on the same model.

The placeholder is a vocabulary entry that text never tokenizes to (BERT's ``[unused0]``), else the unknown
token, else the last id; the renderer refuses any text that contains it.
"""

from __future__ import annotations

from torch import nn

from .. import delta
from ..errors import PromptError
from .templates import Template

PLACEHOLDERS = ("[unused0]", "<unused0>")


def placeholder_id(tokenizer) -> int:
    """The id the renderer writes at soft-token positions."""
    vocab = tokenizer.get_vocab()
    for token in PLACEHOLDERS:
        if token in vocab:
            return int(vocab[token])
    if tokenizer.unk_token_id is not None:
        return int(tokenizer.unk_token_id)
    return len(vocab) - 1


def attach_soft_tokens(model: nn.Module, template: Template, name: str, tokenizer, encoder: str = "mlp") -> int:
    """Attach the template's soft tokens as P-tuning delta ``name``; returns the placeholder id to render with."""
    if not template.soft_tokens:
        raise PromptError(f"template {template.source!r} has no soft tokens ({{soft}} or {{soft:N}}) to attach")
    pid = placeholder_id(tokenizer)
    delta.attach(model, delta.PTuningConfig(num_virtual_tokens=template.soft_tokens, encoder=encoder,
                                            placeholder_id=pid), name)
    return pid
