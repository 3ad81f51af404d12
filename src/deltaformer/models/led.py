"""LED (Beltagy et al., 2020): a Longformer encoder and a full-attention decoder, loading HF checkpoints exactly.

The encoder's layers are :class:`~deltaformer.models.longformer.LongformerLayer` (post-LayerNorm, sliding
window + global tokens, linear memory) over token + learned position embeddings and a LayerNorm; the decoder
is BART's: causal self-attention, cross-attention over the encoder's output, feed-forward, each post-LayerNorm.
Generation (greedy, sampling, beam search) lives in :mod:`deltaformer.generation`, which drives the encoder
once and the decoder step by step through :meth:`LEDModel.encode`, :meth:`LEDModel.memories`,
:meth:`LEDModel.decode` and :meth:`LEDForConditionalGeneration.logits`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints.names import NameMap
from ..config import LEDConfig
from ..errors import InputError
from ..nn.attention import CrossAttention, KVCache, SelfAttention
from ..nn.dropout import Dropout
from ..nn.linear import linear
from ..nn.mlp import FeedForward
from ..nn.patterns import Causal
from .base import Output, PreTrainedModel
from .common import check_length, check_token_ids, key_mask_from, residual_add
from .longformer import LongformerLayer, LongformerOutput, run_layers

LED_NAMES = NameMap([
    ("shared", "shared"),
    ("encoder.embed_positions", "encoder.positions"),
    ("encoder.layernorm_embedding", "encoder.norm"),
    ("encoder.layers.{i}.self_attn.output", "encoder.layers.{i}.attn.out"),  # before its parent: first match wins
    ("encoder.layers.{i}.self_attn.longformer_self_attn", "encoder.layers.{i}.attn"),
    ("encoder.layers.{i}.self_attn_layer_norm", "encoder.layers.{i}.attn_norm"),
    ("encoder.layers.{i}.fc1", "encoder.layers.{i}.mlp.up"),
    ("encoder.layers.{i}.fc2", "encoder.layers.{i}.mlp.down"),
    ("encoder.layers.{i}.final_layer_norm", "encoder.layers.{i}.mlp_norm"),
    ("decoder.embed_positions", "decoder.positions"),
    ("decoder.layernorm_embedding", "decoder.norm"),
    ("decoder.layers.{i}.{attn}.q_proj", "decoder.layers.{i}.{attn}.query"),
    ("decoder.layers.{i}.{attn}.k_proj", "decoder.layers.{i}.{attn}.key"),
    ("decoder.layers.{i}.{attn}.v_proj", "decoder.layers.{i}.{attn}.value"),
    ("decoder.layers.{i}.{attn}.out_proj", "decoder.layers.{i}.{attn}.out"),
    ("decoder.layers.{i}.self_attn_layer_norm", "decoder.layers.{i}.self_norm"),
    ("decoder.layers.{i}.encoder_attn_layer_norm", "decoder.layers.{i}.cross_norm"),
    ("decoder.layers.{i}.fc1", "decoder.layers.{i}.mlp.up"),
    ("decoder.layers.{i}.fc2", "decoder.layers.{i}.mlp.down"),
    ("decoder.layers.{i}.final_layer_norm", "decoder.layers.{i}.mlp_norm"),
])


@dataclass
class Seq2SeqOutput(Output):
    """Decoder outputs (``last_hidden_state``, or ``logits`` under the LM head) and the encoder's."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    last_hidden_state: Tensor | None = None
    decoder_hidden_states: tuple[Tensor, ...] | None = None
    decoder_attentions: tuple[Tensor, ...] | None = None
    cross_attentions: tuple[Tensor, ...] | None = None
    encoder_last_hidden_state: Tensor | None = None
    encoder_hidden_states: tuple[Tensor, ...] | None = None
    encoder_attentions: tuple[Tensor, ...] | None = None
    encoder_global_attentions: tuple[Tensor, ...] | None = None


