"""BBC headlines with the original Transformer trained from scratch, beside the LED and the first sentence.

The task is the built-in ``bbc-headlines`` (article body -> headline, fixed splits). The model is a fresh
Transformer of ``--size`` over a WordPiece tokenizer trained on the training split, trained and scored by
exactly what ``deltaformer finetune SIZE --task bbc-headlines --method full`` runs
(:func:`deltaformer.train.seq2seq.finetune_seq2seq`: the library's trainer, teacher forcing, label smoothing
0.1, the checkpoint of lowest validation loss, beam search, ROUGE-1/2/L F1 on the 208 test articles).

Training is bounded by time: a few timed steps first measure this machine, and the run gets as many steps as
fit in ``--train-minutes`` (its learning-rate schedule then spans exactly those steps). The LED row is read
from ``benchmarks/headlines_cpu.jsonl`` (``benchmarks/headlines.py``'s committed CPU run); the first-sentence
baseline is computed here on the same test articles.

Prints (and, with ``--jsonl``, writes) one JSON line for the Transformer, one for the LED, one for the baseline.

    nice -n 15 python benchmarks/transformer.py --train-minutes 10 --threads 1 --jsonl benchmarks/transformer_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
TASK = "bbc-headlines"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="transformer-tiny", help="a fresh Transformer (default transformer-tiny)")
    p.add_argument("--train-minutes", type=float, default=10.0, help="training time budget (default 10)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--max-source-length", type=int, default=64, help="article tokens read (default 64)")
    p.add_argument("--max-target-length", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=4000, help="WordPiece vocabulary trained on the split (default 4000)")
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=200, help="validation loss every N steps (default 200)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--led", type=Path, default=HERE / "headlines_cpu.jsonl", help="the LED's committed results")
    p.add_argument("--jsonl", type=Path, default=None, help="also write the lines here")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary folder)")
    return p.parse_args(argv)


def steps_per_second(args: argparse.Namespace, tokenizer_dir: Path) -> float:
    """Optimizer steps per second of the same model on real batches (the median of a few timed steps)."""
    from deltaformer.data.collate import encode_pairs
    from deltaformer.data.tasks import load_seq2seq_task
    from deltaformer.tokenizer import AutoTokenizer
    from deltaformer.train.seeding import seed_everything
    from deltaformer.train.seq2seq import collator_for, fresh_transformer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    seed_everything(args.seed)
    model = fresh_transformer(args.size, tokenizer, max(args.max_source_length, args.max_target_length),
                              args.dropout).train()
    pairs = load_seq2seq_task(TASK).split("train")[:6 * args.batch_size]
    data = encode_pairs(tokenizer, pairs, args.max_source_length, args.max_target_length,
                        model.config.eos_token_id)
    collate = collator_for(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    times = []
    for i in range(6):
        batch = collate(data[i * args.batch_size:(i + 1) * args.batch_size])
        start = time.perf_counter()
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return 1.0 / sorted(times[1:])[len(times[1:]) // 2]


def run(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    from deltaformer.data.tasks import load_seq2seq_task
    from deltaformer.tokenizer import train_tokenizer
    from deltaformer.train.metrics import rouge_scores
    from deltaformer.train.seq2seq import Seq2SeqSpec, finetune_seq2seq
    from deltaformer.train.trainer import TrainConfig

    sys.path.insert(0, str(HERE))
    from headlines import first_sentence

    if args.threads:
        torch.set_num_threads(args.threads)
    task = load_seq2seq_task(TASK)
    tokenizer_dir = out / "tokenizer"
    train_tokenizer([t for p in task.split("train") for t in (p.source, p.target)], "wordpiece",
                    args.vocab_size).save_pretrained(tokenizer_dir)
    rate = steps_per_second(args, tokenizer_dir)
    steps = max(1, int(args.train_minutes * 60 * rate))
    train = TrainConfig(epochs=1, max_steps=steps, batch_size=args.batch_size, lr=args.lr,
                        warmup_ratio=args.warmup_ratio, eval_every=args.eval_every, metric="loss", seed=args.seed,
                        progress=False, eval_batch_size=32)
    spec = Seq2SeqSpec(model=args.size, out=out / "run", task=TASK, tokenizer=str(tokenizer_dir),
                       max_source_length=args.max_source_length, max_target_length=args.max_target_length,
                       beams=args.beams, dropout=args.dropout, train=train)
    results = finetune_seq2seq(spec)
    test = results["test"]
    losses = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in losses if r.get("split") == "train"]
    row = {"model": f"{args.size} (from scratch)", "task": TASK,
           **{k: round(test[k], 4) for k in ("rouge1", "rouge2", "rougeL")}, "test_examples": test["examples"],
           "decoding": test["decoding"], "train_seconds": results["train_seconds"],
           "generate_seconds": test["generate_seconds"], "steps": results["steps"],
           "measured_steps_per_second": round(rate, 3), "train_examples": results["split_sizes"]["train"],
           "epochs": round(results["steps"] * args.batch_size / results["split_sizes"]["train"], 2),
           "best_step": results["best_step"], "best_validation_loss": round(results["validation"]["loss"], 4),
           "first_train_loss": train_losses[0] if train_losses else None,
           "final_train_loss": train_losses[-1] if train_losses else None,
           "parameters": results["total_parameters"], "peak_memory_mb": results["peak_memory_mb"],
           "batch_size": args.batch_size, "lr": args.lr, "dropout": args.dropout, "label_smoothing": 0.1,
           "max_source_length": args.max_source_length, "max_target_length": args.max_target_length,
           "vocab_size": args.vocab_size, "seed": args.seed, "device": "cpu",
           "torch_threads": torch.get_num_threads(), "samples": test["samples"]}
    led = [json.loads(line) for line in args.led.read_text().splitlines() if line.strip()]
    led_row = {**{k: v for k, v in led[0].items() if k != "samples"}, "source": args.led.name}
    pairs = task.split("test")
    baseline = rouge_scores([first_sentence(p.source) for p in pairs], [p.target for p in pairs])
    baseline_row = {"model": "first-sentence", "task": TASK,
                    **{k: round(baseline[k], 4) for k in ("rouge1", "rouge2", "rougeL")},
                    "test_examples": baseline["examples"]}
    return [row, led_row, baseline_row]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="transformer-") as tmp:
        lines = run(args, args.out or Path(tmp))
    for line in lines:
        print(json.dumps(line), flush=True)
    if args.jsonl:
        args.jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
