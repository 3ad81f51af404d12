"""BERT (Devlin et al., 2019) and its task heads, loading Hugging Face checkpoints exactly.

The encoder is post-LayerNorm: ``x = norm(x + attn(x))``, ``x = norm(x + mlp(x))``. Attention goes
through :class:`~deltaformer.nn.attention.SelfAttention`, so SDPA is the fast path and attention weights
are still returned on request (from the dense reference path, equal to the fast one).
"""

from __future__ import annotations

from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints.names import NameMap
from ..config import BertConfig
from ..nn.attention import SelfAttention
from ..nn.dropout import Dropout
from ..nn.linear import Linear, linear
from ..nn.mlp import FeedForward, activation
from .base import EncoderOutput, HeadOutput, PreTrainedModel
from .common import check_length, classification_loss, embed_inputs, init_head, key_mask_from, residual_add

BERT_NAMES = NameMap([
    ("embeddings.word_embeddings", "embeddings.tokens"),
    ("embeddings.position_embeddings", "embeddings.positions"),
    ("embeddings.token_type_embeddings", "embeddings.segments"),
    ("embeddings.LayerNorm", "embeddings.norm"),
    ("encoder.layer.{i}.attention.output.dense", "layers.{i}.attn.out"),
    ("encoder.layer.{i}.attention.output.LayerNorm", "layers.{i}.attn_norm"),
    ("encoder.layer.{i}.attention.self", "layers.{i}.attn"),
    ("encoder.layer.{i}.intermediate.dense", "layers.{i}.mlp.up"),
    ("encoder.layer.{i}.output.dense", "layers.{i}.mlp.down"),
    ("encoder.layer.{i}.output.LayerNorm", "layers.{i}.mlp_norm"),
    ("pooler.dense", "pooler.dense"),
])


