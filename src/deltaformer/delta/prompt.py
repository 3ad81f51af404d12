"""Prompt tuning (Lester et al., 2021): k trainable soft tokens prepended to the input embeddings.

Through the backbone's ``prompt`` hook: the attention mask is extended with ones and token types with
zeros, positions run over prompt + input, as with peft. Stacked as ``tokens`` (n_deltas, k_max, hidden).
Initialised from random vectors, random vocabulary embeddings, or the embeddings of a text (peft's TEXT
init: tokenized with special tokens, repeated or truncated to k) or of label words.
Files use peft's format (``prompt_embeddings``). Cannot merge: the soft tokens lengthen the sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import DeltaError
from .config import DeltaConfig
from .files import base_model_name, task_type
from .hooks import InputStore, Prompted, chain_store, drop_store_if_empty, find_store, prepend, store_holding
from .host import backbone_of
from .method import Method, check_keys, register
from .ops import check_shape
from .routing import DeltaRouter

INITS = ("random", "vocab", "text", "words")


@dataclass
class PromptConfig(DeltaConfig):
    """``init``: "random" (normal, ``init_std``), "vocab" (embeddings of random vocabulary tokens), "text"
    (``init_text`` tokenized as peft does) or "words" (``init_text``: label words, no special tokens).
    ``tokenizer``: path or asset name of the tokenizer for the text inits."""

    method: ClassVar[str] = "prompt"
    finetune_lr: ClassVar[float] = 3e-3
    num_virtual_tokens: int = field(default=20, metadata={
        "help": "soft tokens prepended", "cli": "num_virtual_tokens", "finetune": 16,
        "aliases": ("prefix_length", "length")})
    init: str = field(default="vocab", metadata={"help": "random, vocab, text or words"})
    init_text: str | tuple[str, ...] | None = field(default=None, metadata={"help": "text (or label words) to init from"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer (path or asset) of the text inits"})
    init_std: float = field(default=1.0, metadata={"help": "std of the random init"})
    modules_to_save: tuple[str, ...] | None = field(default=None, metadata={
        "help": "head modules trained and saved with the delta (None: the model's task head)"})

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise DeltaError(f"num_virtual_tokens={self.num_virtual_tokens} must be at least 1")
        if self.init not in INITS:
            raise DeltaError(f"prompt init {self.init!r} is unknown: use one of {', '.join(INITS)}")
        if self.init in ("text", "words") and (not self.init_text or not self.tokenizer):
            raise DeltaError(f"prompt init {self.init!r} needs init_text and tokenizer (a path or asset name)")


class SoftTokens(InputStore):
    """Soft tokens of every prompt-tuning delta: ``tokens`` (n, k_max, hidden), each delta its own k."""

    method = "prompt"
    stacked = ("tokens",)
    slot_lists = ("lengths",)
    tokens: Tensor  # (n_deltas, k_max, hidden), registered by stack_add
    length_vec: Tensor

    def __init__(self, router: DeltaRouter) -> None:
        super().__init__(router)
        self.lengths: list[int] = []
        self.register_buffer("length_vec", torch.zeros(0, dtype=torch.long), persistent=False)

    def add(self, name: str, tokens: Tensor) -> None:
        self.stack_add(name, {"tokens": tokens.detach()})
        self.lengths.append(tokens.shape[0])
        self.refresh()

    def refresh(self) -> None:
        self.length_vec = torch.tensor(self.lengths, device=self.tokens.device, dtype=torch.long)

    def prompt_input(self, input_ids: Tensor | None, embeds: Tensor, mask: Tensor, types: Tensor,
              positions: Tensor | None) -> Prompted:
        sel = self.select(embeds.shape[0], embeds.device)
        if sel is None:
            return embeds, mask, types, positions
        if sel.index is None:
            tokens = torch.cat([self.tokens[s, : self.lengths[s]] for s in sel.each])
            return (*prepend(embeds, mask, types, tokens[None].expand(embeds.shape[0], -1, -1)), positions)
        k = max(self.lengths[s] for s in sel.used)
        lengths = self.length_vec[sel.index]
        if sel.keep is not None:
            lengths = lengths * (sel.keep > 0)
        return (*prepend(embeds, mask, types, self.tokens[sel.index, :k], lengths), positions)

    def slot_numel(self, slot: int) -> int:
        return self.lengths[slot] * self.tokens.shape[-1]


def initial_tokens(model: nn.Module, config: PromptConfig, k: int) -> Tensor:
    """(k, hidden) starting soft tokens for ``config.init``."""
    table = backbone_of(model).get_input_embeddings().weight
    if config.init == "random":
        return torch.randn(k, table.shape[1], dtype=table.dtype, device=table.device) * config.init_std
    if config.init == "vocab":
        picked = torch.randint(0, table.shape[0], (k,), device=table.device)
        return table[picked].detach().clone()
    from ..tokenizer import AutoTokenizer

    assert config.tokenizer is not None and config.init_text is not None  # checked by PromptConfig
    tok = AutoTokenizer.from_pretrained(config.tokenizer)
    if config.init == "text":
        text = config.init_text if isinstance(config.init_text, str) else " ".join(config.init_text)
        ids: list[int] = tok(text)["input_ids"]
    else:
        words = [config.init_text] if isinstance(config.init_text, str) else list(config.init_text)
        ids = [i for w in words for i in tok.encode(w, add_special_tokens=False)]
    if not ids:
        raise DeltaError(f"init_text {config.init_text!r} gives no tokens: give some text")
    ids = (ids * math.ceil(k / len(ids)))[:k]
    if max(ids) >= table.shape[0]:
        raise DeltaError("the tokenizer's ids exceed the model's vocabulary: use the model's own tokenizer")
    return table[torch.tensor(ids, device=table.device)].detach().clone()


class PromptTuning(Method[PromptConfig]):
    name = "prompt"
    config_class = PromptConfig
    peft_type = "PROMPT_TUNING"
    prompt_learning = True
    merge_reason = "its soft tokens lengthen the input sequence; no weight equals them"

    def attach(self, model: nn.Module, config: PromptConfig, name: str, router: DeltaRouter) -> None:
        store = chain_store(model, "prompt", SoftTokens, lambda: SoftTokens(router))
        store.add(name, initial_tokens(model, config, config.num_virtual_tokens))

    def detach(self, model: nn.Module, name: str) -> None:
        store = find_store(model, "prompt", SoftTokens)
        if store is not None and name in store.slots:
            store.stack_remove(name)
            drop_store_if_empty(model, "prompt")

    def export(self, model: nn.Module, name: str, config: PromptConfig) -> tuple[dict[str, Any], dict[str, Tensor]]:
        store = store_holding(model, "prompt", name, SoftTokens)
        s = store.slot(name)
        bb_config = backbone_of(model).config
        peft_init = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB"}.get(config.init, "RANDOM")
        data = {
            "peft_type": self.peft_type, "task_type": task_type(model, prompt_learning=True),
            "base_model_name_or_path": base_model_name(model), "inference_mode": True,
            "num_virtual_tokens": store.lengths[s], "token_dim": store.tokens.shape[-1],
            "num_transformer_submodules": 1, "num_attention_heads": bb_config.num_attention_heads,
            "num_layers": bb_config.num_hidden_layers, "prompt_tuning_init": peft_init,
            "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "modules_to_save": None,
        }
        return data, {"prompt_embeddings": store.tokens[s, : store.lengths[s]].detach()}

    def config_from_file(self, data: dict[str, Any], model: nn.Module) -> PromptConfig:
        if data.get("num_transformer_submodules", 1) not in (1, None):
            raise DeltaError("this prompt-tuning file is for an encoder-decoder (num_transformer_submodules=2): "
                             "load it into an encoder-decoder model")
        return PromptConfig(num_virtual_tokens=int(data["num_virtual_tokens"]), init="random",
                            modules_to_save=tuple(data["modules_to_save"]) if data.get("modules_to_save") else None)

    def load_tensors(self, model: nn.Module, name: str, tensors: dict[str, Tensor]) -> None:
        check_keys({"prompt_embeddings": None}, tensors)
        store = store_holding(model, "prompt", name, SoftTokens)
        s = store.slot(name)
        check_shape("prompt_embeddings", tensors["prompt_embeddings"], (store.lengths[s], store.tokens.shape[-1]))
        with torch.no_grad():
            store.tokens[s, : store.lengths[s]].copy_(tensors["prompt_embeddings"])

    def counts(self, model: nn.Module, name: str) -> dict[str, int]:
        store = store_holding(model, "prompt", name, SoftTokens)
        return {"prompt": store.slot_numel(store.slot(name))}


register(PromptTuning())
