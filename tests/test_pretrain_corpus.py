"""Corpora are streamed: files read line by line, documents tokenized in batches, pairs and packed blocks made
from a bounded window and written to an on-disk token store; and their bad input."""

from __future__ import annotations

import random
import tracemalloc

import numpy as np
import pytest

from deltaformer.data.corpus import TokenStore, iter_documents, pack_blocks, tokenize_stream
from deltaformer.data.nsp import PairStats, iter_pairs, make_pairs, pair_from_record, pair_record
from deltaformer.data.tabular import DataError

WORDS = "the a cat dog sat ran on under mat log big small red blue quickly slowly jumped played".split()


def _write_corpus(path, docs, seed=0):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(docs):
            for _ in range(rng.randint(2, 6)):
                fh.write(" ".join(rng.choices(WORDS, k=rng.randint(4, 12))) + "\n")
            fh.write("\n")
    return path


class Counted:
    """An iterable that counts how many items its consumer has pulled."""

    def __init__(self, items):
        self.items, self.pulled = items, 0

    def __iter__(self):
        for item in self.items:
            self.pulled += 1
            yield item


def test_a_text_file_is_read_line_by_line_never_whole(tmp_path):
    path = _write_corpus(tmp_path / "big.txt", 40_000)
    size = path.stat().st_size
    assert size > 5 * 2**20
    tracemalloc.start()
    docs = sum(1 for _ in iter_documents([path]))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert docs == 40_000
    assert peak < size / 50  # a whole-file read would peak above the file's size


def test_tokenization_packing_and_pairs_pull_documents_lazily():
    from deltaformer.tokenizer import train_tokenizer

    tok = train_tokenizer([" ".join(WORDS)] * 5, "wordpiece", 100, min_frequency=1)
    rng = random.Random(0)
    documents = [[" ".join(rng.choices(WORDS, k=8)) for _ in range(3)] for _ in range(5000)]
    source = Counted(documents)
    stream = tokenize_stream(tok, source, batch=64)
    next(stream)
    assert source.pulled == 64  # one batch tokenized, not the corpus
    source = Counted(documents)
    blocks = pack_blocks(tokenize_stream(tok, source, batch=64), 16, eos_token_id=3)
    first = next(blocks)
    assert len(first) == 16 and source.pulled == 64
    ids = Counted([[[i * 10 + j] * 3 for j in range(3)] for i in range(5000)])
    stats = PairStats()
    pairs = iter_pairs(ids, 64, 2, 3, stats=stats, window=100)
    for _ in range(50):
        next(pairs)
    assert ids.pulled <= 100 + 50  # a document's pairs come once the window after it is read
    rest = list(pairs)
    assert ids.pulled == 5000 and stats.pairs == 50 + len(rest) and abs(stats.positive_rate - 0.5) < 0.03


def test_token_store_round_trips_examples_through_memory_maps(tmp_path):
    docs = [[[t % 90 + 5 for t in range(i, i + 4)] for i in range(k, k + 3)] for k in range(60)]
    pairs = make_pairs(docs, 16, 2, 3, seed=1)
    store = TokenStore.write(tmp_path / "s", map(pair_record, pairs), vocab_size=100, extra_fields=2)
    assert isinstance(store.ids, np.memmap) and store.ids.dtype == np.uint16
    again = TokenStore(tmp_path / "s")
    assert len(again) == len(pairs) and again.tokens == sum(len(p.input_ids) for p in pairs)
    assert [pair_from_record(again[i], again.extra[i].tolist()) for i in range(len(again))] == pairs
    wide = TokenStore.write(tmp_path / "w", [([70_000, 1], [])], vocab_size=80_000)
    assert wide.ids.dtype == np.uint32 and wide[0] == [70_000, 1]


def test_bad_text_is_an_error_naming_the_file(tmp_path):
    bad = tmp_path / "mixed.txt"
    bad.write_bytes(b"fine line\nsecond\n" + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"mixed.txt is not UTF-8 text \(line 3, byte 20\)"):
        list(iter_documents([bad]))
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="holds no .txt files"):
        list(iter_documents([tmp_path / "sub"]))
    with pytest.raises(DataError, match=r"1 of 3 document\(s\) have two or more segments"):
        list(iter_pairs(iter([[[5, 6], [7]], [[8]], []]), 32, 2, 3))
