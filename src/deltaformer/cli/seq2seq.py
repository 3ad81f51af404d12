"""The sequence-to-sequence side of ``deltaformer finetune --task bbc-headlines`` and ``deltaformer evaluate``.

``deltaformer finetune transformer-small --task bbc-headlines --method full --out RUN`` trains the original
Transformer from scratch (or an encoder-decoder checkpoint: MODEL is then its directory) and scores the test
split's ROUGE; ``deltaformer evaluate RUN [--split S] [--beams N]`` scores a saved run again.
"""

from __future__ import annotations

import argparse
import json

from ..errors import ConfigError
from ..train.seq2seq import SIZES, Seq2SeqSpec, evaluate_seq2seq_run, finetune_seq2seq, is_fresh
from ..train.trainer import TrainConfig

#: Learning rate of a model trained from scratch when --lr is not given (the fine-tuning defaults are for
#: pretrained weights).
FRESH_LR = 5e-4


def add_seq2seq_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sequence-to-sequence tasks (--task bbc-headlines)",
                             f"MODEL may name a fresh Transformer: {', '.join(SIZES)}; --max-length is the source's")
    g.add_argument("--max-target-length", type=int, default=None, help="target tokens, end token included "
                   "(default: the task's)")
    g.add_argument("--beams", type=int, default=4, help="beam width when writing the test outputs (1: greedy)")
    g.add_argument("--tokenizer", default=None, help="a fresh model's tokenizer (default: a WordPiece tokenizer "
                   "trained on the task's training split)")
    g.add_argument("--vocab-size", type=int, default=8000, help="vocabulary of that trained tokenizer")
    g.add_argument("--model-dropout", type=float, default=0.1, help="a fresh Transformer's dropout")


def run_finetune(args: argparse.Namespace, train: TrainConfig) -> int:
    """``finetune`` for a sequence-to-sequence task; ``train`` is the trainer config the flags give."""
    if args.method != "full":
        raise ConfigError(f"--method {args.method}: sequence-to-sequence tasks train every weight; pass --method full")
    if args.metric not in ("loss", "accuracy"):  # accuracy is the flag's default: it means "not chosen" here
        raise ConfigError("sequence-to-sequence runs keep the checkpoint of lowest validation loss: drop --metric")
    train.metric = "loss"
    if args.lr is None and is_fresh(args.model):
        train.lr = FRESH_LR
    spec = Seq2SeqSpec(model=args.model, out=args.out, task=args.task, tokenizer=args.tokenizer,
                       vocab_size=args.vocab_size, max_source_length=args.max_length,
                       max_target_length=args.max_target_length, beams=args.beams, dropout=args.model_dropout, train=train,
                       resume=args.resume, overwrite=args.overwrite, limit=args.limit)
    results = finetune_seq2seq(spec)
    val = results.get("validation") or {}
    if val:
        print(f"best validation loss {val['loss']:.4f} (step {results['best_step']})")
    if "test" in results:
        print(_rouge_line(f"{args.task}/test", results["test"]))
    print(f"{results['total_parameters']:,} parameters trained in {results['train_seconds']:.0f} s; run saved in "
          f"{args.out}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    result = evaluate_seq2seq_run(args.run_dir, args.split, args.beams, args.batch_size or 32, args.device,
                                  args.limit)
    print(json.dumps(result) if args.json else _rouge_line(result["data"], result))
    return 0


def _rouge_line(where: str, scores: dict) -> str:
    return (f"{where}: ROUGE-1 {scores['rouge1']:.4f}, ROUGE-2 {scores['rouge2']:.4f}, ROUGE-L {scores['rougeL']:.4f} "
            f"on {scores['examples']} examples ({scores['decoding']})")
