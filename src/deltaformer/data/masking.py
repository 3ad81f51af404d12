"""Masked-LM inputs (Devlin et al., 2019): pick 15% of the real tokens, then 80% [MASK], 10% random, 10% kept.

Special tokens ([CLS], [SEP], ...) and padding are never picked: they carry no word to predict, and a model
that learns to restore [SEP] learns nothing useful. With ``whole_word`` a word is picked or left as a unit
(a WordPiece token starting with ``##`` continues the word before it), so the model cannot restore
``##ing`` from ``play`` beside it; the 80/10/10 replacement is then drawn per token, as in BERT's release.

Draws come from ``generator`` when given, else torch's global generator: the trainer seeds that one and
stores it in every checkpoint, so a resumed run masks the same tokens it would have masked.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import check_fields
from .tabular import DataError


@dataclass(frozen=True)
class MaskingConfig:
    """Rates of BERT's masking; ``mask_ratio + random_ratio`` of the picked tokens are replaced."""

    probability: float = field(default=0.15, metadata={"min": 0, "max": 1, "help": "share of real tokens picked"})
    mask_ratio: float = field(default=0.8, metadata={"min": 0, "max": 1, "help": "picked tokens set to [MASK]"})
    random_ratio: float = field(default=0.1, metadata={"min": 0, "max": 1,
                                                       "help": "picked tokens set to a random token"})
    whole_word: bool = field(default=False, metadata={"help": "pick whole words (WordPiece ## pieces)"})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.mask_ratio + self.random_ratio > 1:
            raise DataError(f"mask_ratio {self.mask_ratio} + random_ratio {self.random_ratio} exceed 1: the rest "
                            "of the picked tokens is kept, so the two must sum to at most 1")


@dataclass(frozen=True)
class MaskingVocab:
    """What masking must know of a vocabulary: [MASK]'s id, its size, the ids never picked, and (for whole
    words) the ids of continuation pieces."""

    mask_token_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...] = ()

    @classmethod
    def from_tokenizer(cls, tokenizer, name: str = "the tokenizer") -> MaskingVocab:
        """Read them off a tokenizer; a vocabulary without a mask token cannot be used for masked LM."""
        mask = tokenizer.mask_token_id
        if mask is None:
            raise DataError(f"{name} has no mask token ([MASK]): masked-LM pretraining needs one; train a "
                            "WordPiece tokenizer (deltaformer tokenizer train --kind wordpiece) or add [MASK]")
        vocab = tokenizer.get_vocab()
        continuation = tuple(sorted(i for token, i in vocab.items() if token.startswith("##")))
        return cls(int(mask), len(tokenizer), tuple(sorted(set(tokenizer.all_special_ids))), continuation)


def mask_tokens(
    input_ids: Tensor,
    vocab: MaskingVocab,
    config: MaskingConfig = MaskingConfig(),
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(masked input ids, labels): labels hold the original id where a token was picked, -100 elsewhere.

    ``attention_mask`` (1 = real token) keeps padding out even when the pad id is not a special token.
    """
    ids = input_ids
    eligible = ~torch.isin(ids, torch.tensor(vocab.special_ids, dtype=ids.dtype, device=ids.device))
    if attention_mask is not None:
        eligible &= attention_mask.to(torch.bool)
    draw = torch.rand(ids.shape, generator=generator, device="cpu").to(ids.device)
    if config.whole_word:
        picked = _pick_words(ids, eligible, draw < config.probability, vocab.continuation_ids)
    else:
        picked = eligible & (draw < config.probability)
    labels = torch.where(picked, ids, torch.full_like(ids, -100))
    how = torch.rand(ids.shape, generator=generator, device="cpu").to(ids.device)
    to_mask = picked & (how < config.mask_ratio)
    to_random = picked & (how >= config.mask_ratio) & (how < config.mask_ratio + config.random_ratio)
    random_ids = torch.randint(vocab.vocab_size, ids.shape, generator=generator, device="cpu").to(ids.device)
    masked = torch.where(to_mask, torch.full_like(ids, vocab.mask_token_id), ids)
    masked = torch.where(to_random, random_ids.to(ids.dtype), masked)
    return masked, labels


def _pick_words(ids: Tensor, eligible: Tensor, start_picked: Tensor, continuation_ids: Iterable[int]) -> Tensor:
    """Extend each word-start's draw over the word's continuation pieces (a piece right after a special token
    or padding starts a word of its own)."""
    cont = torch.isin(ids, torch.tensor(list(continuation_ids), dtype=ids.dtype, device=ids.device))
    before = torch.nn.functional.pad(eligible, (1, 0), value=False)[:, :-1]
    starts = eligible & (~cont | ~before)
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    start_of = torch.where(starts, positions, torch.full_like(positions, -1)).cummax(dim=1).values
    word_picked = torch.gather(starts & start_picked, 1, start_of.clamp(min=0))
    return eligible & (start_of >= 0) & word_picked
