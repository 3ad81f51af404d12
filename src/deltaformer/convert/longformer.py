"""BERT -> Longformer, as allenai's conversion notebook does, in memory; and the directory-to-directory step.

The learned position table is copied over and over to the new length and every layer's global projections
start as copies of its local ones, so up to the old length, with a window covering the input, the
Longformer computes what the BERT did. Positions are RoBERTa-style (``transformers.LongformerModel`` counts
them from ``pad_token_id + 1``): row ``pad + 1 + i`` holds BERT's position ``i mod old_length``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from torch import Tensor

from ..config import BertConfig, LongformerConfig
from ..errors import ConfigError
from ..models.auto import load_model
from ..models.base import PreTrainedModel, resolve_path
from ..models.bert import BertForSequenceClassification, BertModel
from ..models.longformer import LongformerForSequenceClassification, LongformerModel

#: Files of a tokenizer that a converted model keeps (whichever exist).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model")


def bert_to_longformer(bert: PreTrainedModel, max_length: int, window: int,
                       ) -> LongformerModel | LongformerForSequenceClassification:
    """A Longformer reading ``max_length`` tokens with a one-sided ``window`` (Hugging Face's
    ``attention_window`` is ``2 * window``), made from ``bert`` (a BertModel or a task model; unchanged).

    A ``BertForSequenceClassification`` becomes a ``LongformerForSequenceClassification`` (BERT's pooler +
    classifier are exactly Longformer's head); other heads are dropped. Returned in eval mode.
    """
    if type(bert.config) is not BertConfig:
        raise ConfigError(f"the model is a {bert.config.model_type!r} model: convert-long converts BERT checkpoints")
    if max_length < 1 or window < 1:
        raise ConfigError(f"max_length ({max_length}) and window ({window}) must be positive")
    backbone = bert if isinstance(bert, BertModel) else bert.delta_backbone()
    assert isinstance(backbone, BertModel)
    pad = bert.config.pad_token_id or 0
    fields = {f.name: getattr(bert.config, f.name) for f in dataclasses.fields(BertConfig) if f.name != "extra"}
    extra = {k: v for k, v in bert.config.extra.items() if k not in ("architectures", "_name_or_path")}
    config = LongformerConfig(**{**fields, "max_position_embeddings": max_length + pad + 1, "pad_token_id": pad},
                              attention_window=2 * window, extra=extra)
    long: LongformerModel | LongformerForSequenceClassification
    if isinstance(bert, BertForSequenceClassification):
        long = LongformerForSequenceClassification(config)
        target = long.backbone
    else:
        long = target = LongformerModel(config, add_pooler=backbone.pooler is not None)
    weights = {k: v for k, v in backbone.state_dict().items() if k != "embeddings.positions.weight"}
    if isinstance(long, LongformerForSequenceClassification):
        weights = {k: v for k, v in weights.items() if not k.startswith("pooler.")}
    target.load_state_dict(weights, strict=False)
    with torch.no_grad():
        for layer in target.layers:
            for name in ("query", "key", "value"):
                getattr(layer.attn, f"{name}_global").load_state_dict(getattr(layer.attn, name).state_dict())
        _tile_positions(backbone.embeddings.positions.weight, target.embeddings.positions.weight, pad + 1)
        if isinstance(long, LongformerForSequenceClassification):
            assert isinstance(bert, BertForSequenceClassification) and backbone.pooler is not None
            long.classifier.dense.load_state_dict(backbone.pooler.dense.state_dict())
            long.classifier.out_proj.load_state_dict(bert.classifier.state_dict())
    return long.eval()


def convert_bert_to_longformer(model: str | Path, max_length: int, window: int, out_dir: str | Path) -> Path:
    """Load a BERT checkpoint (directory or asset name), convert it (:func:`bert_to_longformer`) and write
    the Longformer to ``out_dir``; tokenizer files are copied, ``model_max_length`` raised to ``max_length``."""
    source = resolve_path(model)
    bert = load_model(source)
    if type(bert.config) is not BertConfig:
        raise ConfigError(f"{source} holds a {bert.config.model_type!r} model: convert-long converts BERT checkpoints")
    out = bert_to_longformer(bert, max_length, window).save_pretrained(out_dir)
    _copy_tokenizer(source, out, max_length)
    return out


def _tile_positions(old: Tensor, new: Tensor, offset: int) -> None:
    """``new[offset + i] = old[i mod len(old)]``; rows before ``offset`` (the padding row) are zero."""
    new.zero_()
    for start in range(0, new.shape[0] - offset, old.shape[0]):
        rows = min(old.shape[0], new.shape[0] - offset - start)
        new[offset + start:offset + start + rows] = old[:rows]


def _copy_tokenizer(source: Path, out: Path, max_length: int) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    settings = out / "tokenizer_config.json"
    if settings.is_file():
        data = json.loads(settings.read_text(encoding="utf-8"))
        data["model_max_length"] = max_length
        settings.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
