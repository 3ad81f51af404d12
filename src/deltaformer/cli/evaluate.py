"""``deltaformer evaluate RUN_DIR [--task T | --test F]``: score a trained run on labelled data.

With ``--template`` (or a prompt-based run), ``deltaformer evaluate MODEL --task T --template "..." --verbalizer
FILE_OR_JSON [--shots K] [--calibrate]`` scores a model with an LM head through prompts instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..data.collate import PadCollator, encode_examples
from ..data.tabular import Fields, read_table
from ..data.tasks import SEQ2SEQ_TASKS, SPLITS, TASKS, load_task
from ..errors import ConfigError
from ..train.evaluation import evaluate
from ..train.runs import load_run, read_run_info
from .prompt_args import add_demonstration_args, add_template_args, verbalizers_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score a fine-tuned run on a task split or a labelled file",
        description="Evaluate RUN_DIR (the --out of `deltaformer finetune`). Default: the run's own test data "
        "(its task's test split, or its --test file). With --template, RUN_DIR is any model with an LM head (or "
        "an instruction-tuning run) scored zero- or few-shot through the template and verbalizer; a prompt-based "
        "run (finetune --few-shot) is scored through its own patterns.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR|MODEL", help="run directory (or, with --template, a model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", choices=sorted([*TASKS, *SEQ2SEQ_TASKS]), help="built-in task to score on (a "
                     "sequence-to-sequence run scores its own task: ROUGE)")
    src.add_argument("--test", type=Path, help="labelled .csv/.tsv/.jsonl file (the run's text/label fields)")
    p.add_argument("--split", choices=SPLITS, default="test", help="split of --task (or of the run's task)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="examples per batch (default 64; 8 with prompts, each example being several rows)")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip (and count) rows that cannot be scored")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--limit", type=int, default=None, help="prompts, seq2seq runs: score only the first N examples of the split")
    p.add_argument("--max-length", type=int, default=None, help="prompts: tokens per input (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="prompts: seed of the demonstrations")
    p.add_argument("--beams", type=int, default=None, help="sequence-to-sequence runs: beam width (default: the "
                   "run's; 1 is greedy)")
    add_template_args(p)
    add_demonstration_args(p)


def run(args: argparse.Namespace) -> int:
    from ..prompting.task_eval import PROMPT_RUN, run_type

    if args.template or run_type(str(args.run_dir)) == PROMPT_RUN:
        return run_prompts(args)
    from ..train.seq2seq import is_seq2seq_run

    if is_seq2seq_run(args.run_dir):
        from .seq2seq import run_evaluate

        if args.test is not None or args.task not in (None, *SEQ2SEQ_TASKS):
            raise ConfigError(f"{args.run_dir} is a sequence-to-sequence run: it is scored on its own task (--split)")
        return run_evaluate(args)
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
                      args.batch_size or 64)
    result: dict[str, Any] = {"data": source, **scores, "skipped_rows": len(skipped)}
    if skipped:
        print(f"skipped {len(skipped)} bad row(s); first: {skipped[0]}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{source}: accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}, "
              f"loss {result['loss']:.4f} on {result['examples']} examples")
    return 0


def run_prompts(args: argparse.Namespace) -> int:
    from ..prompting.pet import PromptSetup
    from ..prompting.task_eval import TaskEvalSpec, evaluate_task

    if args.task is None:
        raise ConfigError("prompt-based evaluation needs --task T (a built-in task; its training split gives "
                          "the demonstrations)")
    setup = None
    if args.template:
        setup = PromptSetup(args.template, verbalizers_from_args(args), args.max_length, args.word_reduce,
                            args.class_reduce, args.chat)
    spec = TaskEvalSpec(str(args.run_dir), args.task, setup, args.split, args.shots, args.demos, args.seed,
                        args.calibrate, args.encoder, args.demo_max_tokens, args.overflow, args.limit,
                        args.batch_size or 8, args.device, args.generate)
    result = evaluate_task(spec)
    if args.json:
        print(json.dumps(result))
        return 0
    where = f"{args.task}/{args.split}, {result['shots']}-shot" + (f" ({args.demos})" if result["shots"] else "")
    for i, pattern in enumerate(result.get("patterns", [])):
        print(f"pattern {i} {result['templates'][i]!r}: accuracy {pattern['accuracy']:.4f}")
    print(f"{where}: accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f} on {result['examples']} examples")
    if "calibrated" in result:
        cal = result["calibrated"]
        print(f"calibrated: accuracy {cal['accuracy']:.4f}, macro-F1 {cal['macro_f1']:.4f}")
    if "generation" in result:
        gen = result["generation"]
        print(f"generation: accuracy {gen['accuracy']:.4f}, labels parsed from {gen['parsed']:.1%} of answers")
    if result["dropped_demonstrations"]:
        print(f"{result['dropped_demonstrations']} demonstration(s) did not fit and were dropped", file=sys.stderr)
    return 0
