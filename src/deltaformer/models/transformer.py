"""The original Transformer (Vaswani et al., 2017, "Attention Is All You Need"): an encoder-decoder.

Source and target tokens share one embedding table, scaled by sqrt(d_model), plus sinusoidal positions
(:func:`sinusoids`) and dropout. Each encoder layer is self-attention then a ReLU feed-forward; each decoder
layer is causal self-attention, cross-attention over the encoder's output, then the feed-forward; every
sub-layer is ``norm(x + dropout(sublayer(x)))`` (post-LayerNorm). With ``final_norm`` each stack ends with a
LayerNorm, as ``torch.nn.Transformer`` does, and the model then equals ``torch.nn.Transformer`` with the
same weights (``tests/test_transformer.py``). The output projection is the embedding table, transposed.

Masks follow torch's conventions: ``src_key_padding_mask`` / ``tgt_key_padding_mask`` /
``memory_key_padding_mask`` (batch, keys) and ``src_mask`` / ``tgt_mask`` / ``memory_mask`` (queries, keys)
or (batch * heads, queries, keys), bool True = not attended, float = added to the scores. Hugging Face's
``attention_mask`` / ``decoder_attention_mask`` (1 = real token) work too, which is what the trainer and the
collators pass. The decoder is always causal: a ``tgt_mask`` is applied on top (so passing torch's
``generate_square_subsequent_mask`` changes nothing).

Generation (greedy, sampling, beam search) is :mod:`deltaformer.generation`'s, through the same four calls
LED offers: :meth:`TransformerModel.encode`, :meth:`~TransformerModel.memories`,
:meth:`~TransformerModel.decode` and :meth:`TransformerForConditionalGeneration.logits`.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints.names import NameMap
from ..config import TransformerConfig
from ..errors import InputError
from ..nn.attention import CrossAttention, SelfAttention
from ..nn.dropout import Dropout
from ..nn.kv_cache import CacheLayer
from ..nn.linear import Linear, linear
from ..nn.mlp import FeedForward
from ..nn.patterns import Causal, Full, combine_masks
from .base import EncoderOutput, PreTrainedModel
from .common import check_length, check_token_ids, residual_add
from .led import Seq2SeqOutput, shift_tokens_right

#: Our parameter names are the checkpoint's: there is no Hugging Face layout to translate from.
SAME_NAMES = NameMap([("{name}", "{name}")])


def sinusoids(length: int, dim: int) -> Tensor:
    """(length, dim) positions: ``sin(pos / 10000^(2i/dim))`` at even features 2i, ``cos`` at odd ones."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : dim // 2]
    return table


# --- torch's mask conventions -----------------------------------------------------------------------------


