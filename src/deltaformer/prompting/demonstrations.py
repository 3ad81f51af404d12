"""Choosing k demonstrations for in-context learning: random, class-balanced, or nearest neighbours.

``random`` and ``balanced`` draw one set per seed from the pool and show it to every query, in a seeded
order, as in Zhao et al. (2021) and Min et al. (2022): the spread over seeds is then the sensitivity to the
chosen examples, which is what calibration is measured against. ``balanced`` takes ``k // C`` per class and
gives the ``k % C`` remaining shots to classes drawn at random. ``nearest`` picks, per query, the k pool
examples closest by a sentence encoder (Liu et al., 2022, "What makes good in-context examples"), the closest
last, next to the query; it depends on the seed only through ties, which do not occur in practice.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from ..data.tabular import Example
from ..errors import PromptError
from .encoder import SentenceEncoder

STRATEGIES = ("random", "balanced", "nearest")


class DemonstrationSelector:
    """``select(queries) -> [demonstrations of query i]``; ``pool``: labelled examples to draw from."""

    def __init__(self, pool: Sequence[Example], k: int, strategy: str = "random", seed: int = 0,
                 labels: Sequence[str] | None = None, encoder: SentenceEncoder | None = None) -> None:
        if strategy not in STRATEGIES:
            raise PromptError(f"unknown demonstration strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
        if k < 0:
            raise PromptError(f"shots must be 0 or more, got {k}")
        unlabelled = [e.source for e in pool if e.label is None]
        if unlabelled:
            raise PromptError(f"demonstration pool example {unlabelled[0]} has no label: demonstrations show the answer")
        if k > len(pool):
            raise PromptError(f"{k} shots asked but the demonstration pool holds {len(pool)} examples: use fewer shots")
        self.pool, self.k, self.strategy, self.seed = list(pool), k, strategy, seed
        self.labels = list(labels) if labels is not None else sorted({e.label for e in pool if e.label})
        self.encoder = encoder
        self._pool_vectors: torch.Tensor | None = None

    def select(self, queries: Sequence[Example]) -> list[list[Example]]:
        if self.k == 0:
            return [[] for _ in queries]
        if self.strategy == "nearest":
            return self._nearest(queries)
        fixed = self._random() if self.strategy == "random" else self._balanced()
        return [list(fixed) for _ in queries]

    def _random(self) -> list[Example]:
        return random.Random(self.seed).sample(self.pool, self.k)

    def _balanced(self) -> list[Example]:
        rng = random.Random(self.seed)
        by_class = {label: [e for e in self.pool if e.label == label] for label in self.labels}
        share = {label: self.k // len(self.labels) for label in self.labels}
        for label in rng.sample(self.labels, self.k % len(self.labels)):
            share[label] += 1
        chosen: list[Example] = []
        for label in self.labels:
            if share[label] > len(by_class[label]):
                raise PromptError(f"class-balanced demonstrations need {share[label]} examples of {label!r} but the "
                                  f"pool has {len(by_class[label])}: use fewer shots or a larger pool")
            chosen += rng.sample(by_class[label], share[label])
        rng.shuffle(chosen)
        return chosen

    def _nearest(self, queries: Sequence[Example]) -> list[list[Example]]:
        if self.encoder is None:
            self.encoder = SentenceEncoder()
        if self._pool_vectors is None:
            self._pool_vectors = self.encoder.encode([_joined(e) for e in self.pool])
        query_vectors = self.encoder.encode([_joined(q) for q in queries])
        sims = query_vectors @ self._pool_vectors.T
        where: dict[tuple[str, str | None], list[int]] = {}
        for j, e in enumerate(self.pool):
            where.setdefault((e.text, e.text_pair), []).append(j)
        for i, q in enumerate(queries):  # a query that is itself in the pool must not be its own demonstration
            for j in where.get((q.text, q.text_pair), ()):
                sims[i, j] = float("-inf")
        top = sims.topk(self.k, dim=1).indices.flip(1)  # closest last
        return [[self.pool[j] for j in row] for row in top.tolist()]


def _joined(example: Example) -> str:
    return example.text if example.text_pair is None else f"{example.text} {example.text_pair}"
