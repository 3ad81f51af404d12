"""What GPT-2 and the Llama family share: the decoder forward with a KV cache, positions from the padding
mask, the causal-LM head and loss, and the last-token classification head.

A decoder backbone is a stack of pre-norm blocks; a subclass says how tokens become the first hidden state
(:meth:`DecoderModel.embed`: GPT-2 adds learned positions, Llama adds nothing) and whether queries and keys
are rotated (:meth:`DecoderModel.rotation`: RoPE for Llama). Everything else is here once.

Padding may be on either side. Positions come from the mask as in Hugging Face's ``generate``
(``cumsum(mask) - 1``), so a left-padded prompt has the positions it has alone, and the cache's positions
continue from them; an explicit ``position_ids`` overrides that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints.names import NameMap
from ..config import GPT2Config, LlamaConfig
from ..errors import InputError
from ..nn.attention import SelfAttention
from ..nn.checkpointing import chunked_loss
from ..nn.dropout import Dropout
from ..nn.kv_cache import CacheLayer, KVCache
from ..nn.linear import Linear
from ..nn.rope import Rotation
from .base import EncoderOutput, HeadOutput, PreTrainedModel
from .common import check_token_ids, classification_loss, key_mask_from

#: Logits a causal LM's loss computes at a time under gradient checkpointing: 2^22 values (16 MiB in fp32), so 85
#: positions of SmolLM2's 49152-token vocabulary a chunk instead of 200 MiB for 4 x 256 tokens (and as much again
#: for their log-softmax and for each gradient); each chunk reads the head's weight once more in the backward.
LOSS_CHUNK = 1 << 22


@dataclass
class DecoderOutput(EncoderOutput):
    """A backbone's output; ``attention_mask`` is the mask the layers saw (longer than the input's when a
    prompt delta prepended soft tokens), so heads can find each sequence's last real token."""

    attention_mask: Tensor | None = None


@dataclass
class CausalLMOutput(HeadOutput):
    """A causal LM's output; ``attention_mask`` is the mask over every cached position ([B, cache.length]
    after this forward), longer than the caller's when a prompt delta prepended soft tokens on the prefill:
    the next decoding step's mask extends this one."""

    attention_mask: Tensor | None = None


def positions_from_mask(attention_mask: Tensor | None, past: int, seq: int, batch: int,
                        device: torch.device) -> Tensor:
    """(B, seq) position ids of the new tokens: ``cumsum(mask) - 1`` over past + new (padding gets 1, as in
    HF's ``generate``), or ``past .. past + seq - 1`` without a mask."""
    if attention_mask is None:
        return torch.arange(past, past + seq, device=device).expand(batch, seq)
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -seq:]


def right_aligned(embeds: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Rows moved right so each ends at the last column (trailing padding becomes leading padding).

    Per-sample soft tokens lay a routed row out as ``[its soft tokens, its input, padding]`` (rows with fewer
    soft tokens end early); a cache extended one token per step needs every row's newest token last, as left
    padding gives. Positions come from the mask, so a row keeps the positions it has alone."""
    trailing = (mask.flip(-1).cumsum(-1) == 0).sum(-1, keepdim=True)  # (B, 1)
    if not bool(trailing.any()):
        return embeds, mask
    width = mask.shape[1]
    src = (torch.arange(width, device=mask.device)[None, :] - trailing) % width
    embeds = embeds.gather(1, src[..., None].expand(*src.shape, embeds.shape[-1]))
    return embeds, mask.gather(1, src)


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy: position t predicts ``labels[t + 1]``; ``-100`` is ignored (padding,
    prompt tokens). Computed in fp32, as Hugging Face does, whatever the logits' dtype."""
    shifted = causal_lm_targets(logits, labels)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100)


def causal_lm_targets(outputs: Tensor, labels: Tensor) -> Tensor:
    """(B, T) labels shifted left by one (the last position predicts nothing), checked against (B, T, ...) outputs."""
    if labels.shape != outputs.shape[:2]:
        raise InputError(f"labels of shape {tuple(labels.shape)} do not match the input's {tuple(outputs.shape[:2])}:"
                         " pass one label per input token (the model shifts them)")
    return F.pad(labels, (0, 1), value=-100)[:, 1:]


