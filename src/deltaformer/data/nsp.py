"""Next-sentence pairs from raw documents, and the batches BERT pretrains on (masked LM + NSP).

A document is a list of segments (sentences or lines), already tokenized without special tokens. As in
BERT's ``create_pretraining_data``: segments are gathered until they fill the pair's length; a random
split point makes A; half of the time B is the rest of the same stretch (label 0, "is next"), otherwise B is
taken from a random other document (label 1) and the unused segments are read again for the next pair.
Pairs are ``[CLS] A [SEP] B [SEP]`` with segment ids 0 then 1, cut longest-first to ``max_length``.
A document of fewer than two segments has no pair in it: it is skipped and counted. :func:`iter_pairs` makes
pairs from a stream of documents, holding a bounded window of them (B of a random pair comes from that window).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .masking import MaskingConfig, MaskingVocab, mask_tokens
from .tabular import DataError

IS_NEXT, RANDOM_NEXT = 0, 1


@dataclass(frozen=True)
class SentencePair:
    """One NSP example: ids and segment ids of ``[CLS] A [SEP] B [SEP]``, and its label (0 = B follows A)."""

    input_ids: list[int]
    token_type_ids: list[int]
    next_sentence_label: int


@dataclass
class PairStats:
    """What pair making did: pairs made, documents skipped (fewer than two segments), positive share."""

    pairs: int = 0
    skipped_documents: int = 0
    positives: int = 0

    @property
    def positive_rate(self) -> float:
        return self.positives / max(1, self.pairs)


def make_pairs(
    documents: Sequence[Sequence[Sequence[int]]],
    max_length: int,
    cls_token_id: int,
    sep_token_id: int,
    seed: int = 0,
    stats: PairStats | None = None,
) -> list[SentencePair]:
    """Next-sentence pairs of every document (see the module docstring); ``stats`` receives the counts. B of a
    random pair may come from any document of the corpus."""
    return list(iter_pairs(documents, max_length, cls_token_id, sep_token_id, seed, stats, window=len(documents)))


def iter_pairs(
    documents: Iterable[Sequence[Sequence[int]]],
    max_length: int,
    cls_token_id: int,
    sep_token_id: int,
    seed: int = 0,
    stats: PairStats | None = None,
    window: int = 10_000,
) -> Iterator[SentencePair]:
    """:func:`make_pairs` over a stream of documents, holding at most ``2 * window`` of them: a document's
    pairs are made once ``window`` documents after it have been read, and a random B comes from the
    documents held then (the ``window`` before and after it)."""
    if max_length < 5:
        raise DataError(f"max_length {max_length} leaves no room for two segments and [CLS] [SEP] [SEP]: use 5+")
    stats = stats if stats is not None else PairStats()
    rng = random.Random(seed)
    window = max(1, window)
    held: list[list[list[int]]] = []
    head = total = usable = 0

    def pairs_at(index: int) -> Iterator[SentencePair]:
        def other() -> list[list[int]]:
            while True:
                pick = rng.randrange(len(held))
                if pick != index:
                    return held[pick]
        yield from _document_pairs(held[index], other, rng, max_length - 3, cls_token_id, sep_token_id, stats)

    for document in documents:
        total += 1
        doc = [list(s) for s in document if len(s)]
        if len(doc) < 2:
            stats.skipped_documents += 1
            continue
        usable += 1
        held.append(doc)
        if len(held) - head > window:
            yield from pairs_at(head)
            head += 1
            if head >= window:
                del held[:head]
                head = 0
    if usable < 2:
        raise DataError(f"{usable} of {total} document(s) have two or more segments: next-sentence pairs need at "
                        "least two such documents (separate documents by blank lines)")
    while head < len(held):
        yield from pairs_at(head)
        head += 1


def _document_pairs(doc: list[list[int]], other: Callable[[], list[list[int]]], rng: random.Random, target: int,
                    cls_token_id: int, sep_token_id: int, stats: PairStats) -> Iterator[SentencePair]:
    chunk: list[list[int]] = []
    length, i = 0, 0
    while i < len(doc):
        chunk.append(doc[i])
        length += len(doc[i])
        if (i == len(doc) - 1 or length >= target) and len(chunk) >= 2:
            a_end = rng.randint(1, len(chunk) - 1)
            a = [t for s in chunk[:a_end] for t in s]
            if rng.random() < 0.5:
                random_doc = other()
                start = rng.randint(0, len(random_doc) - 1)
                b: list[int] = []
                for s in random_doc[start:]:
                    b += s
                    if len(b) >= target - len(a):
                        break
                i -= len(chunk) - a_end  # the unused segments of this document make the next pair
                label = RANDOM_NEXT
            else:
                b = [t for s in chunk[a_end:] for t in s]
                label = IS_NEXT
            a, b = truncate_longest_first(a, b, target)
            stats.pairs += 1
            stats.positives += label == IS_NEXT
            yield SentencePair([cls_token_id, *a, sep_token_id, *b, sep_token_id],
                               [0] * (len(a) + 2) + [1] * (len(b) + 1), label)
            chunk, length = [], 0
        elif i == len(doc) - 1:
            chunk, length = [], 0
        i += 1


def pair_record(pair: SentencePair) -> tuple[list[int], list[int]]:
    """A pair as a :class:`~deltaformer.data.corpus.TokenStore` example: ids, and (length of segment 0, label)."""
    return pair.input_ids, [pair.token_type_ids.count(0), pair.next_sentence_label]


def pair_from_record(ids: list[int], extra: list[int]) -> SentencePair:
    """The inverse of :func:`pair_record`."""
    return SentencePair(ids, [0] * extra[0] + [1] * (len(ids) - extra[0]), extra[1])


def truncate_longest_first(a: list[int], b: list[int], total: int) -> tuple[list[int], list[int]]:
    """Drop the last token of the longer segment until both fit in ``total`` (each keeps at least one)."""
    a, b = list(a), list(b)
    while len(a) + len(b) > total:
        longer = a if len(a) >= len(b) else b
        if len(longer) <= 1:
            break
        longer.pop()
    return a, b


@dataclass(frozen=True)
class PretrainingCollator:
    """Pad items (:class:`SentencePair`, or anything with ``input_ids`` and ``token_type_ids``) and mask them.

    Gives ``input_ids`` (masked), ``attention_mask``, ``token_type_ids``, ``labels`` (-100 where not picked) and,
    for sentence pairs with ``nsp``, ``next_sentence_label``: what ``BertForPreTraining`` / ``BertForMaskedLM``
    take. ``generator``: None draws from torch's global generator (seeded and checkpointed by the trainer).
    """

    vocab: MaskingVocab
    pad_token_id: int = 0
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    nsp: bool = True
    generator: torch.Generator | None = None

    def __call__(self, items: list) -> dict[str, torch.Tensor]:
        length = max(len(x.input_ids) for x in items)
        ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        types = torch.zeros((len(items), length), dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item.input_ids)
            ids[row, :n] = torch.tensor(item.input_ids)
            types[row, :n] = torch.tensor(item.token_type_ids)
            mask[row, :n] = 1
        masked, labels = mask_tokens(ids, self.vocab, self.masking, mask, self.generator)
        batch = {"input_ids": masked, "attention_mask": mask, "token_type_ids": types, "labels": labels}
        if self.nsp:
            batch["next_sentence_label"] = torch.tensor([x.next_sentence_label for x in items], dtype=torch.long)
        return batch
