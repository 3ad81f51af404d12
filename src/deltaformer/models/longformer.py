"""Longformer (Beltagy et al., 2020), loading Hugging Face checkpoints exactly.

A Longformer layer is a :class:`~deltaformer.models.bert.BertLayer` whose self-attention is
:class:`~deltaformer.nn.sliding.LongformerSelfAttention` (sliding window + global tokens, linear memory);
embeddings are BERT's with RoBERTa's position ids (counting from ``pad_token_id + 1``). Unlike Hugging Face,
inputs are not padded to a multiple of the window here: the banded kernel pads per block, internally.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints.names import NameMap
from ..config import LongformerConfig
from ..nn.dropout import Dropout
from ..nn.linear import Linear
from ..nn.sliding import GlobalTokens, LongformerMask, LongformerSelfAttention
from .base import EncoderOutput, HeadOutput, PreTrainedModel
from .bert import BERT_NAMES, BertEmbeddings, BertLayer, Pooler
from .common import check_length, classification_loss, embed_inputs, init_head, key_mask_from


@dataclass
class LongformerOutput(EncoderOutput):
    """Encoder outputs plus ``global_attentions``: per layer (B, H, S, G), what each global token gives each
    position. ``attentions`` are per layer (B, H, S, G + 2w + 1): global keys first, then the window."""

    global_attentions: tuple[Tensor, ...] | None = None


@dataclass
class LongformerHeadOutput(HeadOutput):
    global_attentions: tuple[Tensor, ...] | None = None


class LongformerEmbeddings(BertEmbeddings):
    """BERT's embeddings; the position table has a padding row, as RoBERTa's (its gradient stays zero)."""

    def __init__(self, config: LongformerConfig) -> None:
        super().__init__(config)
        self.positions = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                      padding_idx=config.pad_token_id)


def position_ids_from(input_ids: Tensor, pad_token_id: int) -> Tensor:
    """RoBERTa's positions: real tokens count from ``pad_token_id + 1``, pad tokens keep ``pad_token_id``."""
    real = input_ids.ne(pad_token_id)
    return torch.cumsum(real, dim=1) * real + pad_token_id


class LongformerLayer(BertLayer):
    """A BERT layer whose self-attention is sliding window + global tokens (window and dilation per layer)."""

    def __init__(self, config: LongformerConfig, index: int) -> None:
        super().__init__(config)
        self.attn = LongformerSelfAttention(
            config.hidden_size, config.num_attention_heads, window=config.window(index),
            dilation=config.dilation(index), dropout=config.attention_probs_dropout_prob,
        )


class LongformerModel(PreTrainedModel):
    """The Longformer encoder; ``global_attention_mask`` (B, S) marks tokens with global attention (1)."""

    config_class = LongformerConfig
    hf_architecture = "LongformerModel"
    hf_backbone_prefix = "longformer."
    hf_ignored = ("embeddings.position_ids",)

    def __init__(self, config: LongformerConfig, add_pooler: bool = True) -> None:
        super().__init__(config)
        self.embeddings = LongformerEmbeddings(config)
        self.layers = nn.ModuleList(LongformerLayer(config, i) for i in range(config.num_hidden_layers))
        self.pooler = Pooler(config.hidden_size) if add_pooler else None
        self.prompt: nn.Module | None = None  # input hook of prompt-based deltas, as on BertModel
        self.init_weights()

    @classmethod
    def backbone_name_map(cls) -> NameMap:
        return BERT_NAMES  # the global projections sit under attention.self like the local ones

    def delta_backbone(self) -> PreTrainedModel:
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.tokens

    def default_global_attention_mask(self, input_ids: Tensor) -> Tensor | None:
        """The global tokens when the caller gives none: none (the bare encoder has no reader of its own)."""
        return None

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        global_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> LongformerOutput:
        inputs_embeds, attention_mask, token_type_ids = embed_inputs(
            self.embeddings.tokens, input_ids, inputs_embeds, attention_mask, token_type_ids)
        batch, seq = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        real = input_ids.ne(self.config.pad_token_id or 0) if input_ids is not None else None
        shift: Tensor | int = 0
        if self.prompt is not None:
            prompted = self.prompt(input_ids, inputs_embeds, attention_mask, token_type_ids)
            inputs_embeds, attention_mask, token_type_ids = prompted[:3]
            added = inputs_embeds.shape[1] - seq  # prompt tuning prepends virtual tokens: real, never global
            if added:
                real = None if real is None else F.pad(real, (added, 0), value=True)
                if global_attention_mask is not None:
                    global_attention_mask = F.pad(global_attention_mask, (added, 0))
            if len(prompted) > 3 and prompted[3] is not None:  # prefix tuning: positions start after its slots
                shift = prompted[3][:, :1]
            seq = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = self._position_ids(real, batch, seq, shift, device)
        x = self.embeddings(inputs_embeds, token_type_ids, position_ids)
        out = run_layers(self.layers, x, attention_mask, global_attention_mask, output_hidden_states,
                         output_attentions)
        out.pooler_output = self.pooler(out.last_hidden_state) if self.pooler is not None else None
        return out

    def _position_ids(self, real: Tensor | None, batch: int, seq: int, shift: Tensor | int,
                      device: torch.device) -> Tensor:
        """RoBERTa's positions (real tokens from ``pad + 1``), moved ``shift`` on past prefix slots as
        Hugging Face moves them past cached tokens; ``real`` None: every token is real (inputs_embeds)."""
        pad = self.config.pad_token_id or 0
        most = shift if isinstance(shift, int) else int(shift.max())
        check_length(seq + most, self.config.max_position_embeddings - pad - 1)
        if real is None:
            return torch.arange(pad + 1, seq + pad + 1, device=device).expand(batch, seq) + shift
        return (torch.cumsum(real, dim=1) + shift) * real + pad


