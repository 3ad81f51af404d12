"""Pretraining text: documents as lists of segments (lines or sentences), from files or the text assets.

A plain-text file holds one document per blank-line-separated block, one segment per line (the layout of
BERT's pretraining text), or, with ``per_file``, one document per file; a directory means every ``*.txt`` in
it. The assets read as text: ``brown`` (a document per text, its part-of-speech tags stripped), ``bbc-news``
(a document per article, a segment per paragraph) and ``rt-reviews`` (a document per review, a segment per
line). Documents are yielded one at a time and files are read line by line, so a corpus is never held whole:
:func:`tokenize_stream` tokenizes batches of documents as they come, and a :class:`TokenStore` keeps the
resulting examples on disk, read back through memory maps.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

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


def iter_lines(path: Path) -> Iterator[str]:
    """A UTF-8 file's lines, stripped, read one at a time (a file larger than memory is fine); a line that is
    not UTF-8 is an error naming the file, the line and the byte offset."""
    offset = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path} is not UTF-8 text (line {number}, byte {offset + exc.start}): re-save it "
                                "as UTF-8") from None
            offset += len(raw)
            yield line.strip()


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
    doc: Document = []
    for line in iter_lines(path):
        if line:
            doc.append(line)
        elif doc and not per_file:
            yield doc
            doc = []
    if doc:
        yield doc


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


def tokenize_stream(tokenizer, documents: Iterable[Document], batch: int = 256) -> Iterator[list[list[int]]]:
    """Each document's segments as ids without special tokens, lazily: ``batch`` documents per call to the
    tokenizer, which encodes a batch in parallel on all cores (the ``tokenizers`` library's threads), so at most
    one batch of text and ids is held at a time."""
    chunk: list[Document] = []
    for doc in documents:
        chunk.append(doc)
        if len(chunk) == batch:
            yield from _tokenize_chunk(tokenizer, chunk)
            chunk = []
    if chunk:
        yield from _tokenize_chunk(tokenizer, chunk)


def _tokenize_chunk(tokenizer, chunk: list[Document]) -> Iterator[list[list[int]]]:
    flat = [segment for doc in chunk for segment in doc]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    at = 0
    for doc in chunk:
        yield [list(x) for x in ids[at:at + len(doc)]]
        at += len(doc)


def tokenize_documents(tokenizer, documents: Sequence[Document], batch: int = 256) -> list[list[list[int]]]:
    """:func:`tokenize_stream` as a list."""
    return list(tokenize_stream(tokenizer, documents, batch))


def pack_blocks(documents: Iterable[list[list[int]]], block_size: int, eos_token_id: int | None
                ) -> Iterator[list[int]]:
    """Causal-LM packing: each tokenized document's ids (its segments joined) followed by eos, as one stream cut
    into blocks of ``block_size``; the last, shorter block is kept unless it is a single token (which predicts
    nothing). Lazy: at most one block and one document are held."""
    if block_size < 2:
        raise DataError(f"block size {block_size} is too small: a causal-LM block needs at least 2 tokens")
    buffer: list[int] = []
    for doc in documents:
        for segment in doc:
            buffer += segment
        if eos_token_id is not None:
            buffer.append(eos_token_id)
        while len(buffer) >= block_size:
            yield buffer[:block_size]
            buffer = buffer[block_size:]
    if len(buffer) > 1:
        yield buffer


class TokenStore:
    """Examples of token ids on disk (``ids.bin``, ``offsets.bin``, ``extra.bin``: int32 fields per example),
    written one example at a time and read back through memory maps, so a training set larger than memory
    is random-access without being loaded. Ids are uint16 when the vocabulary fits, else uint32."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        meta = json.loads((self.directory / "store.json").read_text(encoding="utf-8"))
        self.extra_fields = int(meta["extra_fields"])
        self.ids = np.memmap(self.directory / "ids.bin", dtype=np.dtype(meta["dtype"]), mode="r") \
            if meta["tokens"] else np.zeros(0, dtype=meta["dtype"])
        self.offsets = np.memmap(self.directory / "offsets.bin", dtype=np.int64, mode="r")
        self.extra = (np.memmap(self.directory / "extra.bin", dtype=np.int32, mode="r").reshape(-1, self.extra_fields)
                      if self.extra_fields and len(self) else np.zeros((0, self.extra_fields), dtype=np.int32))

    @staticmethod
    def write(directory: Path, examples: Iterable[tuple[Sequence[int], Sequence[int]]], vocab_size: int,
              extra_fields: int = 0) -> TokenStore:
        """Store ``(ids, extra)`` examples (``extra``: ``extra_fields`` ints each) in ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "store.json").unlink(missing_ok=True)  # written last: its presence marks a whole store
        dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
        tokens, count = 0, 0
        with open(directory / "ids.bin", "wb") as ids, open(directory / "offsets.bin", "wb") as offsets, \
                open(directory / "extra.bin", "wb") as extra:
            offsets.write(np.zeros(1, dtype=np.int64).tobytes())
            for example_ids, example_extra in examples:
                ids.write(np.asarray(example_ids, dtype=dtype).tobytes())
                tokens += len(example_ids)
                count += 1
                offsets.write(np.array([tokens], dtype=np.int64).tobytes())
                if extra_fields:
                    extra.write(np.asarray(example_extra, dtype=np.int32).tobytes())
        (directory / "store.json").write_text(json.dumps({"dtype": np.dtype(dtype).name, "tokens": tokens,
                                                          "examples": count, "extra_fields": extra_fields}))
        return TokenStore(directory)

    @staticmethod
    def exists(directory: Path) -> bool:
        return (Path(directory) / "store.json").is_file()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> list[int]:
        return self.ids[int(self.offsets[index]):int(self.offsets[index + 1])].tolist()


class StoreView(Sequence):
    """The examples of a :class:`TokenStore` at ``indices``, each made by ``make(ids, extra)``: a dataset."""

    def __init__(self, store: TokenStore, indices: np.ndarray, make: Callable[[list[int], list[int]], Any]) -> None:
        self.store, self.indices, self.make = store, indices, make

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        index = int(self.indices[i])
        extra = self.store.extra[index].tolist() if self.store.extra_fields else []
        return self.make(self.store[index], extra)
