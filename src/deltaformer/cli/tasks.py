"""``deltaformer tasks``: the built-in tasks, their split sizes and label balance (for a sequence-to-sequence
task: the balance of the group its splits are stratified by)."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from ..data.tasks import FRACTIONS, SEQ2SEQ_TASKS, SPLIT_SEED, SPLITS, TASKS, load_seq2seq_task, load_task


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tasks", help="list built-in tasks with split sizes and label balance",
        description="Built-in classification and sequence-to-sequence tasks. Splits are fixed: "
        f"{'/'.join(str(round(f * 100)) for f in FRACTIONS)} train/validation/test, stratified by label, "
        f"seed {SPLIT_SEED}. Each task's data is fetched on first use.",
    )
    p.add_argument("names", nargs="*", metavar="TASK", help=f"tasks to show (default all: {', '.join([*TASKS, *SEQ2SEQ_TASKS])})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def run(args: argparse.Namespace) -> int:
    names = args.names or [*TASKS, *SEQ2SEQ_TASKS]
    report = {name: _seq2seq_report(name) if name in SEQ2SEQ_TASKS else _report(name) for name in names}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for name, info in report.items():
        target = f", target {info['max_target_length']}" if "max_target_length" in info else ""
        print(f"{name}: {info['description']} (default max length {info['max_length']}{target} tokens)")
        width = max(12, *(len(label) + 2 for label in info["labels"]))
        print(f"  {'split':<12}{'size':>6}  " + "".join(f"{label:>{width}}" for label in info["labels"]))
        for split, s in info["splits"].items():
            size = s["size"]
            cells = "".join(f"{f'{n} ({100 * n / max(1, size):.0f}%)':>{width}}" for n in s["labels"].values())
            print(f"  {split:<12}{s['size']:>6}  {cells}")
        print()
    return 0


def _report(name: str) -> dict[str, Any]:
    task = load_task(name)
    return {
        "description": task.description,
        "labels": task.labels,
        "max_length": task.max_length,
        "splits": {split: {"size": len(task.split(split)), "labels": task.label_counts(split)} for split in SPLITS},
    }


def _seq2seq_report(name: str) -> dict[str, Any]:
    task = load_seq2seq_task(name)
    groups = sorted({str(pair.label) for split in SPLITS for pair in task.split(split)})

    def counts(split: str) -> dict[str, int]:
        found = Counter(str(pair.label) for pair in task.split(split))
        return {group: found[group] for group in groups}

    return {
        "description": task.description,
        "labels": groups,
        "max_length": task.max_source_length,
        "max_target_length": task.max_target_length,
        "splits": {split: {"size": len(task.split(split)), "labels": counts(split)} for split in SPLITS},
    }