class DecoderModel(PreTrainedModel):
    """A decoder-only backbone: ``tokens`` embedding, ``layers`` (each ``layer(x, key_mask, rotary, cache,
    need_weights) -> (x, weights)``), a final ``norm``.

    ``prompt`` is the input hook deltas install (prompt tuning, P-tuning, prefix positions), as on BERT; it
    runs on the first forward of a sequence only (not on decoding steps that extend a cache).
    """

    #: Subclasses name their HF backbone prefix and set ``embeddings`` (with ``.tokens``), ``layers``, ``norm``.
    embeddings: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    checkpoint_stacks = ("layers",)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.prompt: nn.Module | None = None

    def embed(self, inputs_embeds: Tensor, position_ids: Tensor) -> Tensor:
        """The first hidden state from token embeddings and positions."""
        raise NotImplementedError

    def delta_backbone(self) -> PreTrainedModel:
        """The decoder stack runs the layers and the ``prompt`` input hook (the DeltaHost protocol)."""
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        # every subclass's ``embeddings`` holds its token table as ``tokens`` (see the class attributes above)
        return cast(nn.Embedding, self.embeddings.tokens)

    def rotation(self, position_ids: Tensor, dtype: torch.dtype) -> Rotation | None:
        """The query/key rotation of these positions (RoPE), or None for models without one."""
        return None

    def _prompted(self, input_ids: Tensor | None, embeds: Tensor, mask: Tensor | None):
        """Run the input hook: (embeds, mask, position offset or None). Soft tokens it prepends get mask
        ones (so mask-derived positions count them); the offset is prefix tuning's per-row shift, (B, 1)."""
        batch, seq = embeds.shape[:2]
        if mask is None:
            mask = torch.ones(batch, seq, dtype=torch.long, device=embeds.device)
        types = torch.zeros(batch, seq, dtype=torch.long, device=embeds.device)
        prompted = self.prompt(input_ids, embeds, mask, types)  # type: ignore[misc]
        embeds, mask = prompted[0], prompted[1]
        positions = prompted[3] if len(prompted) > 3 else None
        offset = None
        if positions is not None:  # the hook counts from 0 and adds its shift: keep the shift only
            offset = (positions - torch.arange(embeds.shape[1], device=embeds.device))[:, :1]
        return embeds, mask, offset

    def new_cache(self, batch: int, max_length: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences of up to ``max_length`` positions (prompt + new)."""
        # dtype and device from a parameter, not the embedding's .weight: a packed table would dequantize whole
        weight = next(p for p in self.parameters() if p.is_floating_point())
        attn = cast(DecoderLayer, self.layers[0]).attn  # the stack is made of DecoderLayer blocks
        return KVCache(len(self.layers), batch, max_length, attn.n_kv_heads, attn.head_dim,
                       dtype=dtype or weight.dtype, device=device or weight.device)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        inputs_embeds: Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> DecoderOutput:
        """``attention_mask``: (B, past + new), 1 = real token. ``cache`` is extended in place.

        ``position_ids`` (default: from the mask) are the positions the tokens have without deltas: a prefix
        delta's shift is added here (and kept on the cache for later steps), and when a prompt delta prepends
        soft tokens on the first forward, positions are taken from the extended mask instead.

        ``hidden_states`` (when asked for) are HF's: the embeddings, each block's output, the last one after
        the final norm.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            assert input_ids is not None  # exactly one of the two was passed (checked above)
            tokens = self.get_input_embeddings()
            check_token_ids(input_ids, tokens.num_embeddings)
            inputs_embeds = tokens(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        past = cache.length if cache is not None else 0
        if cache is not None and cache.batch != batch:
            raise InputError(f"the cache holds {cache.batch} sequences but the input has {batch}: make it with "
                             "model.new_cache(batch, max_length), or reorder it to this batch")
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past + seq):
            raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, past + seq)}"
                             " (cached + new positions, 1 for real tokens)")
        offset = cache.position_offset if cache is not None and past > 0 else None
        if self.prompt is not None and past == 0:
            inputs_embeds, attention_mask, offset = self._prompted(input_ids, inputs_embeds, attention_mask)
            if inputs_embeds.shape[1] != seq:  # soft tokens prepended: the caller's positions no longer line up
                position_ids = None
                if cache is not None:  # decoding appends after the last column: every row must end there
                    inputs_embeds, attention_mask = right_aligned(inputs_embeds, attention_mask)
                    cache.grow(inputs_embeds.shape[1] - seq)  # the caller sized it for its own tokens
            seq = inputs_embeds.shape[1]
            if cache is not None:
                cache.position_offset = offset
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, seq, batch, inputs_embeds.device)
        if offset is not None:
            position_ids = position_ids + offset
        key_mask = key_mask_from(attention_mask) if attention_mask is not None else None
        x = self.embed(inputs_embeds, position_ids)
        rotary = self.rotation(position_ids, x.dtype)
        hidden_states: list[Tensor] = [x] if output_hidden_states else []
        attentions: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            x, weights = layer(x, key_mask, rotary, cache.layer(i) if cache is not None else None,
                               need_weights=output_attentions)
            if output_hidden_states and i < len(self.layers) - 1:
                hidden_states.append(x)
            if weights is not None:
                attentions.append(weights)
        x = self.norm(x)
        if output_hidden_states:
            hidden_states.append(x)
        return DecoderOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            attention_mask=attention_mask,
        )


