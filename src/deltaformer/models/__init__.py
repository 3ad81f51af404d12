"""Assembled models: BERT, Longformer, decoder LMs, encoder-decoders."""

from .base import EncoderOutput, HeadOutput, PreTrainedModel
from .bert import (
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)

__all__ = [
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "EncoderOutput",
    "HeadOutput",
    "PreTrainedModel",
]
