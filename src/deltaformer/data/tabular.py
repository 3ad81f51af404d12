"""User data for classification: CSV, TSV or JSON-lines files with a text (or a text pair) and a label.

Every example remembers the file and line it came from, so a bad row (missing text, unknown label, bytes
that are not UTF-8, broken JSON) is reported as ``file:line: what is wrong``; with ``skip_bad_rows`` such
rows are dropped and counted instead. Labels are kept as strings here and mapped to ids by :class:`LabelMap`,
which the run saves so evaluation and prediction use the training mapping.

Labels are compared as written, with one exception: a decimal spelling of a number (``1.0``, ``2.50``, what a
float column in a spreadsheet gives) is read as its shortest form (``1``, ``2.5``), so "1" and "1.0" are one
class. Other spellings that look alike (``true`` and ``1``, ``Pos`` and ``pos``, ``01`` and ``1``) are not
guessed at: the training labels are refused, listing them, because merging or splitting them silently would
train a different task than the user meant.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DeltaformerError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}


class DataError(DeltaformerError, ValueError):
    """A data file is missing, has the wrong columns, or has a bad row (named by file and line)."""


@dataclass(frozen=True)
class Example:
    """One classification example; ``source`` is ``file:line`` (or ``task/split#i``) for error messages."""

    text: str
    text_pair: str | None = None
    label: str | None = None
    source: str = ""


@dataclass
class Table:
    """Examples read from one file and the rows that were skipped (with their reasons)."""

    path: Path
    examples: list[Example]
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Fields:
    """Which columns (CSV/TSV) or keys (JSONL) hold the text, the optional second text, and the label."""

    text: str = "text"
    text_pair: str | None = None
    label: str = "label"


class LabelMap:
    """Label names <-> ids. Built from the training labels: numbers sort numerically, names alphabetically."""

    def __init__(self, labels: Iterable[str]) -> None:
        self.labels = list(dict.fromkeys(str(x) for x in labels))
        if not self.labels:
            raise DataError("no labels found: the training data must have at least one labelled example")
        self.label2id = {name: i for i, name in enumerate(self.labels)}

    @classmethod
    def from_examples(cls, examples: Iterable[Example]) -> LabelMap:
        """The labels of ``examples``; refuses labels that look like spellings of one value."""
        first_seen: dict[str, str] = {}
        for example in examples:
            if example.label is not None:
                first_seen.setdefault(example.label, example.source)
        _check_spellings(first_seen)
        return cls(sorted(first_seen, key=_label_sort_key))

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    def __len__(self) -> int:
        return len(self.labels)

    def encode(self, example: Example) -> int:
        try:
            return self.label2id[example.label]  # type: ignore[index]  # a None label raises KeyError, handled below
        except KeyError:
            known = ", ".join(self.labels)
            raise DataError(
                f"{example.source or 'example'}: unknown label {example.label!r} (the model was trained on: "
                f"{known}); fix the row or pass --skip-bad-rows"
            ) from None

    def to_json(self) -> dict[str, Any]:
        return {"label2id": self.label2id, "id2label": {str(i): n for i, n in self.id2label.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabelMap:
        if "id2label" in data:
            id2label = data["id2label"]
            return cls(id2label[str(i)] for i in range(len(id2label)))
        label2id = data["label2id"]
        return cls(sorted(label2id, key=label2id.__getitem__))


_DECIMAL = re.compile(r"(-?\d+)\.(\d*?)0+")  # a decimal with trailing zeros: whole part, significant fraction


def canonical_label(name: str) -> str:
    """``1.0`` -> ``1``, ``2.50`` -> ``2.5``: one number's decimal spellings are one label. Nothing else changes
    (``01``, ``+1``, ``1e0`` are left as written: they may be codes, and :meth:`LabelMap.from_examples` flags them)."""
    match = _DECIMAL.fullmatch(name)
    if match is None:
        return name
    whole, fraction = match.groups()
    return f"{whole}.{fraction}" if fraction else whole


def _spelling_key(name: str) -> str:
    """What two spellings of one value share: case folded, booleans as 0/1, numbers by value."""
    folded = name.casefold()
    folded = {"true": "1", "false": "0"}.get(folded, folded)
    try:
        number = float(folded)
    except ValueError:
        return folded
    return repr(number + 0.0) if math.isfinite(number) else folded  # + 0.0: -0 and 0 alike


def _check_spellings(first_seen: dict[str, str]) -> None:
    """Refuse labels (name -> where it first appears) that look like spellings of one value."""
    groups: dict[str, list[str]] = {}
    for name in first_seen:
        groups.setdefault(_spelling_key(name), []).append(name)
    clashes = [sorted(names, key=_label_sort_key) for names in groups.values() if len(names) > 1]
    if clashes:
        listed = "; ".join(" and ".join(f"{n!r} ({first_seen[n] or 'example'})" for n in names) for names in clashes)
        raise DataError(f"labels {listed} look like spellings of one value: write each label one way (a decimal "
                        "like 1.0 is already read as 1), so classes are not split or merged by guesswork")


def _label_sort_key(name: str) -> tuple[int, float, str]:
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def read_table(
    path: str | Path, fields: Fields = Fields(), need_label: bool = True, skip_bad_rows: bool = False
) -> Table:
    """Read ``path`` (format from its extension) into examples; raises :class:`DataError` on a bad row
    unless ``skip_bad_rows``, in which case bad rows are listed in ``Table.skipped``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist: check the path")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown data format {path.suffix!r}: use .csv, .tsv or .jsonl")
    rows = _jsonl_rows(path) if kind == "jsonl" else _delimited_rows(path, "\t" if kind == "tsv" else ",", fields, need_label)
    table = Table(path=path, examples=[])
    for line, row, problem in rows:
        source = f"{path}:{line}"
        if problem is None:
            example, problem = _to_example(row, fields, need_label, source)
        if problem is not None:
            if not skip_bad_rows:
                raise DataError(f"{source}: {problem}; fix the row or pass --skip-bad-rows to skip bad rows")
            table.skipped.append(f"{source}: {problem}")
            continue
        table.examples.append(example)
    if not table.examples:
        raise DataError(f"{path} has no usable rows" + (f" ({len(table.skipped)} skipped)" if table.skipped else ""))
    return table


Row = tuple[int, dict[str, Any], str | None]


def _delimited_rows(path: Path, delimiter: str, fields: Fields, need_label: bool) -> Iterator[Row]:
    """(first line of record, row, problem) for a CSV/TSV file with a header row."""
    # surrogateescape lets a row with invalid UTF-8 be read and reported on its own line instead of
    # failing the whole file.
    _allow_long_fields()
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        header = reader.fieldnames or []
        wanted = [f for f in (fields.text, fields.text_pair, fields.label if need_label else None) if f]
        missing = [f for f in wanted if f not in header]
        if not header:
            raise DataError(f"{path} is empty: expected a header row naming the columns")
        if missing:
            raise DataError(
                f"{path}: no column {missing[0]!r} in the header (columns: {', '.join(header)}); "
                "choose columns with --text-field / --pair-field / --label-field"
            )
        last = reader.line_num
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield last + 1, {}, f"malformed {'TSV' if delimiter == chr(9) else 'CSV'} ({exc})"
                last = reader.line_num
                continue
            start, last = last + 1, reader.line_num
            if None in row:
                yield start, row, f"{len(header) + len(row[None])} fields, header has {len(header)}"
            elif any(isinstance(v, str) and _has_bad_bytes(v) for v in row.values()):
                yield start, row, "text is not valid UTF-8 (save the file as UTF-8)"
            else:
                yield start, row, None


def _allow_long_fields() -> None:
    """Lift the csv module's 128 KiB field limit: a long document is a valid field (JSONL reads it too). The
    limit is process-wide, which only ever lets other readers accept more."""
    limit = min(sys.maxsize, 2**31 - 1)  # the C long behind the limit is 32 bits on some platforms
    if csv.field_size_limit() < limit:
        csv.field_size_limit(limit)


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                yield number, {}, "not valid UTF-8 (save the file as UTF-8)"
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, {}, f"not valid JSON ({exc.msg} at column {exc.colno})"
                continue
            if not isinstance(row, dict):
                yield number, {}, f"expected a JSON object per line, got {type(row).__name__}"
                continue
            yield number, row, None


def _to_example(row: dict[str, Any], fields: Fields, need_label: bool, source: str) -> tuple[Any, str | None]:
    text = _text(row.get(fields.text))
    if not text:
        return None, f"missing or empty text field {fields.text!r}"
    pair = None
    if fields.text_pair:
        pair = _text(row.get(fields.text_pair))
        if not pair:
            return None, f"missing or empty text field {fields.text_pair!r}"
    label = row.get(fields.label)
    label = None if label is None else _text(label)
    label = canonical_label(label) if label else label
    if need_label and not label:
        return None, f"missing label field {fields.label!r}"
    return Example(text=text, text_pair=pair, label=label or None, source=source), None


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, dict | list):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _has_bad_bytes(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)
