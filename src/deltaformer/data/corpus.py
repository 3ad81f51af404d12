"""Pretraining text: documents as lists of segments (lines or sentences), from files or the text assets.

A plain-text file holds one document per blank-line-separated block, one segment per line (the layout of
BERT's pretraining text), or, with ``per_file``, one document per file; a directory means every ``*.txt`` in
it. The assets read as text: ``brown`` (a document per text, its part-of-speech tags stripped), ``bbc-news``
(a document per article, a segment per paragraph) and ``rt-reviews`` (a document per review, a segment per
line). Documents are yielded one at a time, so a corpus is never held whole by this module.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from pathlib import Path

from .tabular import DataError

TEXT_ASSETS = ("brown", "bbc-news", "rt-reviews")
Document = list[str]


def iter_documents(sources: Sequence[str | Path], per_file: bool = False) -> Iterator[Document]:
    """Every document of every source, in order; a source is a text file, a directory of them, or an asset."""
    for source in sources:
        if str(source) in TEXT_ASSETS and not Path(source).exists():
            yield from _asset_documents(str(source))
        else:
            yield from _path_documents(Path(source), per_file)


def load_documents(sources: Sequence[str | Path], per_file: bool = False) -> list[Document]:
    """:func:`iter_documents` as a list; an empty corpus is an error naming the sources."""
    if not sources:
        raise DataError("no text given: pass text files, folders of .txt files, or brown, bbc-news, rt-reviews")
    docs = list(iter_documents(sources, per_file))
    if not docs:
        raise DataError(f"{', '.join(map(str, sources))} hold(s) no text: pretraining needs a non-empty corpus")
    return docs


def read_text(path: Path) -> str:
    """A UTF-8 file's text; another encoding is an error naming the file and the byte."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}): re-save it as UTF-8") from None


def _path_documents(path: Path, per_file: bool) -> Iterator[Document]:
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise DataError(f"{path} holds no .txt files: pass text files or a folder of them")
        for file in files:
            yield from _path_documents(file, per_file)
        return
    if not path.is_file():
        raise DataError(f"no text file or asset {path}: pass a UTF-8 .txt file, a folder, or one of "
                        f"{', '.join(TEXT_ASSETS)}")
    lines = [line.strip() for line in read_text(path).splitlines()]
    if per_file:
        doc = [line for line in lines if line]
        if doc:
            yield doc
        return
    doc = []
    for line in lines + [""]:
        if line:
            doc.append(line)
        elif doc:
            yield doc
            doc = []


def _asset_documents(name: str) -> Iterator[Document]:
    from .assets import fetch

    folder = fetch(name)
    if name == "brown":
        for path in sorted(folder.glob("c[a-r][0-9][0-9]")):
            doc = [" ".join(word.rsplit("/", 1)[0] for word in line.split()) for line in read_text(path).splitlines()]
            doc = [line for line in doc if line]
            if doc:
                yield doc
    elif name == "bbc-news":
        for path in sorted(folder.glob("*/*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one article of the corpus is cp1252
                text = raw.decode("cp1252", errors="replace")
            doc = [line.strip() for line in text.splitlines() if line.strip()]
            if doc:
                yield doc
    else:
        with open(folder / "polarity-en-pang&lee1.csv", encoding="utf-8-sig", newline="") as fh:
            for row in csv.reader(fh):
                doc = [line.strip() for line in row[-1].splitlines() if line.strip()]
                if doc:
                    yield doc


def tokenize_documents(tokenizer, documents: Sequence[Document], batch: int = 256) -> list[list[list[int]]]:
    """Each document's segments as ids without special tokens; ``batch`` documents per call to the
    tokenizer, which encodes a batch on all cores (the ``tokenizers`` library's threads)."""
    out: list[list[list[int]]] = []
    for start in range(0, len(documents), batch):
        chunk = documents[start:start + batch]
        flat = [segment for doc in chunk for segment in doc]
        ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        at = 0
        for doc in chunk:
            out.append([list(x) for x in ids[at:at + len(doc)]])
            at += len(doc)
    return out