class LEDDecoderLayer(nn.Module):
    """Causal self-attention, cross-attention, feed-forward; each ``norm(x + dropout(block(x)))``."""

    def __init__(self, config: LEDConfig) -> None:
        super().__init__()
        dim, heads = config.d_model, config.decoder_attention_heads
        self.self_attn = SelfAttention(dim, heads, dropout=config.attention_dropout, pattern=Causal())
        self.self_norm = nn.LayerNorm(dim)
        self.encoder_attn = CrossAttention(dim, heads, dropout=config.attention_dropout)
        self.cross_norm = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, config.decoder_ffn_dim, config.activation_function)
        self.mlp_norm = nn.LayerNorm(dim)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: Tensor, key_mask: Tensor | None, memory: tuple[Tensor, Tensor], memory_mask: Tensor | None,
                cache: KVCache | None = None, need_weights: bool = False):
        attended, self_weights = self.self_attn(x, key_mask, need_weights=need_weights, cache=cache)
        x = self.self_norm(residual_add(self.dropout(attended), x))
        attended, cross_weights = self.encoder_attn(x, memory, memory_mask, need_weights=need_weights)
        x = self.cross_norm(residual_add(self.dropout(attended), x))
        return self.mlp_norm(residual_add(self.dropout(self.mlp(x)), x)), (self_weights, cross_weights)


class LEDEncoder(nn.Module):
    """Token + learned position embeddings, LayerNorm, dropout, then Longformer layers."""

    def __init__(self, config: LEDConfig) -> None:
        super().__init__()
        layer_config = config.encoder_config()
        self.positions = nn.Embedding(config.max_encoder_position_embeddings, config.d_model)
        self.norm = nn.LayerNorm(config.d_model)
        self.dropout = Dropout(config.dropout)
        self.layers = nn.ModuleList(LongformerLayer(layer_config, i) for i in range(config.encoder_layers))

    def forward(self, embeds: Tensor, attention_mask: Tensor | None, global_attention_mask: Tensor | None,
                output_hidden_states: bool = False, output_attentions: bool = False) -> LongformerOutput:
        batch, seq = embeds.shape[:2]
        check_length(seq, self.positions.num_embeddings)
        x = self.dropout(self.norm(embeds + self.positions(torch.arange(seq, device=embeds.device))))
        if attention_mask is None:
            attention_mask = torch.ones(batch, seq, dtype=torch.long, device=embeds.device)
        return run_layers(self.layers, x, attention_mask, global_attention_mask, output_hidden_states,
                          output_attentions)


class LEDDecoder(nn.Module):
    """Token + learned position embeddings (counted past the cache), LayerNorm, dropout, decoder layers."""

    def __init__(self, config: LEDConfig) -> None:
        super().__init__()
        self.positions = nn.Embedding(config.max_decoder_position_embeddings, config.d_model)
        self.norm = nn.LayerNorm(config.d_model)
        self.dropout = Dropout(config.dropout)
        self.layers = nn.ModuleList(LEDDecoderLayer(config) for _ in range(config.decoder_layers))

    def forward(self, embeds: Tensor, key_mask: Tensor | None, memories: list[tuple[Tensor, Tensor]],
                memory_mask: Tensor | None, caches: list[KVCache] | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False) -> Seq2SeqOutput:
        past = caches[0].length if caches else 0
        seq = embeds.shape[1]
        check_length(past + seq, self.positions.num_embeddings)
        x = self.dropout(self.norm(embeds + self.positions(torch.arange(past, past + seq, device=embeds.device))))
        hidden_states, self_weights, cross_weights = [x], [], []
        for i, layer in enumerate(self.layers):
            x, (attn, cross) = layer(x, key_mask, memories[i], memory_mask, caches[i] if caches else None,
                                     output_attentions)
            hidden_states.append(x)
            self_weights.append(attn)
            cross_weights.append(cross)
        return Seq2SeqOutput(
            last_hidden_state=x,
            decoder_hidden_states=tuple(hidden_states) if output_hidden_states else None,
            decoder_attentions=tuple(self_weights) if output_attentions else None,
            cross_attentions=tuple(cross_weights) if output_attentions else None,
        )


def shift_tokens_right(ids: Tensor, pad_token_id: int, start_token_id: int) -> Tensor:
    """Decoder inputs for teacher forcing: the start token, then ``ids`` minus its last (-100 -> pad)."""
    shifted = torch.cat([ids.new_full((ids.shape[0], 1), start_token_id), ids[:, :-1]], dim=1)
    return shifted.masked_fill(shifted == -100, pad_token_id)


