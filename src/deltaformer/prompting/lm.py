"""Loading a backbone with an LM head for prompting, and telling a masked LM from a causal one."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import PromptError

MLM_SUFFIXES = ("ForMaskedLM", "ForPreTraining")
CAUSAL_SUFFIXES = ("LMHeadModel", "ForCausalLM")


def lm_kind(model: nn.Module) -> str:
    """"mlm" or "causal" from the model's architecture name; refuses a model without an LM head."""
    arch = getattr(model, "hf_architecture", type(model).__name__)
    if arch.endswith(MLM_SUFFIXES):
        return "mlm"
    if arch.endswith(CAUSAL_SUFFIXES):
        return "causal"
    raise PromptError(f"{arch} has no language-model head: prompting scores label words, so it needs a masked LM "
                      "(e.g. tiny-mlm) or a causal LM (e.g. smollm2-135m)")


def load_lm(name: str, device: Any = None) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, kind) of a checkpoint directory or asset name."""
    from ..models.auto import load_model
    from ..tokenizer import AutoTokenizer

    model = load_model(name)
    kind = lm_kind(model)
    tokenizer = AutoTokenizer.from_pretrained(name)
    return (model.to(device) if device is not None else model), tokenizer, kind
