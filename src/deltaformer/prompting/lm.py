"""Loading a backbone with an LM head for prompting, and telling a masked LM from a causal one."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

from torch import Tensor, nn

from ..errors import PromptError
from ..models.base import PreTrainedModel

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


def load_lm(name: str, device: Any = None) -> tuple[PreTrainedModel, Any, str]:
    """(model, tokenizer, kind) of a checkpoint directory or asset name."""
    from ..models.auto import load_model
    from ..tokenizer import AutoTokenizer

    model = load_model(name)
    kind = lm_kind(model)
    tokenizer = AutoTokenizer.from_pretrained(name)
    return (model.to(device) if device is not None else model), tokenizer, kind


#: The body of an LM (:func:`split_head`): model inputs (an absent attention mask may be None) -> last hidden states.
LMBody = Callable[[Mapping[str, Tensor | None]], Tensor]


def split_head(lm: nn.Module) -> tuple[LMBody, nn.Module] | None:
    """(body, head) of an LM whose last hidden states and vocabulary projection can be run apart: BERT's
    ``encode`` + ``mlm_head``, a decoder's ``backbone`` + ``lm_head``; None for other models. ``body(inputs)``
    gives the last hidden states (B, T', H), T' > T when a delta prepends soft tokens."""
    if hasattr(lm, "mlm_head") and hasattr(lm, "encode"):
        return (lambda inputs: cast(Callable[..., Any], lm.encode)(**inputs).last_hidden_state), cast(nn.Module, lm.mlm_head)
    if isinstance(getattr(lm, "lm_head", None), nn.Module) and isinstance(getattr(lm, "backbone", None), nn.Module):
        def body(inputs: Mapping[str, Tensor | None]) -> Tensor:
            return cast(nn.Module, lm.backbone)(inputs["input_ids"], inputs.get("attention_mask")).last_hidden_state

        return body, cast(nn.Module, lm.lm_head)
    return None