class DecoderLayer(nn.Module):
    """One pre-norm block: ``x + drop(attn(norm(x)))``, then ``x + drop(mlp(norm(x)))``."""

    def __init__(self, attn: SelfAttention, attn_norm: nn.Module, mlp: nn.Module, mlp_norm: nn.Module,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor, key_mask: Tensor | None, rotary: Rotation | None, cache: CacheLayer | None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        attended, weights = self.attn(self.attn_norm(x), key_mask, need_weights=need_weights, rotary=rotary,
                                      cache=cache)
        x = x + self.dropout(attended)
        return x + self.dropout(self.mlp(self.mlp_norm(x))), weights


class TokenEmbeddings(nn.Module):
    """The token table (``embeddings.tokens``, where input-side deltas look for it)."""

    def __init__(self, vocab_size: int, dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim, padding_idx=padding_idx)


class DecoderTaskModel(PreTrainedModel):
    """A decoder backbone (``self.backbone``) under a head; subclasses set ``backbone_class``."""

    backbone_class: ClassVar[type[DecoderModel]]
    head_rules: ClassVar[list[tuple[str, str]]] = []

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.backbone = self.backbone_class(config)

    @classmethod
    def backbone_name_map(cls) -> NameMap:
        return cls.backbone_class.backbone_name_map()

    @classmethod
    def name_map(cls) -> NameMap:
        prefix = cls.hf_backbone_prefix
        return NameMap(cls.head_rules) + cls.backbone_name_map().prefixed(prefix, "backbone.")

    def delta_backbone(self) -> PreTrainedModel:
        return self.backbone

    def new_cache(self, batch: int, max_length: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_length`` positions (prompt + new tokens)."""
        return self.backbone.new_cache(batch, max_length, dtype, device)

    def _init_head(self, *modules: nn.Linear) -> None:
        for module in modules:
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class DecoderForCausalLM(DecoderTaskModel):
    """Next-token logits over the vocabulary; the head is the token embeddings when they are tied."""

    head_rules = [("lm_head", "lm_head")]
    #: The vocabulary projection: deltas' "all-linear" leaves it out (see delta.targets.match_targets).
    output_layer_path: ClassVar[str] = "lm_head"
    config: GPT2Config | LlamaConfig

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.get_input_embeddings().weight
        else:
            self._init_head(self.lm_head)

    def tied_parameters(self) -> set[str]:
        return {"lm_head.weight"} if self.config.tie_word_embeddings else set()

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        inputs_embeds: Tensor | None = None,
        last_only: bool = False,
    ) -> CausalLMOutput:
        """``labels``: (B, T) token ids, ``-100`` where no loss is wanted; shifted inside (as HF).
        ``last_only``: logits of the last position alone, (B, 1, V): all a decoding step needs."""
        out = self.backbone(input_ids, attention_mask, position_ids, cache, inputs_embeds,
                            output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        hidden = out.last_hidden_state[:, -1:] if last_only else out.last_hidden_state
        if labels is not None and self.checkpointing and self.training and torch.is_grad_enabled() and not last_only:
            # gradient checkpointing: the loss a chunk of positions at a time, no whole logits (returned as None)
            if labels.shape[1] != hidden.shape[1]:  # soft prompt tokens were prepended: they predict nothing
                labels = F.pad(labels, (hidden.shape[1] - labels.shape[1], 0), value=-100)
            shifted = causal_lm_targets(hidden, labels)
            chunked = chunked_loss(self.lm_head, hidden.reshape(-1, hidden.shape[-1]), shifted.reshape(-1),
                                   max(1, LOSS_CHUNK // self.config.vocab_size))
            return CausalLMOutput(loss=chunked, logits=None, hidden_states=out.hidden_states, attentions=out.attentions,
                                  attention_mask=out.attention_mask)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            if last_only:
                raise InputError("labels need the logits of every position: call without last_only")
            if labels.shape[1] != logits.shape[1]:  # soft prompt tokens were prepended: they predict nothing
                labels = F.pad(labels, (logits.shape[1] - labels.shape[1], 0), value=-100)
            loss = causal_lm_loss(logits, labels)
        return CausalLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
                              attention_mask=out.attention_mask)


def last_token_index(input_ids: Tensor | None, attention_mask: Tensor | None, pad_token_id: int | None,
                     batch: int, seq: int, device: torch.device) -> Tensor:
    """Per row, the position of the last real token: the rightmost 1 of the attention mask when there is one;
    else HF's rule, the rightmost id that is not ``pad_token_id`` (both padding sides work); a single
    unpadded row, its last position.

    The mask comes first because it cannot be fooled: a collator padding with eos (tokenizers without a pad
    token) and a text ending in eos would make the id rule skip the real final token. Where mask and ids
    agree, which is every batch HF's own collators make, both rules pick the same token.
    """
    positions = torch.arange(seq, device=device, dtype=torch.int32)
    if attention_mask is not None:
        return (positions * attention_mask[:, -seq:].to(device=device, dtype=torch.int32)).argmax(-1)
    if pad_token_id is not None and input_ids is not None:
        return (positions * (input_ids != pad_token_id).to(torch.int32)).argmax(-1)
    if batch != 1:
        raise InputError("a batch of several sequences needs an attention_mask (or pad_token_id in the config) "
                         "to find each sequence's last token")
    return torch.full((1,), seq - 1, dtype=torch.long, device=device)


class DecoderForSequenceClassification(DecoderTaskModel):
    """A linear ``score`` (no bias, as HF) on the last real token of each sequence (see
    :func:`last_token_index`)."""

    head_rules = [("score", "score")]
    head_prefixes = ("score.",)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        dropout = config.extra.get("classifier_dropout")
        self.dropout = Dropout(dropout or 0.0)
        self.score = Linear(config.hidden_size, config.num_labels, bias=False)
        self._init_head(self.score)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        inputs_embeds: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> HeadOutput:
        """``token_type_ids`` is accepted and ignored (collators made for BERT pass it)."""
        out = self.backbone(input_ids, attention_mask, position_ids, None, inputs_embeds,
                            output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        hidden = out.last_hidden_state
        batch, seq = hidden.shape[:2]
        if out.attention_mask is not None:  # soft tokens may have been prepended: the mask the layers saw
            attention_mask = out.attention_mask
        if input_ids is not None and input_ids.shape[1] != seq:  # soft tokens prepended: the ids no longer line up
            input_ids = None
        last = last_token_index(input_ids, attention_mask, self.config.pad_token_id, batch, seq, hidden.device)
        pooled = hidden[torch.arange(batch, device=hidden.device), last]
        logits = self.score(self.dropout(pooled))
        loss = (classification_loss(logits, labels, self.config.num_labels, self.config.problem_type)
                if labels is not None else None)
        return HeadOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)
