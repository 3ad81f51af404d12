"""Assembled models: BERT, Longformer, decoder LMs, encoder-decoders."""

from .base import EncoderOutput, HeadOutput, PreTrainedModel
from .bert import (
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)
from .gpt2 import GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model
from .llama import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel

__all__ = [
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "EncoderOutput",
    "GPT2ForSequenceClassification",
    "GPT2LMHeadModel",
    "GPT2Model",
    "HeadOutput",
    "LlamaForCausalLM",
    "LlamaForSequenceClassification",
    "LlamaModel",
    "PreTrainedModel",
]