class BertEmbeddings(nn.Module):
    """Token + segment + learned absolute position embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.segments = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, inputs_embeds: Tensor, token_type_ids: Tensor, position_ids: Tensor) -> Tensor:
        x = inputs_embeds + self.segments(token_type_ids) + self.positions(position_ids)
        return self.dropout(self.norm(x))


class BertLayer(nn.Module):
    """One post-LayerNorm encoder block."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(
            config.hidden_size, config.num_attention_heads, dropout=config.attention_probs_dropout_prob
        )
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = FeedForward(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, key_mask: Tensor | None, need_weights: bool = False):
        attended, weights = self.attn(x, key_mask, need_weights=need_weights)
        x = self.attn_norm(residual_add(self.dropout(attended), x))
        return self.mlp_norm(residual_add(self.dropout(self.mlp(x)), x)), weights

    def forward_first(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        """The output at position 0 alone, (B, 1, dim): all a pooler reads from the last layer.

        Keys and values still see every position; the query, output projection and MLP run on one
        position instead of S, about 5/6 of the layer's work saved (in backward too).
        """
        first = x[:, :1]
        attended, _ = self.attn(x, key_mask, queries=first)
        x = self.attn_norm(residual_add(self.dropout(attended), first))
        return self.mlp_norm(residual_add(self.dropout(self.mlp(x)), x))


class Pooler(nn.Module):
    """tanh(dense(first token)): BERT's sentence vector, trained by next-sentence prediction."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = Linear(hidden, hidden)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))


class BertModel(PreTrainedModel):
    """The BERT encoder. ``prompt`` is an optional input hook (prompt tuning, P-tuning) that may
    prepend or replace input embeddings: ``prompt(input_ids, embeds, mask, token_types) -> (embeds, mask, token_types)``,
    optionally with a fourth element, position ids or None (prefix tuning shifts positions past its slots, as HF does).
    """

    config_class = BertConfig
    config: BertConfig
    hf_architecture = "BertModel"
    hf_backbone_prefix = "bert."
    hf_ignored = ("embeddings.position_ids",)
    checkpoint_stacks = ("layers",)

    def __init__(self, config: BertConfig, add_pooler: bool = True) -> None:
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = Pooler(config.hidden_size) if add_pooler else None
        self.prompt: nn.Module | None = None
        self.init_weights()

    @classmethod
    def backbone_name_map(cls) -> NameMap:
        return BERT_NAMES

    def delta_backbone(self) -> PreTrainedModel:
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.tokens

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        first_token_only: bool = False,
    ) -> EncoderOutput:
        """``first_token_only``: the caller reads only the pooler (position 0), so the last layer computes
        that position alone and ``last_hidden_state`` is (B, 1, H); ignored when hidden states or
        attentions are asked for. Exact: no other position of the last layer reaches the pooler."""
        inputs_embeds, attention_mask, token_type_ids = embed_inputs(
            self.embeddings.tokens, input_ids, inputs_embeds, attention_mask, token_type_ids)
        batch, seq = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        if self.prompt is not None:
            prompted = self.prompt(input_ids, inputs_embeds, attention_mask, token_type_ids)
            inputs_embeds, attention_mask, token_type_ids = prompted[:3]
            if position_ids is None and len(prompted) > 3:  # prefix tuning starts positions after its slots
                position_ids = prompted[3]
            seq = inputs_embeds.shape[1]
        if position_ids is None:
            check_length(seq, self.config.max_position_embeddings)
            position_ids = torch.arange(seq, device=device).expand(batch, seq)
        x = self.embeddings(inputs_embeds, token_type_ids, position_ids)
        key_mask = key_mask_from(attention_mask)
        hidden_states: list[Tensor] = [x] if output_hidden_states else []
        attentions: list[Tensor] = []
        first_only = first_token_only and not (output_hidden_states or output_attentions)
        for i, layer in enumerate(self.layers):
            if first_only and i == len(self.layers) - 1:
                x = cast(BertLayer, layer).forward_first(x, key_mask)
                continue
            x, weights = layer(x, key_mask, need_weights=output_attentions)
            if output_hidden_states:  # keeping them otherwise would pin memory the allocator could reuse
                hidden_states.append(x)
            if weights is not None:
                attentions.append(weights)
        return EncoderOutput(
            last_hidden_state=x,
            pooler_output=self.pooler(x) if self.pooler is not None else None,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )


# --- task models --------------------------------------------------------------------------------------


class BertTaskModel(PreTrainedModel):
    """A BERT backbone (``self.backbone``) under a task head; HF names the backbone ``bert.``."""

    config_class = BertConfig
    config: BertConfig
    hf_backbone_prefix = "bert."
    hf_ignored = ("embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
    head_rules: ClassVar[list[tuple[str, str]]] = []
    add_pooler: ClassVar[bool] = True

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.backbone = BertModel(config, add_pooler=self.add_pooler)

    @classmethod
    def backbone_name_map(cls) -> NameMap:
        return BERT_NAMES

    @classmethod
    def name_map(cls) -> NameMap:
        return NameMap(cls.head_rules) + BERT_NAMES.prefixed("bert.", "backbone.")

    def delta_backbone(self) -> PreTrainedModel:
        return self.backbone

    def encode(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
               inputs_embeds=None, output_hidden_states=False, output_attentions=False,
               first_token_only=False) -> EncoderOutput:
        return self.backbone(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            first_token_only=first_token_only,
        )


class MLMHead(nn.Module):
    """Transform (dense, activation, LayerNorm) then project onto the (tied) word embeddings."""

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.word_embeddings = [word_embeddings]  # a list: tied, not a second registered copy

    def forward(self, hidden: Tensor) -> Tensor:
        return linear(self.norm(self.act(self.dense(hidden))), self.word_embeddings[0].weight, self.bias)


_MLM_RULES = [
    ("cls.predictions.transform.dense", "mlm_head.dense"),
    ("cls.predictions.transform.LayerNorm", "mlm_head.norm"),
    ("cls.predictions.bias", "mlm_head.bias"),
]


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over masked positions only (labels -100 elsewhere)."""
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)


