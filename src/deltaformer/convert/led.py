"""An LED warm-started from a BERT (Rothe et al., 2020, "BERT2BERT"), built in memory from loaded modules."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import BertConfig, LEDConfig
from ..errors import ConfigError
from ..models.auto import load_model
from ..models.base import resolve_path
from ..models.bert import BertLayer, BertModel
from ..models.led import LEDDecoderLayer, LEDForConditionalGeneration, LEDModel
from ..models.longformer import LongformerForSequenceClassification, LongformerModel
from ..tokenizer import AutoTokenizer
from .longformer import bert_to_longformer


def led_from_bert(bert: str | Path, max_source_length: int = 4096, window: int = 256,
                  max_target_length: int | None = None) -> LEDForConditionalGeneration:
    """:func:`led_from_bert_model` on a BERT checkpoint (directory or asset name), loaded once, with its
    tokenizer's special tokens."""
    source = resolve_path(bert)
    loaded = load_model(source)
    if type(loaded.config) is not BertConfig:
        raise ConfigError(f"{source} holds a {loaded.config.model_type!r} model: led_from_bert needs a BERT checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(source)
    special = {kind: getattr(tokenizer, f"{kind}_token_id") for kind in ("cls", "sep", "pad")}
    missing = [kind for kind, token in special.items() if token is None]
    if missing:
        raise ConfigError(f"{source}'s tokenizer has no {missing[0]} token: led_from_bert needs [CLS], [SEP] and "
                          "[PAD] (a BERT tokenizer)")
    backbone = loaded.delta_backbone()
    assert isinstance(backbone, BertModel)
    return led_from_bert_model(backbone, special, max_source_length, window, max_target_length)


def led_from_bert_model(bert: BertModel, special: dict[str, int], max_source_length: int = 4096,
                        window: int = 256, max_target_length: int | None = None) -> LEDForConditionalGeneration:
    """An LED warm-started from ``bert``, speaking its vocabulary (``special``: the ids of its tokenizer's
    ``cls``, ``sep`` and ``pad`` tokens).

    The encoder is the BERT converted to a Longformer by :func:`~.longformer.bert_to_longformer`
    (``max_source_length`` positions tiled from BERT's, one-sided ``window``, global projections copied from
    the local ones). The decoder is warm-started from the same BERT layers wherever shapes agree: token
    embeddings (shared with the encoder and, tied, the LM head), positions, embedding LayerNorm, and in every
    layer the self-attention (made causal), its LayerNorm, the feed-forward and its LayerNorm. Each decoder
    layer's cross-attention and its LayerNorm have no BERT counterpart and start fresh (normal(0, init_std)
    weights, identity LayerNorm); ``final_logits_bias`` starts at zero.

    LED's embeddings have no segment table, so BERT's segment-0 vector is folded into both position tables;
    LED's LayerNorms use eps 1e-5 (BERT: 1e-12), a negligible change. Special tokens follow the BERT
    tokenizer: [CLS] is bos and the decoder's start token, [SEP] is eos, [PAD] is pad. The decoder reads up
    to ``max_target_length`` tokens (default: BERT's ``max_position_embeddings``).
    """
    max_target_length = max_target_length or bert.config.max_position_embeddings
    if max_target_length > bert.config.max_position_embeddings:
        raise ConfigError(f"max_target_length {max_target_length} exceeds BERT's {bert.config.max_position_embeddings} "
                          "positions: use at most that many")
    converted = bert_to_longformer(bert, max_source_length, window)
    encoder = converted.backbone if isinstance(converted, LongformerForSequenceClassification) else converted
    model = LEDForConditionalGeneration(_led_config_from_bert(bert.config, special, max_source_length, window,
                                                              max_target_length))
    _warm_start_led(model.backbone, bert, encoder)
    model.config.extra = {**model.config.extra, "architectures": [model.hf_architecture]}
    return model


def _led_config_from_bert(config: BertConfig, ids: dict[str, int], max_source_length: int, window: int,
                          max_target_length: int) -> LEDConfig:
    """LED sizes equal to BERT's, encoder and decoder alike; special token ids from BERT's tokenizer."""
    return LEDConfig(
        vocab_size=config.vocab_size, d_model=config.hidden_size, encoder_layers=config.num_hidden_layers,
        decoder_layers=config.num_hidden_layers, encoder_attention_heads=config.num_attention_heads,
        decoder_attention_heads=config.num_attention_heads, encoder_ffn_dim=config.intermediate_size,
        decoder_ffn_dim=config.intermediate_size, max_encoder_position_embeddings=max_source_length,
        max_decoder_position_embeddings=max_target_length, activation_function=config.hidden_act,
        dropout=config.hidden_dropout_prob, attention_dropout=config.attention_probs_dropout_prob,
        init_std=config.initializer_range, attention_window=2 * window, pad_token_id=ids["pad"],
        bos_token_id=ids["cls"], eos_token_id=ids["sep"], decoder_start_token_id=ids["cls"],
    )


@torch.no_grad()
def _warm_start_led(led: LEDModel, bert: BertModel, encoder: LongformerModel) -> None:
    """Copy BERT / converted-Longformer weights into ``led`` (see :func:`led_from_bert_model` for which)."""
    embeddings = bert.embeddings
    segment = embeddings.segments.weight[0]
    offset = (encoder.config.pad_token_id or 0) + 1  # the Longformer's positions count from pad + 1
    led.shared.weight.copy_(embeddings.tokens.weight)
    led.encoder.positions.weight.copy_(encoder.embeddings.positions.weight[offset:] + segment)
    led.decoder.positions.weight.copy_(embeddings.positions.weight[:led.decoder.positions.num_embeddings] + segment)
    for norm in (led.encoder.norm, led.decoder.norm):
        norm.load_state_dict(embeddings.norm.state_dict())
    led.encoder.layers.load_state_dict(encoder.layers.state_dict())
    for ours, theirs in zip(led.decoder.layers, bert.layers):
        assert isinstance(ours, LEDDecoderLayer) and isinstance(theirs, BertLayer)
        for name in ("query", "key", "value", "out"):
            getattr(ours.self_attn, name).load_state_dict(getattr(theirs.attn, name).state_dict())
        ours.self_norm.load_state_dict(theirs.attn_norm.state_dict())
        ours.mlp.load_state_dict(theirs.mlp.state_dict())
        ours.mlp_norm.load_state_dict(theirs.mlp_norm.state_dict())
