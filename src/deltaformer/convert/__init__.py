"""Conversions between architectures, above ``models/``: in-memory functions on modules and state dicts
(``bert_to_longformer``, ``led_from_bert_model``), and the load-convert-save steps the CLI and scripts use."""

from .led import led_from_bert, led_from_bert_model
from .longformer import bert_to_longformer, convert_bert_to_longformer

__all__ = ["bert_to_longformer", "convert_bert_to_longformer", "led_from_bert", "led_from_bert_model"]
