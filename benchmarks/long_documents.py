"""Full movie reviews: MiniLM converted to a 4096-token Longformer vs plain MiniLM truncated to 512 tokens.

The task is the built-in ``rt-reviews`` (Pang & Lee polarity v2.0, ~745 words a review, fixed 80/10/10
splits), the question of the Longformer issue: does reading the whole review beat reading its first 512
tokens, and at what cost in time and memory?

* ``longformer``: ``minilm`` through :func:`~deltaformer.convert.convert_bert_to_longformer`
  (``--max-length`` positions, one-sided ``--window``), fine-tuned on reviews truncated at ``--max-length``;
  its head is Longformer's (dense + tanh + out_proj on the global [CLS]), freshly initialised.
* ``bert``: ``minilm`` as it is, fine-tuned on reviews truncated at 512 tokens (its position limit); its head
  is BERT's (the checkpoint's pooler + a fresh linear).

Both go through the library's fine-tuning path (:func:`deltaformer.train.finetune.finetune`, full
fine-tuning) with the same epochs, learning rate, batch size, accumulation and seed. Each model trains in its
own subprocess, so its peak memory is its own: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the
process's peak resident set (``ru_maxrss``), which includes Python, torch and the data, not only tensors.
``train_seconds`` is the training loop's own time (validation included, conversion and the test pass not).

Prints one JSON line per model, then a comparison line (Longformer minus / over BERT).

    python benchmarks/long_documents.py --device cuda --epochs 3 --batch-size 8 --bf16
    python benchmarks/long_documents.py --device cpu --epochs 1 --batch-size 4 --limit 16   # smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MODELS = ("longformer", "bert")
BERT_LIMIT = 512
TASK = "rt-reviews"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="per micro-batch (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate of both models (default 5e-5)")
    p.add_argument("--max-length", type=int, default=4096, help="the Longformer's length in tokens (default 4096)")
    p.add_argument("--window", type=int, default=256, help="the Longformer's one-sided window (default 256)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both models")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N examples of each split (a quick CPU smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="show the training progress bar (on stderr)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="which models to run")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the converted model and the runs (default: a temporary folder)")
    p.add_argument("--only", choices=MODELS, default=None, help=argparse.SUPPRESS)  # the child process
    return p.parse_args(argv)


def converted_model(args: argparse.Namespace) -> Path:
    """MiniLM as a Longformer of ``--max-length`` tokens, converted once per work folder."""
    from deltaformer.convert import convert_bert_to_longformer

    out = args.work / f"minilm-longformer-{args.max_length}-w{args.window}"
    if not (out / "model.safetensors").is_file():
        convert_bert_to_longformer("minilm", args.max_length, args.window, out)
    return out


def truncated_fraction(model: str, max_length: int, limit: int | None) -> tuple[float, float]:
    """(share of training reviews longer than ``max_length`` tokens, their mean length in tokens)."""
    from deltaformer.data.tasks import load_task
    from deltaformer.tokenizer import AutoTokenizer

    texts = [e.text for e in load_task(TASK).split("train")[:limit]]
    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(model)(texts, truncation=False)["input_ids"]]
    return sum(n > max_length for n in lengths) / len(lengths), sum(lengths) / len(lengths)


def run_model(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune and score one model in this process; returns its JSON row."""
    from deltaformer.train.finetune import FinetuneSpec, finetune
    from deltaformer.train.methods import MethodSpec
    from deltaformer.train.trainer import TrainConfig

    model = str(converted_model(args)) if kind == "longformer" else "minilm"
    max_length = args.max_length if kind == "longformer" else BERT_LIMIT
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                        eval_batch_size=args.batch_size, bf16=args.bf16, seed=args.seed, progress=args.progress,
                        device=args.device)
    spec = FinetuneSpec(model=model, out=args.work / f"run-{kind}", method=MethodSpec("full"), task=TASK,
                        max_length=max_length, train=train, limit=args.limit, overwrite=True)
    results = finetune(spec)
    truncated, mean_tokens = truncated_fraction(model, max_length, args.limit)
    return {
        "model": f"{kind}-minilm-{max_length}", "task": TASK, "max_length": max_length,
        "window": args.window if kind == "longformer" else None,
        "test_accuracy": results["test"]["accuracy"], "test_macro_f1": results["test"]["macro_f1"],
        "validation_accuracy": (results.get("validation") or {}).get("accuracy"),
        "train_seconds": results["train_seconds"], "wall_seconds": results["wall_seconds"],
        "peak_memory_mb": results["peak_memory_mb"],
        "memory_measure": "cuda_max_memory_allocated" if on_cuda(args.device) else "process_max_rss",
        "train_truncated_fraction": round(truncated, 4), "train_mean_tokens": round(mean_tokens, 1),
        "split_sizes": results["split_sizes"], "epochs": args.epochs, "batch_size": args.batch_size,
        "grad_accum": args.grad_accum, "lr": args.lr, "bf16": args.bf16, "seed": args.seed,
        "device": device_name(args.device),
    }


def on_cuda(device: str | None) -> bool:
    """Whether ``--device`` (None: CUDA when available, as the trainer decides) means a CUDA device."""
    import torch

    return (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")


def device_name(device: str | None) -> str:
    import torch

    if on_cuda(device):
        return torch.cuda.get_device_name(torch.device(device or "cuda"))
    return f"cpu ({torch.get_num_threads()} threads)"


def run_child(kind: str, argv: list[str], work: Path) -> dict[str, Any]:
    """Run one model in a fresh process (its own peak memory) and read back its JSON row."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--only", kind, "--work", str(work)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {kind} run failed (exit {done.returncode}); its error is printed above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Longformer against BERT: accuracy difference, time and memory ratios."""
    long, short = rows["longformer"], rows["bert"]
    return {
        "comparison": f"{long['model']} vs {short['model']}",
        "test_accuracy_gain": round(long["test_accuracy"] - short["test_accuracy"], 4),
        "train_time_ratio": round(long["train_seconds"] / max(1e-9, short["train_seconds"]), 2),
        "peak_memory_ratio": round(long["peak_memory_mb"] / max(1e-9, short["peak_memory_mb"]), 2),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.only:
        print(json.dumps(run_model(args.only, args)), flush=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="long-documents-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = {}
        for kind in args.models:
            rows[kind] = run_child(kind, argv, work)
            print(json.dumps(rows[kind]), flush=True)
    if len(rows) == len(MODELS):
        print(json.dumps(compare(rows)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
