"""The methods table: every fine-tuning method on rt-polarity (3 seeds) and bbc-news (1 seed) with MiniLM.

Runs one method on one task at a time, each seed in its own process (so peak memory is that run's own),
and merges the numbers into ``benchmarks/results.json``; then prints the markdown table of everything
recorded so far. Settings are the library defaults (3 epochs, batch 32, the task's max length, the method's
default learning rate), so a row is what ``deltaformer finetune minilm --task T --method M`` gives.

    python benchmarks/results_table.py --method lora --task rt-polarity --seeds 0 1 2
    python benchmarks/results_table.py --method full --task bbc-news --seeds 0
    python benchmarks/results_table.py --method prefix --option projection=true --seeds 0 1   # a row of its own
    python benchmarks/results_table.py            # print the table only

Wall time and memory depend on the machine and on whatever else runs on it: compare rows from one device.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_RESULTS = ROOT / "results.json"
TASK_SEEDS = {"rt-polarity": [0, 1, 2], "bbc-news": [0]}


def device_name(device: str | None) -> str:
    import torch

    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"


def run_one(method: str, options: dict, task: str, seed: int, epochs: int, lr: float | None, out: Path,
            device: str | None) -> dict:
    """Train and score one (method, task, seed) in this process; returns the row's numbers."""
    from deltaformer.train.finetune import FinetuneSpec, finetune
    from deltaformer.train.methods import DEFAULT_LR, MethodSpec
    from deltaformer.train.trainer import TrainConfig

    spec = FinetuneSpec(model="minilm", out=out, task=task, method=MethodSpec(method, dict(options)),
                        train=TrainConfig(epochs=epochs, batch_size=32, lr=lr or DEFAULT_LR[method], seed=seed,
                                          progress=False, device=device), overwrite=True)
    results = finetune(spec)
    return {
        "test_accuracy": results["test"]["accuracy"],
        "test_macro_f1": results["test"]["macro_f1"],
        "validation_accuracy": results["validation"]["accuracy"],
        "trainable_parameters": results["trainable_parameters"],
        "trainable_percent": results["trainable_percent"],
        "wall_seconds": results["wall_seconds"],
        "train_seconds": results["train_seconds"],
        "peak_memory_mb": results["peak_memory_mb"],
        "saved_bytes": results["saved_bytes"],
        "lr": spec.train.lr,
        "epochs": epochs,
        "options": spec.method.options,
        "device": device_name(device),
    }


def parse_options(given: list[str]) -> dict:
    """``NAME=VALUE`` pairs; values are read as JSON (``true``, ``8``, ``["query"]``), else kept as text."""
    options = {}
    for item in given:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--option {item!r}: write it as NAME=VALUE, e.g. projection=true")
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = value
    return options


def row_name(method: str, options: dict) -> str:
    """The table's method column: the method, plus any option given away from its default."""
    extra = " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(options.items()))
    return f"{method} ({extra})" if extra else method


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def table(data: dict) -> str:
    """Markdown: one row per task and method, test accuracy as mean ± std over seeds."""
    lines = ["| task | method | test accuracy | seeds | trainable params | wall time (s) | peak memory (MB) "
             "| saved size | device |", "|---|---|---|---|---|---|---|---|---|"]
    order = ["full", "probe", "bitfit", "lora", "adapter", "ia3", "prefix", "ptuning2", "prompt", "ptuning"]
    for task in sorted({k.split("/")[0] for k in data}):
        rows = {k.split("/")[1]: v for k, v in data.items() if k.startswith(task + "/")}
        base = lambda m: m.split(" ")[0]  # noqa: E731  ("prefix (projection=true)" sorts after "prefix")
        for method in sorted(rows, key=lambda m: (order.index(base(m)) if base(m) in order else 99, m)):
            seeds = list(rows[method]["seeds"].values())
            acc = [s["test_accuracy"] for s in seeds]
            spread = f" ± {statistics.stdev(acc):.3f}" if len(acc) > 1 else ""
            first = seeds[0]
            lines.append(
                f"| {task} | {method} | {statistics.mean(acc):.3f}{spread} | {len(acc)} "
                f"| {first['trainable_parameters']:,} ({first['trainable_percent']:.2f}%) "
                f"| {statistics.mean(s['wall_seconds'] for s in seeds):.0f} "
                f"| {max(s['peak_memory_mb'] for s in seeds):.0f} | {_size(first['saved_bytes'])} | {first['device']} |"
            )
    return "\n".join(lines)


def _size(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", help="method to run (see deltaformer finetune --help)")
    p.add_argument("--task", choices=sorted(TASK_SEEDS), default="rt-polarity")
    p.add_argument("--seeds", type=int, nargs="*", default=None, help="default: 0 1 2 for rt-polarity, 0 for bbc-news")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=None, help="default: the method's default learning rate")
    p.add_argument("--device", default=None)
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSON file rows are merged into")
    p.add_argument("--runs", type=Path, default=Path("runs/bench"), help="where runs are written (then removed)")
    p.add_argument("--keep-runs", action="store_true")
    p.add_argument("--note", default=None, help="remark stored with the rows (e.g. how the weights were copied)")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="a method option away from its default (JSON value), e.g. projection=true; "
                   "the row is named after it")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # one seed, JSON to stdout
    args = p.parse_args()
    options = parse_options(args.option)

    if args.worker is not None:
        out = args.runs / f"{args.task}-{args.method}-seed{args.worker}"
        row = run_one(args.method, options, args.task, args.worker, args.epochs, args.lr, out, args.device)
        if not args.keep_runs:
            shutil.rmtree(out, ignore_errors=True)
        print("RESULT " + json.dumps(row))
        return 0

    if args.method:
        seeds = args.seeds if args.seeds is not None else TASK_SEEDS[args.task]
        for seed in seeds:
            cmd = [sys.executable, __file__, "--method", args.method, "--task", args.task, "--epochs",
                   str(args.epochs), "--runs", str(args.runs), "--worker", str(seed)]
            cmd += ["--lr", str(args.lr)] if args.lr else []
            cmd += ["--device", args.device] if args.device else []
            cmd += ["--keep-runs"] if args.keep_runs else []
            cmd += [x for option in args.option for x in ("--option", option)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not result:
                print(f"{args.method} on {args.task} seed {seed} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                return 1
            row = json.loads(result[-1][len("RESULT "):])
            if args.note:
                row["note"] = args.note
            data = load(args.results)
            entry = data.setdefault(f"{args.task}/{row_name(args.method, options)}", {"seeds": {}})
            entry["seeds"][str(seed)] = row
            save(args.results, data)
            print(f"{args.task} {row_name(args.method, options)} seed {seed}: test accuracy {row['test_accuracy']:.4f} "
                  f"in {row['wall_seconds']:.0f} s", flush=True)
    print(table(load(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