def key_padding(mask: Tensor | None, attention_mask: Tensor | None, name: str) -> tuple[Tensor | None, Tensor | None]:
    """A key padding mask in torch's convention, or HF's 0/1 ``attention_mask``, as the patterns take it:
    (bool key mask, True = real; float mask to add, (B, 1, 1, Sk)); each None when there is nothing to mask."""
    if mask is not None and attention_mask is not None:
        raise InputError(f"pass {name} (torch's convention) or the 0/1 attention mask, not both")
    if attention_mask is not None:
        mask = attention_mask == 0
    if mask is None:
        return None, None
    if mask.dim() != 2:
        raise InputError(f"{name} must be (batch, sequence), got shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return (None, None) if not bool(mask.any()) else (~mask, None)
    if not mask.is_floating_point():
        raise InputError(f"{name} must be bool (True = padding) or float (added to the scores), got {mask.dtype}")
    return None, mask[:, None, None, :]


def attention_mask_of(mask: Tensor | None, batch: int, heads: int, name: str) -> Tensor | None:
    """torch's ``attn_mask`` ((Sq, Sk) or (B * heads, Sq, Sk); bool True = not attended, float added) as a
    mask broadcastable to (B, heads, Sq, Sk), bool True = attended or float."""
    if mask is None:
        return None
    if mask.dim() == 3:
        if mask.shape[0] != batch * heads:
            raise InputError(f"{name} of shape {tuple(mask.shape)} needs batch * heads = {batch * heads} rows")
        mask = mask.view(batch, heads, *mask.shape[1:])
    elif mask.dim() != 2:
        raise InputError(f"{name} must be (queries, keys) or (batch * heads, queries, keys), got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.is_floating_point():
        raise InputError(f"{name} must be bool (True = not attended) or float (added to the scores), got {mask.dtype}")
    return mask


# --- layers -------------------------------------------------------------------------------------------------


class EncoderLayer(nn.Module):
    """Self-attention, then the feed-forward; each ``norm(x + dropout(block(x)))``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        dim, eps = config.d_model, config.layer_norm_eps
        self.attn = SelfAttention(dim, config.nhead, dropout=config.attention_dropout, pattern=Full())
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = FeedForward(dim, config.dim_feedforward, config.activation)
        self.mlp_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: Tensor, key_mask: Tensor | None, attn_mask: Tensor | None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        attended, weights = self.attn(x, key_mask, need_weights=need_weights, attn_mask=attn_mask)
        x = self.attn_norm(residual_add(self.dropout(attended), x))
        return self.mlp_norm(residual_add(self.dropout(self.mlp(x)), x)), weights


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention over the memory, the feed-forward; each post-LayerNorm."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        dim, eps = config.d_model, config.layer_norm_eps
        self.self_attn = SelfAttention(dim, config.nhead, dropout=config.attention_dropout, pattern=Causal())
        self.self_norm = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = CrossAttention(dim, config.nhead, dropout=config.attention_dropout)
        self.cross_norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = FeedForward(dim, config.dim_feedforward, config.activation)
        self.mlp_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: Tensor, masks: DecoderMasks, memory: tuple[Tensor, Tensor], cache: CacheLayer | None = None,
                need_weights: bool = False) -> tuple[Tensor, tuple[Tensor | None, Tensor | None]]:
        attended, self_weights = self.self_attn(x, masks.key_mask, need_weights=need_weights, cache=cache,
                                                attn_mask=masks.attn_mask)
        x = self.self_norm(residual_add(self.dropout(attended), x))
        attended, cross_weights = self.cross_attn(x, memory, masks.memory_key_mask, masks.memory_attn_mask,
                                                  need_weights=need_weights)
        x = self.cross_norm(residual_add(self.dropout(attended), x))
        return self.mlp_norm(residual_add(self.dropout(self.mlp(x)), x)), (self_weights, cross_weights)


class DecoderMasks:
    """The decoder's masks in the patterns' convention: self-attention's, then cross-attention's."""

    def __init__(self, key_mask: Tensor | None, attn_mask: Tensor | None, memory_key_mask: Tensor | None,
                 memory_attn_mask: Tensor | None) -> None:
        self.key_mask, self.attn_mask = key_mask, attn_mask
        self.memory_key_mask, self.memory_attn_mask = memory_key_mask, memory_attn_mask


class Stack(nn.Module):
    """Scaled token embeddings + sinusoidal positions, dropout, the layers, and the optional final LayerNorm."""

    def __init__(self, config: TransformerConfig, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.final_norm else None
        self.dropout = Dropout(config.dropout)
        self.scale = math.sqrt(config.d_model) if config.scale_embeddings else 1.0
        self.positions: Tensor
        self.register_buffer("positions", sinusoids(config.max_position_embeddings, config.d_model), persistent=False)

    def embed(self, embeds: Tensor, past: int = 0) -> Tensor:
        seq = embeds.shape[1]
        check_length(past + seq, self.positions.shape[0])
        return self.dropout(embeds * self.scale + self.positions[past:past + seq].to(embeds.dtype))

    def finish(self, x: Tensor) -> Tensor:
        return self.norm(x) if self.norm is not None else x


class TransformerModel(PreTrainedModel):
    """The encoder and decoder stacks over one shared token embedding table."""

    config_class = TransformerConfig
    config: TransformerConfig
    hf_architecture = "TransformerModel"
    hf_backbone_prefix = "backbone."

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.encoder = Stack(config, [EncoderLayer(config) for _ in range(config.num_encoder_layers)])
        self.decoder = Stack(config, [DecoderLayer(config) for _ in range(config.num_decoder_layers)])
        self.init_weights()

    @classmethod
    def backbone_name_map(cls) -> NameMap:
        return SAME_NAMES

    def init_weights(self) -> None:
        """Xavier-uniform linears (as ``torch.nn.Transformer``), zero biases, embeddings normal(0, d_model^-0.5)
        (they are scaled by sqrt(d_model) on the way in), the padding row zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.shared.weight, std=self.config.initializer_range)
        with torch.no_grad():
            self.shared.weight[self.config.pad_token_id].zero_()

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               global_attention_mask: Tensor | None = None, *, src_mask: Tensor | None = None,
               src_key_padding_mask: Tensor | None = None, output_hidden_states: bool = False,
               output_attentions: bool = False) -> EncoderOutput:
        """The encoder's output (``last_hidden_state``, and its hidden states / attentions if asked)."""
        if global_attention_mask is not None:
            raise InputError("the Transformer's encoder has no global attention: drop global_attention_mask")
        check_token_ids(input_ids, self.config.vocab_size)
        key_mask, padding = key_padding(src_key_padding_mask, attention_mask, "src_key_padding_mask")
        attn_mask = combine_masks(padding, attention_mask_of(src_mask, input_ids.shape[0], self.config.nhead, "src_mask"))
        x = self.encoder.embed(self.shared(input_ids))
        hidden_states, attentions = [x], []
        for layer in self.encoder.layers:
            x, weights = layer(x, key_mask, attn_mask, output_attentions)
            hidden_states.append(x)
            attentions.append(weights)
        return EncoderOutput(last_hidden_state=self.encoder.finish(x),
                             hidden_states=tuple(hidden_states) if output_hidden_states else None,
                             attentions=tuple(attentions) if output_attentions else None)

    def memories(self, encoder_states: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every decoder layer's cross-attention keys and values over ``encoder_states``."""
        return [cast(DecoderLayer, layer).cross_attn.memory(encoder_states) for layer in self.decoder.layers]

    def decode(self, decoder_input_ids: Tensor, memories: list[tuple[Tensor, Tensor]],
               attention_mask: Tensor | None = None, decoder_attention_mask: Tensor | None = None,
               caches: list[CacheLayer] | None = None, *, tgt_mask: Tensor | None = None,
               tgt_key_padding_mask: Tensor | None = None, memory_mask: Tensor | None = None,
               memory_key_padding_mask: Tensor | None = None, output_hidden_states: bool = False,
               output_attentions: bool = False) -> Seq2SeqOutput:
        """The decoder over ``memories``; ``attention_mask`` / ``memory_key_padding_mask`` mark the source's
        padding, ``caches`` (one layer of a KV cache each) hold earlier target positions when decoding."""
        check_token_ids(decoder_input_ids, self.config.vocab_size)
        batch, heads = decoder_input_ids.shape[0], self.config.nhead
        key_mask, padding = key_padding(tgt_key_padding_mask, decoder_attention_mask, "tgt_key_padding_mask")
        memory_key_mask, memory_padding = key_padding(memory_key_padding_mask, attention_mask,
                                                      "memory_key_padding_mask")
        masks = DecoderMasks(key_mask, combine_masks(padding, attention_mask_of(tgt_mask, batch, heads, "tgt_mask")),
                             memory_key_mask,
                             combine_masks(memory_padding, attention_mask_of(memory_mask, batch, heads, "memory_mask")))
        past = getattr(caches[0], "length", 0) if caches else 0
        x = self.decoder.embed(self.shared(decoder_input_ids), past)
        hidden_states, self_weights, cross_weights = [x], [], []
        for i, layer in enumerate(self.decoder.layers):
            x, (attn, cross) = layer(x, masks, memories[i], caches[i] if caches else None, output_attentions)
            hidden_states.append(x)
            self_weights.append(attn)
            cross_weights.append(cross)
        return Seq2SeqOutput(
            last_hidden_state=self.decoder.finish(x),
            decoder_hidden_states=tuple(hidden_states) if output_hidden_states else None,
            decoder_attentions=tuple(self_weights) if output_attentions else None,
            cross_attentions=tuple(cross_weights) if output_attentions else None,
        )

    def forward(self, input_ids: Tensor | None = None, decoder_input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, decoder_attention_mask: Tensor | None = None, *,
                src_mask: Tensor | None = None, tgt_mask: Tensor | None = None, memory_mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, encoder_outputs: EncoderOutput | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False) -> Seq2SeqOutput:
        """Encode ``input_ids`` (unless ``encoder_outputs`` are given) and decode ``decoder_input_ids``.

        The source's padding mask also masks the memory in cross-attention unless ``memory_key_padding_mask``
        is given (``torch.nn.Transformer`` takes the two separately; pass both to match it call for call).
        """
        if decoder_input_ids is None:
            raise InputError("pass decoder_input_ids (the target shifted right behind decoder_start_token_id)")
        if encoder_outputs is None:
            if input_ids is None:
                raise InputError("pass input_ids or encoder_outputs")
            encoder_outputs = self.encode(input_ids, attention_mask, src_mask=src_mask,
                                          src_key_padding_mask=src_key_padding_mask,
                                          output_hidden_states=output_hidden_states,
                                          output_attentions=output_attentions)
        memory = encoder_outputs.last_hidden_state
        if memory_key_padding_mask is None and attention_mask is None:
            memory_key_padding_mask = src_key_padding_mask
        out = self.decode(decoder_input_ids, self.memories(memory), attention_mask, decoder_attention_mask,
                          tgt_mask=tgt_mask, tgt_key_padding_mask=tgt_key_padding_mask, memory_mask=memory_mask,
                          memory_key_padding_mask=memory_key_padding_mask,
                          output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        out.encoder_last_hidden_state = memory
        out.encoder_hidden_states = encoder_outputs.hidden_states
        out.encoder_attentions = encoder_outputs.attentions
        return out


class TransformerForConditionalGeneration(PreTrainedModel):
    """The Transformer with its output projection (the shared embeddings, transposed, unless untied) and a
    label-smoothed cross-entropy loss (``config.label_smoothing``; labels -100 are ignored)."""

    config_class = TransformerConfig
    config: TransformerConfig
    hf_architecture = "TransformerForConditionalGeneration"
    hf_backbone_prefix = "backbone."
    head_prefixes = ("lm_head",)

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        self.backbone = TransformerModel(config)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.d_model, config.vocab_size, bias=False)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=config.initializer_range)

    @classmethod
    def backbone_name_map(cls) -> NameMap:
        return SAME_NAMES

    def logits(self, hidden: Tensor) -> Tensor:
        weight = self.lm_head.weight if self.lm_head is not None else self.backbone.shared.weight
        return linear(hidden, weight)

    def forward(self, input_ids: Tensor | None = None, decoder_input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, decoder_attention_mask: Tensor | None = None,
                labels: Tensor | None = None, **kwargs) -> Seq2SeqOutput:
        """Labels (-100 = ignored) give the loss; without decoder inputs they are shifted right to make them
        (teacher forcing). ``kwargs``: :meth:`TransformerModel.forward`'s torch-style masks and outputs."""
        if labels is not None and decoder_input_ids is None:
            decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id,
                                                   self.config.decoder_start_token_id)
        out = self.backbone(input_ids, decoder_input_ids, attention_mask, decoder_attention_mask, **kwargs)
        out.logits = self.logits(out.last_hidden_state)
        if labels is not None:
            out.loss = F.cross_entropy(out.logits.view(-1, out.logits.shape[-1]).float(), labels.reshape(-1),
                                       ignore_index=-100, label_smoothing=self.config.label_smoothing)
        return out
