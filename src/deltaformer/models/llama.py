"""The Llama family (Touvron et al. 2023; Llama 3, SmolLM, TinyLlama share it): RoPE with Hugging Face's
scalings, RMSNorm, a SwiGLU MLP, grouped-query attention, a tied or separate LM head, optional biases.

Attention is the shared :class:`~deltaformer.nn.attention.SelfAttention` with ``n_kv_heads`` key/value heads
and the causal pattern; the rotation is computed once per forward and applied in every layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checkpoints.names import NameMap
from ..config import LlamaConfig
from ..nn.attention import SelfAttention
from ..nn.mlp import GatedFeedForward
from ..nn.norms import RMSNorm
from ..nn.patterns import Causal
from ..nn.rope import RotaryEmbedding, Rotation
from .decoder import (
    DecoderForCausalLM,
    DecoderForSequenceClassification,
    DecoderLayer,
    DecoderModel,
    TokenEmbeddings,
)

LLAMA_NAMES = NameMap([
    ("embed_tokens", "embeddings.tokens"),
    ("layers.{i}.self_attn.q_proj", "layers.{i}.attn.query"),
    ("layers.{i}.self_attn.k_proj", "layers.{i}.attn.key"),
    ("layers.{i}.self_attn.v_proj", "layers.{i}.attn.value"),
    ("layers.{i}.self_attn.o_proj", "layers.{i}.attn.out"),
    ("layers.{i}.mlp.gate_proj", "layers.{i}.mlp.gate"),
    ("layers.{i}.mlp.up_proj", "layers.{i}.mlp.up"),
    ("layers.{i}.mlp.down_proj", "layers.{i}.mlp.down"),
    ("layers.{i}.input_layernorm", "layers.{i}.attn_norm"),
    ("layers.{i}.post_attention_layernorm", "layers.{i}.mlp_norm"),
    ("norm", "norm"),
])


class LlamaModel(DecoderModel):
    """The Llama decoder stack (HF ``LlamaModel``)."""

    config_class = LlamaConfig
    hf_architecture = "LlamaModel"
    hf_backbone_prefix = "model."
    hf_ignored = ("rotary_emb.inv_freq",)

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.embeddings = TokenEmbeddings(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(self._layer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling,  # type: ignore[arg-type]
                                      config.max_position_embeddings)
        self.init_weights()

    @staticmethod
    def _layer(config: LlamaConfig) -> DecoderLayer:
        attn = SelfAttention(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                             bias=config.attention_bias, dropout=config.attention_dropout, pattern=Causal(),
                             head_dim=config.head_dim)
        return DecoderLayer(
            attn, RMSNorm(config.hidden_size, eps=config.rms_norm_eps),
            GatedFeedForward(config.hidden_size, config.intermediate_size, config.hidden_act, bias=config.mlp_bias),
            RMSNorm(config.hidden_size, eps=config.rms_norm_eps),
        )

    @classmethod
    def backbone_name_map(cls) -> NameMap:
        return LLAMA_NAMES

    def embed(self, inputs_embeds: Tensor, position_ids: Tensor) -> Tensor:
        return inputs_embeds

    def rotation(self, position_ids: Tensor, dtype: torch.dtype) -> Rotation:
        return Rotation(*self.rotary(position_ids, dtype))


class LlamaForCausalLM(DecoderForCausalLM):
    """Llama with its language-model head."""

    config_class = LlamaConfig
    hf_architecture = "LlamaForCausalLM"
    hf_backbone_prefix = "model."
    hf_ignored = ("rotary_emb.inv_freq",)
    backbone_class = LlamaModel


class LlamaForSequenceClassification(DecoderForSequenceClassification):
    """Llama with a linear ``score`` on the last real token of each sequence (HF's rule)."""

    config_class = LlamaConfig
    hf_architecture = "LlamaForSequenceClassification"
    hf_backbone_prefix = "model."
    hf_ignored = ("rotary_emb.inv_freq",)
    backbone_class = LlamaModel