class LEDModel(PreTrainedModel):
    """LED's encoder and decoder sharing one token embedding table."""

    config_class = LEDConfig
    config: LEDConfig
    hf_architecture = "LEDModel"
    hf_backbone_prefix = "led."
    hf_ignored = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")

    def __init__(self, config: LEDConfig) -> None:
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.encoder = LEDEncoder(config)
        self.decoder = LEDDecoder(config)
        self.init_weights()

    @classmethod
    def backbone_name_map(cls) -> NameMap:
        return LED_NAMES

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               global_attention_mask: Tensor | None = None, output_hidden_states: bool = False,
               output_attentions: bool = False) -> LongformerOutput:
        check_token_ids(input_ids, self.config.vocab_size)
        return self.encoder(self.shared(input_ids), attention_mask, global_attention_mask, output_hidden_states,
                            output_attentions)

    def memories(self, encoder_states: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every decoder layer's cross-attention keys and values over ``encoder_states``."""
        return [cast(LEDDecoderLayer, layer).encoder_attn.memory(encoder_states) for layer in self.decoder.layers]

    def decode(self, decoder_input_ids: Tensor, memories: list[tuple[Tensor, Tensor]],
               attention_mask: Tensor | None = None, decoder_attention_mask: Tensor | None = None,
               caches: list[KVCache] | None = None, output_hidden_states: bool = False,
               output_attentions: bool = False) -> Seq2SeqOutput:
        check_token_ids(decoder_input_ids, self.config.vocab_size)
        key_mask = None if decoder_attention_mask is None else key_mask_from(decoder_attention_mask)
        memory_mask = None if attention_mask is None else key_mask_from(attention_mask)
        return self.decoder(self.shared(decoder_input_ids), key_mask, memories, memory_mask, caches,
                            output_hidden_states, output_attentions)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                decoder_input_ids: Tensor | None = None, decoder_attention_mask: Tensor | None = None,
                global_attention_mask: Tensor | None = None, encoder_outputs: LongformerOutput | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False) -> Seq2SeqOutput:
        if decoder_input_ids is None:
            if input_ids is None:
                raise InputError("pass decoder_input_ids (or input_ids to shift right, as BART does)")
            decoder_input_ids = shift_tokens_right(input_ids, self.config.pad_id,
                                                   self.config.decoder_start_token_id)
        if encoder_outputs is None:
            if input_ids is None:
                raise InputError("pass input_ids or encoder_outputs")
            encoder_outputs = self.encode(input_ids, attention_mask, global_attention_mask, output_hidden_states,
                                          output_attentions)
        out = self.decode(decoder_input_ids, self.memories(encoder_outputs.last_hidden_state), attention_mask,
                          decoder_attention_mask, output_hidden_states=output_hidden_states,
                          output_attentions=output_attentions)
        out.encoder_last_hidden_state = encoder_outputs.last_hidden_state
        out.encoder_hidden_states = encoder_outputs.hidden_states
        out.encoder_attentions = encoder_outputs.attentions
        out.encoder_global_attentions = encoder_outputs.global_attentions
        return out


class LEDForConditionalGeneration(PreTrainedModel):
    """LED with its language-model head (the shared embeddings, transposed, plus ``final_logits_bias``)."""

    config_class = LEDConfig
    config: LEDConfig
    hf_architecture = "LEDForConditionalGeneration"
    hf_backbone_prefix = "led."
    hf_ignored = (*LEDModel.hf_ignored, "lm_head.weight")
    head_prefixes = ("final_logits_bias",)

    def __init__(self, config: LEDConfig) -> None:
        super().__init__(config)
        self.backbone = LEDModel(config)
        self.final_logits_bias: Tensor
        self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))

    @classmethod
    def backbone_name_map(cls) -> NameMap:
        return LED_NAMES

    @classmethod
    def name_map(cls) -> NameMap:
        return NameMap([("final_logits_bias", "final_logits_bias")]) + LED_NAMES.prefixed("led.", "backbone.")

    def logits(self, hidden: Tensor) -> Tensor:
        return linear(hidden, self.backbone.shared.weight) + self.final_logits_bias

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                decoder_input_ids: Tensor | None = None, labels: Tensor | None = None, **kwargs) -> Seq2SeqOutput:
        """Labels (-100 = ignored) give the loss; without decoder inputs they are shifted right to make them."""
        if labels is not None and decoder_input_ids is None:
            decoder_input_ids = shift_tokens_right(labels, self.config.pad_id, self.config.decoder_start_token_id)
        out = self.backbone(input_ids, attention_mask, decoder_input_ids, **kwargs)
        out.logits = self.logits(out.last_hidden_state)
        if labels is not None:
            out.loss = F.cross_entropy(out.logits.view(-1, out.logits.shape[-1]), labels.view(-1), ignore_index=-100)
        return out
