"""``deltaformer tasks``: the built-in tasks, their split sizes and label balance."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..data.tasks import FRACTIONS, SPLIT_SEED, SPLITS, TASKS, load_task


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tasks", help="list built-in tasks with split sizes and label balance",
        description="Built-in classification tasks. Splits are fixed: "
        f"{'/'.join(str(round(f * 100)) for f in FRACTIONS)} train/validation/test, stratified by label, "
        f"seed {SPLIT_SEED}. Each task's data is fetched on first use.",
    )
    p.add_argument("names", nargs="*", metavar="TASK", help=f"tasks to show (default all: {', '.join(TASKS)})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def run(args: argparse.Namespace) -> int:
    names = args.names or list(TASKS)
    report: dict[str, dict[str, Any]] = {}
    for name in names:
        task = load_task(name)
        report[name] = {
            "description": task.description,
            "labels": task.labels,
            "max_length": task.max_length,
            "splits": {split: {"size": len(task.split(split)), "labels": task.label_counts(split)}
                       for split in SPLITS},
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for name, info in report.items():
        print(f"{name}: {info['description']} (default max length {info['max_length']} tokens)")
        width = max(12, *(len(label) + 2 for label in info["labels"]))
        print(f"  {'split':<12}{'size':>6}  " + "".join(f"{label:>{width}}" for label in info["labels"]))
        for split, s in info["splits"].items():
            size = s["size"]
            cells = "".join(f"{f'{n} ({100 * n / max(1, size):.0f}%)':>{width}}" for n in s["labels"].values())
            print(f"  {split:<12}{s['size']:>6}  {cells}")
        print()
    return 0