def mlm_logits_and_loss(head: MLMHead, hidden: Tensor, labels: Tensor | None, training: bool
                        ) -> tuple[Tensor, Tensor | None]:
    """The MLM head's logits and loss. Training with labels, the head runs on the labelled positions only
    (about 15% of them), so the logits are ``(picked, vocab)``: the vocabulary projection is most of a small
    BERT's step, and the loss is the same. Otherwise logits cover every position, as in transformers."""
    if labels is None:
        return head(hidden), None
    if not training:
        logits = head(hidden)
        return logits, mlm_loss(logits, labels)
    picked = labels.reshape(-1) != -100
    logits = head(hidden.reshape(-1, hidden.shape[-1])[picked])
    return logits, F.cross_entropy(logits, labels.reshape(-1)[picked])


class BertForMaskedLM(BertTaskModel):
    hf_architecture = "BertForMaskedLM"
    head_rules = _MLM_RULES
    add_pooler = False

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.mlm_head = MLMHead(config, self.backbone.embeddings.tokens)
        init_head(self, config, only=(self.mlm_head,))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs) -> HeadOutput:
        out = self.encode(input_ids, attention_mask, token_type_ids, **kwargs)
        logits, loss = mlm_logits_and_loss(self.mlm_head, out.last_hidden_state, labels, self.training)
        return HeadOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class BertForPreTraining(BertTaskModel):
    """Masked LM + next-sentence prediction, the two objectives BERT was pretrained with."""

    hf_architecture = "BertForPreTraining"
    head_rules = [*_MLM_RULES, ("cls.seq_relationship", "nsp_head")]

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.mlm_head = MLMHead(config, self.backbone.embeddings.tokens)
        self.nsp_head = Linear(config.hidden_size, 2)
        init_head(self, config, only=(self.mlm_head, self.nsp_head))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                next_sentence_label=None, **kwargs) -> HeadOutput:
        out = self.encode(input_ids, attention_mask, token_type_ids, **kwargs)
        nsp_logits = self.nsp_head(out.pooler_output)
        with_loss = labels is not None and next_sentence_label is not None
        logits, loss = mlm_logits_and_loss(self.mlm_head, out.last_hidden_state, labels if with_loss else None,
                                           self.training)
        if loss is not None:
            loss = loss + F.cross_entropy(nsp_logits, next_sentence_label.view(-1))
        return HeadOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
                          extra_logits={"seq_relationship": nsp_logits})


class BertForSequenceClassification(BertTaskModel):
    """Pooled [CLS] -> dropout -> linear classifier; the config's ``problem_type`` picks the loss."""

    hf_architecture = "BertForSequenceClassification"
    head_rules = [("classifier", "classifier")]
    head_prefixes = ("classifier.",)

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        dropout = config.extra.get("classifier_dropout")
        self.dropout = Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = Linear(config.hidden_size, config.num_labels)
        init_head(self, config, only=(self.classifier,))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs) -> HeadOutput:
        out = self.encode(input_ids, attention_mask, token_type_ids, first_token_only=True, **kwargs)
        logits = self.classifier(self.dropout(out.pooler_output))
        loss = (classification_loss(logits, labels, self.config.num_labels, self.config.problem_type)
                if labels is not None else None)
        return HeadOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class BertForTokenClassification(BertTaskModel):
    """Per-token linear classifier (tagging); labels -100 are ignored."""

    hf_architecture = "BertForTokenClassification"
    head_rules = [("classifier", "classifier")]
    head_prefixes = ("classifier.",)
    add_pooler = False

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        dropout = config.extra.get("classifier_dropout")
        self.dropout = Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = Linear(config.hidden_size, config.num_labels)
        init_head(self, config, only=(self.classifier,))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs) -> HeadOutput:
        out = self.encode(input_ids, attention_mask, token_type_ids, **kwargs)
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = classification_loss(logits, labels, self.config.num_labels) if labels is not None else None
        return HeadOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


