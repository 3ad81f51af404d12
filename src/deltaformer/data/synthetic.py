"""Synthetic sequence-to-sequence tasks: copy, reverse or sort a random sequence of symbols.

The classic first check that an encoder-decoder learns at all: each is solved exactly by attention alone
(copy and reverse attend by position, sort by content), so a small Transformer trained on a few thousand
sequences must write every held-out sequence exactly. Ids: 0 pads, 1 starts the decoder, 2 ends a
sequence, symbols are 3 .. 3 + ``symbols`` - 1. Sources end with the end token too. Train and test
sequences are drawn from one seeded generator and never overlap.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .collate import Seq2SeqEncoded
from .tabular import DataError

PAD, START, END = 0, 1, 2
FIRST_SYMBOL = 3

TASKS: dict[str, Callable[[list[int]], list[int]]] = {
    "copy": lambda xs: list(xs),
    "reverse": lambda xs: xs[::-1],
    "sort": sorted,
}


def vocab_size(symbols: int) -> int:
    """Ids a model needs for ``symbols`` symbols (the three specials first)."""
    return FIRST_SYMBOL + symbols


def synthetic_task(task: str, train_size: int = 2000, test_size: int = 200, symbols: int = 10,
                   min_length: int = 3, max_length: int = 8, seed: int = 0
                   ) -> tuple[list[Seq2SeqEncoded], list[Seq2SeqEncoded]]:
    """(train, test) examples of ``task``: sources of ``min_length`` to ``max_length`` random symbols, targets
    the task's function of them, each followed by the end token; no test source occurs in train."""
    if task not in TASKS:
        raise DataError(f"unknown synthetic task {task!r}: use one of {', '.join(TASKS)}")
    if not 1 <= min_length <= max_length or symbols < 1:
        raise DataError(f"need 1 <= min_length <= max_length and symbols >= 1, got {min_length}, {max_length}, "
                        f"{symbols}")
    possible = sum(symbols ** n for n in range(min_length, max_length + 1))
    if train_size + test_size > possible:
        raise DataError(f"only {possible} distinct sequences exist for {train_size + test_size} examples: allow "
                        "longer sequences or more symbols")
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    examples: list[Seq2SeqEncoded] = []
    while len(examples) < train_size + test_size:
        source = tuple(rng.randrange(FIRST_SYMBOL, FIRST_SYMBOL + symbols)
                       for _ in range(rng.randint(min_length, max_length)))
        if source in seen:
            continue
        seen.add(source)
        examples.append(Seq2SeqEncoded([*source, END], [*TASKS[task](list(source)), END]))
    return examples[:train_size], examples[train_size:]