def run_layers(
    layers: nn.ModuleList,
    x: Tensor,
    attention_mask: Tensor,
    global_attention_mask: Tensor | None,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
) -> LongformerOutput:
    """Longformer layers over embedded inputs (shared with LED's encoder): global positions are found once."""
    if global_attention_mask is not None:  # as Hugging Face: a padded position is never global
        global_attention_mask = global_attention_mask.to(torch.bool) & attention_mask.to(torch.bool)
    mask = LongformerMask(key_mask_from(attention_mask), GlobalTokens.from_mask(global_attention_mask))
    hidden_states: list[Tensor] = [x] if output_hidden_states else []
    local: list[Tensor] = []
    global_: list[Tensor] = []
    for layer in layers:
        x, weights = layer(x, mask, need_weights=output_attentions)
        if output_hidden_states:
            hidden_states.append(x)
        if weights is not None:
            local.append(weights[0])
            if weights[1] is not None:
                global_.append(weights[1].transpose(2, 3))
    return LongformerOutput(
        last_hidden_state=x,
        hidden_states=tuple(hidden_states) if output_hidden_states else None,
        attentions=tuple(local) if output_attentions else None,
        global_attentions=tuple(global_) if global_ else None,
    )


class LongformerClassificationHead(nn.Module):
    """Hugging Face's head: dropout, dense + tanh on the first (<s>) token, dropout, out_proj."""

    def __init__(self, config: LongformerConfig) -> None:
        super().__init__()
        dropout = config.extra.get("classifier_dropout")
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.dropout = Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.out_proj = Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden_states: Tensor) -> Tensor:
        x = torch.tanh(self.dense(self.dropout(hidden_states[:, 0])))
        return self.out_proj(self.dropout(x))


class LongformerForSequenceClassification(PreTrainedModel):
    """Longformer + classification head; without a ``global_attention_mask`` the first token is global,
    as Hugging Face does."""

    config_class = LongformerConfig
    hf_architecture = "LongformerForSequenceClassification"
    hf_backbone_prefix = "longformer."
    hf_ignored = ("embeddings.position_ids",)
    head_prefixes = ("classifier.",)

    def __init__(self, config: LongformerConfig) -> None:
        super().__init__(config)
        self.backbone = LongformerModel(config, add_pooler=False)
        self.classifier = LongformerClassificationHead(config)
        init_head(self, config, only=(self.classifier,))

    @classmethod
    def backbone_name_map(cls) -> NameMap:
        return BERT_NAMES

    @classmethod
    def name_map(cls) -> NameMap:
        return NameMap([("classifier", "classifier")]) + BERT_NAMES.prefixed("longformer.", "backbone.")

    def delta_backbone(self) -> PreTrainedModel:
        return self.backbone

    def default_global_attention_mask(self, input_ids: Tensor) -> Tensor:
        """The global tokens when the caller gives none: the first (what the classifier reads), as HF does."""
        mask = torch.zeros(input_ids.shape[:2], dtype=torch.long, device=input_ids.device)
        mask[:, 0] = 1
        return mask

    def forward(self, input_ids=None, attention_mask=None, global_attention_mask=None, token_type_ids=None,
                labels=None, **kwargs) -> LongformerHeadOutput:
        if global_attention_mask is None:
            reference = input_ids if input_ids is not None else kwargs["inputs_embeds"][..., 0]
            global_attention_mask = self.default_global_attention_mask(reference)
        out = self.backbone(input_ids, attention_mask, global_attention_mask, token_type_ids, **kwargs)
        logits = self.classifier(out.last_hidden_state)
        loss = (classification_loss(logits, labels, self.config.num_labels, self.config.problem_type)
                if labels is not None else None)
        return LongformerHeadOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                    attentions=out.attentions, global_attentions=out.global_attentions)
