"""Loading a backbone with an LM head for prompting, and telling a masked LM from a causal one."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ..errors import PromptError

log = logging.getLogger("deltaformer")

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

    model = _load_gguf(name) or load_model(name)
    kind = lm_kind(model)
    tokenizer = AutoTokenizer.from_pretrained(name)
    return (model.to(device) if device is not None else model), tokenizer, kind


def split_head(lm: nn.Module) -> tuple[Callable[[dict[str, Tensor]], Tensor], nn.Module] | None:
    """(body, head) of an LM whose last hidden states and vocabulary projection can be run apart: BERT's
    ``encode`` + ``mlm_head``, a decoder's ``backbone`` + ``lm_head``; None for other models. ``body(inputs)``
    gives the last hidden states (B, T', H), T' > T when a delta prepends soft tokens."""
    if hasattr(lm, "mlm_head") and hasattr(lm, "encode"):
        return (lambda inputs: lm.encode(**inputs).last_hidden_state), lm.mlm_head
    if isinstance(getattr(lm, "lm_head", None), nn.Module) and isinstance(getattr(lm, "backbone", None), nn.Module):
        def body(inputs: dict[str, Tensor]) -> Tensor:
            return lm.backbone(inputs["input_ids"], inputs.get("attention_mask")).last_hidden_state

        return body, lm.lm_head
    return None


def _load_gguf(name: str) -> nn.Module | None:
    """A GGUF checkpoint (a .gguf file, or a directory or asset holding one) as the model class its config
    names, through the GGUF branch's entry point (HF config + HF-named tensors); None for other checkpoints."""
    from ..checkpoints.gguf import find_gguf
    from ..config import ModelConfig
    from ..models.base import PreTrainedModel, resolve_path

    path = resolve_path(name)
    gguf = find_gguf(path) if path.exists() else None
    if gguf is None:
        return None
    data, tensors = _gguf_contents(str(gguf.resolve()), gguf.stat().st_mtime_ns)
    config = ModelConfig.from_dict(data)
    names = list(data.get("architectures") or [])
    classes = [PreTrainedModel.registry[n] for n in names if n in PreTrainedModel.registry]
    classes = classes or [c for c in PreTrainedModel.registry.values() if c.config_class is type(config)
                          and c.hf_architecture.endswith(CAUSAL_SUFFIXES)]
    if not classes:
        raise PromptError(f"{gguf} holds a {config.model_type!r} model with no causal-LM class here")
    model = classes[0](config)
    report = model.load_hf_state_dict(dict(tensors))  # copied into the model's own parameters
    if report.missing:
        log.warning("loading %s: %s", gguf, report)
    return model.eval()


@functools.lru_cache(maxsize=1)
def _gguf_contents(path: str, mtime: int) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The HF config and dequantized HF-named tensors of a GGUF file, kept for the next load: dequantizing
    is most of the cost of loading, and benchmarks and PET runs load one base model many times. Each load
    builds a fresh model from these tensors (copied), so deltas attached to one model never reach another."""
    from ..checkpoints.gguf import GGUFCheckpoint

    checkpoint = GGUFCheckpoint(path)
    return checkpoint.hf_config(), dict(checkpoint.hf_tensors())
