"""Turning classification examples into model batches.

Texts are tokenized once, up front (:func:`encode_examples`), and batches are padded only to their own longest
sequence (:class:`PadCollator`): short-sentence tasks then cost a fraction of a fixed 64-token pad, and the
data loader does no tokenizer work per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .tabular import DataError, Example, LabelMap


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
