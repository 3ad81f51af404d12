"""Raw text for causal-LM training: documents -> one token stream -> fixed-length blocks.

As in Hugging Face's ``run_clm``: each document is tokenized without special tokens and followed by eos
(so the model learns where texts end), the stream is cut into blocks of ``block_size`` tokens, and every
token of a block is a label (the model shifts them). Unlike ``run_clm``, the last partial block is kept
(padded at collation, its padding labelled -100), so a small file loses no text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .tabular import DataError


@dataclass(frozen=True)
class LMBlock:
    """A block of token ids and their labels (-100: no loss)."""

    input_ids: list[int]
    labels: list[int]


def read_documents(path: str | Path) -> list[str]:
    """The documents of a UTF-8 text file: paragraphs separated by blank lines, surrounding space stripped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no text file at {path}: pass a UTF-8 .txt file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}): re-save it as UTF-8") from None
    documents, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line.rstrip())
        elif current:
            documents.append("\n".join(current))
            current = []
    if current:
        documents.append("\n".join(current))
    if not documents:
        raise DataError(f"{path} holds no text: causal-LM training needs some")
    return documents


def token_stream(tokenizer, documents: Sequence[str]) -> list[int]:
    """Every document's ids followed by eos (when the tokenizer has one), concatenated."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(list(documents), add_special_tokens=False)["input_ids"]:
        stream += list(ids) + ([eos] if eos is not None else [])
    return stream


def chunk_stream(stream: Sequence[int], block_size: int) -> list[LMBlock]:
    """Consecutive blocks of ``block_size`` tokens; the last may be shorter (a block of one token predicts
    nothing and is dropped)."""
    if block_size < 2:
        raise DataError(f"block size {block_size} is too small: a causal-LM block needs at least 2 tokens")
    blocks = []
    for start in range(0, len(stream), block_size):
        ids = list(stream[start:start + block_size])
        if len(ids) > 1:
            blocks.append(LMBlock(ids, list(ids)))
    return blocks


@dataclass(frozen=True)
class LMCollator:
    """Right-pad ids with ``pad_token_id`` and labels with -100; ``attention_mask`` marks real tokens."""

    pad_token_id: int = 0

    def __call__(self, items: Sequence[LMBlock]) -> dict[str, Tensor]:
        length = max(len(x.input_ids) for x in items)
        ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), -100, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item.input_ids)
            ids[row, :n] = torch.tensor(item.input_ids)
            labels[row, :n] = torch.tensor(item.labels)
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
