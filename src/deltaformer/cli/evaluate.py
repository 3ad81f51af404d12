"""``deltaformer evaluate RUN_DIR [--task T | --test F]``: score a trained run on labelled data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..data.collate import PadCollator, encode_examples
from ..data.tabular import Fields, read_table
from ..data.tasks import SPLITS, TASKS, load_task
from ..errors import ConfigError
from ..train.evaluation import evaluate
from ..train.runs import load_run, read_run_info


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score a fine-tuned run on a task split or a labelled file",
        description="Evaluate RUN_DIR (the --out of `deltaformer finetune`). Default: the run's own test data "
        "(its task's test split, or its --test file).",
    )
    p.add_argument("run_dir", type=Path, help="run directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", choices=sorted(TASKS), help="built-in task to score on")
    src.add_argument("--test", type=Path, help="labelled .csv/.tsv/.jsonl file (the run's text/label fields)")
    p.add_argument("--split", choices=SPLITS, default="test", help="split of --task (or of the run's task)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--skip-bad-rows", action="store_true", help="skip (and count) rows that cannot be scored")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    info = read_run_info(args.run_dir)
    data = info.get("data", {})
    task = args.task or (data.get("task") if args.test is None else None)
    test_file = args.test or (Path(data["test"]) if not task and data.get("test") else None)
    if task is None and test_file is None:
        raise ConfigError(f"{args.run_dir} was trained on files without a test file: pass --test FILE or --task")
    loaded = load_run(args.run_dir, args.device)
    skipped: list[str] = []
    if task is not None:
        examples, source = load_task(task).split(args.split), f"{task}/{args.split}"
    else:
        fields = Fields(**data["fields"]) if data.get("fields") else Fields()
        assert test_file is not None  # no task, so a test file (checked above)
        table = read_table(test_file, fields, skip_bad_rows=args.skip_bad_rows)
        examples, source, skipped = table.examples, str(test_file), list(table.skipped)
    encoded = encode_examples(loaded.tokenizer, examples, loaded.max_length, loaded.labels,
                              args.skip_bad_rows, skipped)
    if not encoded:
        raise ConfigError(f"nothing to evaluate in {source}: every row was skipped")
    scores = evaluate(loaded.model, encoded, PadCollator(loaded.tokenizer.pad_token_id or 0), len(loaded.labels),
                      args.batch_size)
    result: dict[str, Any] = {"data": source, **scores, "skipped_rows": len(skipped)}
    if skipped:
        print(f"skipped {len(skipped)} bad row(s); first: {skipped[0]}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{source}: accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}, "
              f"loss {result['loss']:.4f} on {result['examples']} examples")
    return 0
