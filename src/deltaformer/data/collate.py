"""Turning classification and sequence-to-sequence examples into model batches.

Texts are tokenized once, up front (:func:`encode_examples`, :func:`encode_pairs`), and batches are padded
only to their own longest sequence (:class:`PadCollator`, :class:`Seq2SeqCollator`): short-sentence tasks
then cost a fraction of a fixed 64-token pad, and the data loader does no tokenizer work per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .tabular import DataError, Example, LabelMap
from .tasks import TextPair


@dataclass(frozen=True)
class Encoded:
    """One tokenized example; ``label`` is -100 when unknown (prediction)."""

    input_ids: list[int]
    token_type_ids: list[int]
    label: int = -100


def encode_examples(
    tokenizer,
    examples: Sequence[Example],
    max_length: int,
    labels: LabelMap | None = None,
    skip_bad_rows: bool = False,
    skipped: list[str] | None = None,
) -> list[Encoded]:
    """Tokenize (truncating to ``max_length``) and map labels; unknown labels raise unless skipped.

    Skipped examples are described in ``skipped`` (when given) so callers can report a count.
    """
    kept: list[Example] = []
    ids: list[int] = []
    for example in examples:
        if labels is not None and example.label is not None:
            try:
                ids.append(labels.encode(example))
            except DataError as exc:
                if not skip_bad_rows:
                    raise
                if skipped is not None:
                    skipped.append(str(exc).split("; fix the row")[0])
                continue
        else:
            ids.append(-100)
        kept.append(example)
    if not kept:
        return []
    texts = [e.text for e in kept]
    pairs = [e.text_pair or "" for e in kept] if any(e.text_pair for e in kept) else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=False)
    types = enc.get("token_type_ids") or [[0] * len(x) for x in enc["input_ids"]]
    return [Encoded(list(i), list(t), label) for i, t, label in zip(enc["input_ids"], types, ids)]


@dataclass(frozen=True)
class PadCollator:
    """Pad a list of :class:`Encoded` to the batch's longest sequence (right padding, like BERT)."""

    pad_token_id: int = 0

    def __call__(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        length = max(len(x.input_ids) for x in items)
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        token_types = torch.zeros((len(items), length), dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item.input_ids)
            input_ids[row, :n] = torch.tensor(item.input_ids)
            token_types[row, :n] = torch.tensor(item.token_type_ids)
            mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_types}
        labels = [x.label for x in items]
        if any(label != -100 for label in labels):
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch


@dataclass(frozen=True)
class Seq2SeqEncoded:
    """One tokenized source / target pair; ``labels`` end with eos and hold no start token."""

    input_ids: list[int]
    labels: list[int]


def encode_pairs(
    tokenizer,
    pairs: Sequence[TextPair],
    max_source_length: int,
    max_target_length: int,
    eos_token_id: int | None = None,
) -> list[Seq2SeqEncoded]:
    """Sources as the encoder reads them (the tokenizer's special tokens, truncated to ``max_source_length``);
    targets as the decoder must write them: plain tokens cut to leave room for eos, then eos.

    Labels carry no start token because the model shifts them right behind its own
    ``decoder_start_token_id`` (BART / LED teacher forcing). ``eos_token_id`` defaults to the tokenizer's
    eos, else its sep token ([SEP] ends a BERT vocabulary's sequences).
    """
    eos = eos_token_id if eos_token_id is not None else tokenizer.eos_token_id
    eos = eos if eos is not None else tokenizer.sep_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos or sep token: pass eos_token_id (the model config's)")
    if max_target_length < 2:
        raise DataError(f"max_target_length {max_target_length} leaves no room for a token and eos: use 2 or more")
    if not pairs:
        return []
    sources = tokenizer([p.source for p in pairs], truncation=True, max_length=max_source_length)["input_ids"]
    targets = tokenizer([p.target for p in pairs], add_special_tokens=False, truncation=False)["input_ids"]
    return [Seq2SeqEncoded(list(s), list(t[:max_target_length - 1]) + [eos]) for s, t in zip(sources, targets)]


@dataclass(frozen=True)
class Seq2SeqCollator:
    """Pad :class:`Seq2SeqEncoded` items: ``input_ids`` / ``attention_mask`` with ``pad_token_id`` / 0, ``labels``
    with -100 (ignored by the loss). ``global_first`` adds a ``global_attention_mask`` marking the first token
    (Longformer / LED encoders: [CLS] then sees, and is seen by, the whole input)."""

    pad_token_id: int = 0
    global_first: bool = False

    def __call__(self, items: list[Seq2SeqEncoded]) -> dict[str, torch.Tensor]:
        source = max(len(x.input_ids) for x in items)
        target = max(len(x.labels) for x in items)
        input_ids = torch.full((len(items), source), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), source), dtype=torch.long)
        labels = torch.full((len(items), target), -100, dtype=torch.long)
        for row, item in enumerate(items):
            input_ids[row, :len(item.input_ids)] = torch.tensor(item.input_ids)
            mask[row, :len(item.input_ids)] = 1
            labels[row, :len(item.labels)] = torch.tensor(item.labels)
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        if self.global_first:
            batch["global_attention_mask"] = torch.zeros_like(mask)
            batch["global_attention_mask"][:, 0] = 1
        return batch
