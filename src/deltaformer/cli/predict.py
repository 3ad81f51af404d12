"""``deltaformer predict RUN_DIR TEXT... | --file F | -``: label texts with a trained run.

Prints one line per text: the predicted label, then every label's probability, then the text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..data.collate import PadCollator, encode_examples
from ..data.tabular import Example, Fields, read_table
from ..errors import ConfigError
from ..train.evaluation import predict_probabilities
from ..train.runs import load_run


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="predict labels (and probabilities) for texts with a fine-tuned run",
        description="Predict with RUN_DIR. Texts come from the arguments, from --file (.csv/.tsv/.jsonl with "
        "the run's text field(s), or .txt with one text per line), or from standard input when TEXT is '-'.",
    )
    p.add_argument("run_dir", type=Path, help="run directory (the --out of `deltaformer finetune`)")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to label; '-' reads one text per line from stdin")
    p.add_argument("--file", type=Path, help="file of texts")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def _examples(args: argparse.Namespace, fields: Fields) -> list[Example]:
    if args.file is not None and args.texts:
        raise ConfigError("give texts or --file, not both")
    if args.file is not None:
        if args.file.suffix.lower() == ".txt":
            if not args.file.is_file():
                raise ConfigError(f"{args.file} does not exist")
            lines = args.file.read_text(encoding="utf-8", errors="replace").splitlines()
            return [Example(text=line.strip(), source=f"{args.file}:{i}") for i, line in enumerate(lines, 1)
                    if line.strip()]
        return read_table(args.file, fields, need_label=False).examples
    if args.texts == ["-"]:
        return [Example(text=line.strip(), source=f"<stdin>:{i}") for i, line in enumerate(sys.stdin, 1)
                if line.strip()]
    if not args.texts:
        raise ConfigError("nothing to predict: pass TEXT arguments, --file FILE, or '-' to read stdin")
    blank = next((i for i, t in enumerate(args.texts, 1) if not t.strip()), None)
    if blank is not None:  # a label for no text would be the head's bias, not a prediction
        raise ConfigError(f"argument {blank} is empty (or only whitespace): there is no text to label; drop it")
    return [Example(text=t, source=f"argument {i}") for i, t in enumerate(args.texts, 1)]


def run(args: argparse.Namespace) -> int:
    loaded = load_run(args.run_dir, args.device)
    data = loaded.info.get("data", {})
    fields = Fields(**data["fields"]) if data.get("fields") else Fields()
    examples = [Example(e.text, e.text_pair, None, e.source) for e in _examples(args, fields)]
    if not examples:
        raise ConfigError("nothing to predict: the input has no text")
    encoded = encode_examples(loaded.tokenizer, examples, loaded.max_length)
    probs = predict_probabilities(loaded.model, encoded, PadCollator(loaded.tokenizer.pad_token_id or 0),
                                  args.batch_size)
    names = loaded.labels.labels
    for example, row in zip(examples, probs.tolist()):
        best = max(range(len(row)), key=row.__getitem__)
        if args.json:
            print(json.dumps({"label": names[best], "probabilities": dict(zip(names, row)), "text": example.text}))
        else:
            shown = " ".join(f"{name}={p:.3f}" for name, p in zip(names, row))
            print(f"{names[best]}\t{shown}\t{example.text}")
    return 0
