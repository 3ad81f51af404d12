"""``deltaformer tokenizer train --kind wordpiece|bpe --vocab-size N --text ... --out DIR``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..data.corpus import TEXT_ASSETS, iter_documents


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenizer", help="train a tokenizer on raw text",
                              description="Tokenizer tools (over the tokenizers library).")
    verbs = p.add_subparsers(dest="tokenizer_verb", metavar="ACTION", required=True)
    t = verbs.add_parser("train", help="train a WordPiece (BERT) or byte-level BPE (GPT-2) tokenizer")
    t.add_argument("--kind", choices=("wordpiece", "bpe"), default="wordpiece", help="tokenizer model")
    t.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size (default 8000)")
    t.add_argument("--min-frequency", type=int, default=2, help="pairs rarer than this are not merged (default 2)")
    t.add_argument("--cased", action="store_true", help="keep case (default: lowercase)")
    t.add_argument("--text", nargs="+", required=True,
                   help=f"text files, folders of .txt files, or assets: {', '.join(TEXT_ASSETS)}")
    t.add_argument("--out", type=Path, required=True, help="directory to write tokenizer.json (+ vocab.txt) to")


def run(args: argparse.Namespace) -> int:
    from ..data.tabular import DataError
    from ..errors import ConfigError
    from ..tokenizer import train_tokenizer

    if args.vocab_size < 10:
        raise ConfigError(f"--vocab-size {args.vocab_size} is too small: use at least a few hundred")
    counts = {"documents": 0, "bytes": 0}

    def segments():  # streamed: the corpus is never held whole
        for doc in iter_documents(args.text):
            counts["documents"] += 1
            for segment in doc:
                counts["bytes"] += len(segment.encode("utf-8"))
                yield segment

    start = time.perf_counter()
    tokenizer = train_tokenizer(segments(), args.kind, args.vocab_size, args.min_frequency, lowercase=not args.cased)
    seconds = time.perf_counter() - start
    if not counts["documents"]:
        raise DataError(f"{', '.join(args.text)} hold(s) no text: a tokenizer needs some")
    tokenizer.save_pretrained(args.out)
    mb = counts["bytes"] / 2**20
    print(f"{args.kind} tokenizer of {len(tokenizer)} tokens trained on {counts['documents']} documents ({mb:.1f} MB) "
          f"in {seconds:.1f} s ({mb / max(seconds, 1e-9):.2f} MB/s); saved in {args.out}")
    return 0
