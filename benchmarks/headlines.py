"""Headline generation on BBC News: an LED warm-started from MiniLM vs the article's first sentence.

The task is the built-in ``bbc-headlines`` (:func:`deltaformer.data.tasks.load_seq2seq_task`): article body ->
its headline, fixed 80/10/10 splits stratified by topic. The model is
:func:`deltaformer.convert.led_from_bert` on ``minilm``: the encoder is MiniLM converted to a Longformer
(``--max-source-length`` positions, one-sided ``--window``, [CLS] global), the decoder is warm-started from
the same six BERT layers (self-attention made causal, feed-forward, LayerNorms, embeddings; cross-attention
fresh), in MiniLM's WordPiece vocabulary ([CLS] starts, [SEP] ends, [PAD] pads).

It trains with the library's :class:`~deltaformer.train.trainer.Trainer` (teacher forcing, cross-entropy on
the headline tokens), then writes test headlines by greedy (``--beams 1``) or beam search and scores ROUGE-1,
ROUGE-2 and ROUGE-L F1 (:func:`deltaformer.train.metrics.rouge_scores`, ``rouge-score``'s tokenisation,
no stemming) against the reference headlines, beside a baseline that takes the body's first sentence as the
headline. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, else the process's peak resident set.

Prints one JSON line for the model, one for the baseline, then a comparison line (model minus baseline).

    python benchmarks/headlines.py --device cuda --epochs 8 --batch-size 16 --beams 4 --bf16
    python benchmarks/headlines.py --device cpu --epochs 1 --batch-size 4 --limit 16 --max-source-length 256
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

TASK = "bbc-headlines"
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"']?\s+(?=[\"'A-Z0-9])")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16, help="per micro-batch (default 16)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    p.add_argument("--max-source-length", type=int, default=1024, help="article tokens read (default 1024)")
    p.add_argument("--max-target-length", type=int, default=32, help="headline tokens, eos included (default 32)")
    p.add_argument("--window", type=int, default=256, help="the encoder's one-sided window (default 256)")
    p.add_argument("--beams", type=int, default=4, help="beam width; 1 decodes greedily (default 4)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in training and generation")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N train and test examples (a quick CPU smoke run)")
    p.add_argument("--eval-batch-size", type=int, default=32, help="articles per generation batch (default 32)")
    p.add_argument("--samples", type=int, default=3, help="generated headlines to show in the JSON (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="show the training progress bar (on stderr)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary folder)")
    return p.parse_args(argv)


def first_sentence(text: str) -> str:
    """The text up to its first sentence end (., ! or ? before a space and a capital, digit or quote)."""
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0]


def train(model: torch.nn.Module, data: list, collate, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Teacher-forced training with the library's Trainer; returns its results plus the last logged loss."""
    from deltaformer.train.trainer import TrainConfig, Trainer

    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                         bf16=args.bf16, seed=args.seed, progress=args.progress, device=args.device)
    trainer = Trainer(model, config, data, collate, out)
    results = trainer.train()
    losses = [r["loss"] for r in trainer.metrics_log.read() if r.get("split") == "train"]
    return {**results, "device": trainer.env.device, "final_train_loss": losses[-1] if losses else None}


@torch.no_grad()
def generate(model, tokenizer, data: list, collate, args: argparse.Namespace, device: torch.device) -> list[str]:
    """Headlines for ``data`` in order: greedy or beam search, special tokens dropped."""
    from deltaformer.generation import generate as decode
    from deltaformer.train.evaluation import autocast, move

    model.eval()
    texts: list[str] = []
    for start in range(0, len(data), args.eval_batch_size):
        batch = move(collate(data[start:start + args.eval_batch_size]), device)
        with autocast(device, args.bf16):
            ids = decode(model, batch["input_ids"], batch["attention_mask"],
                         global_attention_mask=batch.get("global_attention_mask"),
                         max_new_tokens=args.max_target_length, num_beams=args.beams)
        texts += tokenizer.batch_decode(ids.cpu().tolist(), skip_special_tokens=True)
    return texts


def scored(name: str, predictions: list[str], references: list[str]) -> dict[str, Any]:
    from deltaformer.train.metrics import rouge_scores

    scores = rouge_scores(predictions, references)
    return {"model": name, "task": TASK, **{k: round(v, 4) for k, v in scores.items() if k != "examples"},
            "test_examples": scores["examples"]}


def run(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """Build, train, generate and score; returns the model row, the baseline row and the comparison."""
    from deltaformer.convert import led_from_bert
    from deltaformer.data.collate import Seq2SeqCollator, encode_pairs
    from deltaformer.data.tasks import load_seq2seq_task
    from deltaformer.tokenizer import AutoTokenizer
    from deltaformer.train.finetune import peak_memory_mb
    from deltaformer.train.seeding import seed_everything

    task = load_seq2seq_task(TASK)
    train_pairs, test_pairs = (task.split(s)[:args.limit] for s in ("train", "test"))
    tokenizer = AutoTokenizer.from_pretrained("minilm")
    seed_everything(args.seed)  # the fresh cross-attention is drawn from the seed
    model = led_from_bert("minilm", args.max_source_length, args.window, args.max_target_length)
    config = model.config
    collate = Seq2SeqCollator(config.pad_token_id, global_first=True)
    encode = lambda pairs: encode_pairs(tokenizer, pairs, args.max_source_length, args.max_target_length,  # noqa: E731
                                        config.eos_token_id)
    trained = train(model, encode(train_pairs), collate, args, out)
    device = trained.pop("device")
    start = time.perf_counter()
    generated = generate(model, tokenizer, encode(test_pairs), collate, args, device)
    references = [p.target for p in test_pairs]
    name = f"led-minilm-{args.max_source_length}"
    row = {
        **scored(name, generated, references),
        "decoding": "greedy" if args.beams == 1 else f"beam {args.beams}",
        "train_seconds": trained["train_seconds"], "generate_seconds": round(time.perf_counter() - start, 2),
        "final_train_loss": trained["final_train_loss"], "peak_memory_mb": peak_memory_mb(device),
        "memory_measure": "cuda_max_memory_allocated" if device.type == "cuda" else "process_max_rss",
        "train_examples": len(train_pairs), "epochs": args.epochs, "batch_size": args.batch_size,
        "grad_accum": args.grad_accum, "lr": args.lr, "max_source_length": args.max_source_length,
        "max_target_length": args.max_target_length, "window": args.window, "bf16": args.bf16,
        "seed": args.seed, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "samples": [{"reference": r, "generated": g} for r, g in zip(references, generated)][:args.samples],
    }
    baseline = scored("first-sentence", [first_sentence(p.source) for p in test_pairs], references)
    comparison = {"comparison": f"{name} vs first-sentence",
                  **{f"{k}_gain": round(row[k] - baseline[k], 4) for k in ("rouge1", "rouge2", "rougeL")}}
    return [row, baseline, comparison]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="headlines-") as tmp:
        for line in run(args, args.out or Path(tmp)):
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
