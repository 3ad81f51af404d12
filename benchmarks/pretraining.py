"""Pretraining: training speed against transformers, tokenizer training throughput, and whether pretraining helps.

Parts (``--parts``, all by default):

* ``tokenizer``: WordPiece training MB/s on brown + bbc-news + rt-reviews.
* ``speed``: the small BERT (4 layers, hidden 256, 4 heads) in train mode on batches of next-sentence pairs of
  that text masked by :class:`~deltaformer.data.nsp.PretrainingCollator`: ours (``BertForPreTraining``) and
  transformers' (same weights, same batches) each run forward, backward and an AdamW step, timed in
  alternation (medians); training tokens/s counts real (non-padding) tokens.
* ``speed-clm``: the same for a GPT-2 of 6 layers x 384 on packed blocks of the text (ours ``GPT2LMHeadModel``
  against transformers' ``GPT2LMHeadModel``), then where each library's step goes: ``torch.profiler`` over
  ``--profile-steps`` steps, the self CPU time of the top operators as shares (``clm_profile``), which shows
  how much of the step is the linear products both libraries hand to the same BLAS.
* ``bert``: ``pretrain`` MLM+NSP of the small BERT from scratch, its steps calibrated to
  ``--pretrain-cpu-minutes`` of this process's CPU time (wall time is no budget on a shared machine under
  ``nice``; both are reported, with the steps and tokens), MLM and NSP accuracy curves on held-out pairs; then
  ``finetune --task rt-polarity`` (full, every example of its 3200 / 400 / 400 stratified splits) from those
  weights and from random weights of the same architecture, same recipe, for each of ``--seeds``.
* ``plot``: the accuracy curves of the last ``bert`` and ``minilm`` records of ``--jsonl`` drawn into ``--plot``.
* ``compare``: only the rt-polarity comparison, from ``--compare MODEL BASELINE`` (a finished run's model).
* ``minilm``: continued MLM pretraining of MiniLM (no MLM head shipped: a fresh one, tied to the word
  embeddings), budgeted by ``--minilm-cpu-minutes`` the same way: held-out MLM accuracy before and after,
  rt-polarity before and after (same recipe and seeds), and the MLM-headed model saved to ``--save-minilm``
  (config, weights, tokenizer, the run's results) for cloze prompts, swapped in by renames and only when its
  held-out MLM accuracy beats the one already there.

Prints one JSON line per measurement (and appends it to ``--jsonl``).

    python benchmarks/pretraining.py --quick                       # tiny settings: proves the script runs
    nice -n 19 python benchmarks/pretraining.py --parts bert --work runs/pt --jsonl benchmarks/pretraining_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

import torch
from timing import interleaved_medians

from deltaformer.config import BertConfig

CORPORA = ["brown", "bbc-news", "rt-reviews"]
PARTS = ("tokenizer", "speed", "speed-clm", "bert", "minilm", "compare", "plot")
JSONL: list[Path] = []


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke run)")
    p.add_argument("--parts", nargs="+", default=list(PARTS[:-2]), choices=PARTS)
    p.add_argument("--plot", type=Path, default=Path(__file__).with_name("pretraining_curves.png"),
                   help="part plot: the PNG to write")
    p.add_argument("--jsonl", type=Path, help="also append every record to this file")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--profile-steps", type=int, default=2, help="speed-clm: steps profiled per library (0: none)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is then a fair budget)")
    p.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary directory)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fine-tuning seeds of the comparisons")
    p.add_argument("--pretrain-cpu-minutes", type=float, default=40.0,
                   help="CPU-time budget of the small BERT's pretraining steps")
    p.add_argument("--pretrain-steps", type=int, default=None, help="fixed steps instead of the budget")
    p.add_argument("--finetune-epochs", type=int, default=4)
    p.add_argument("--finetune-limit", type=int, default=None, help="rt-polarity examples per split (all: None)")
    p.add_argument("--pretrain-lr", type=float, default=5e-4)
    p.add_argument("--pretrain-dropout", type=float, default=0.1,
                   help="small BERT's hidden and attention dropout in pretraining (short runs learn faster without); "
                        "both fine-tuning arms inherit the pretrained config's")
    p.add_argument("--minilm-cpu-minutes", type=float, default=18.0,
                   help="CPU-time budget of MiniLM's continued pretraining steps")
    p.add_argument("--minilm-lr", type=float, default=1e-4)
    p.add_argument("--minilm-steps", type=int, default=None, help="fixed steps instead of the budget")
    p.add_argument("--minilm-batch-size", type=int, default=16)
    p.add_argument("--minilm-finetune-epochs", type=int, default=2)
    p.add_argument("--minilm-finetune-lr", type=float, default=5e-5)
    p.add_argument("--save-minilm", default="~/.cache/deltaformer/runs/minilm-mlm",
                   help="where the MLM-headed MiniLM goes ('' to skip)")
    p.add_argument("--compare", nargs=2, metavar=("MODEL", "BASELINE"),
                   help="part compare: rt-polarity from MODEL (a pretraining run's model/) against BASELINE (a model "
                   "or 'random')")
    p.add_argument("--compare-label", default="small BERT (4x256)")
    p.add_argument("--finetune-lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0, help="pretraining seed")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.max_length, args.vocab_size, args.repeats = 8, 64, 2000, 2
        args.pretrain_steps, args.finetune_epochs, args.minilm_steps = 20, 1, 4
        args.save_minilm, args.finetune_limit, args.seeds = "", 200, [0]
    return args


def emit(record: dict) -> None:
    line = json.dumps({**record, "threads": torch.get_num_threads()})
    print(line, flush=True)
    for path in JSONL:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.jsonl:
        JSONL.append(args.jsonl)
    from deltaformer.data.corpus import load_documents, tokenize_documents
    from deltaformer.tokenizer import train_tokenizer

    if "compare" in args.parts:
        if not args.compare:
            raise SystemExit("--parts compare needs --compare MODEL BASELINE")
        compare(args, args.compare[0], args.compare[1], args.compare_label, args.finetune_epochs, args.finetune_lr,
                args.work)
    if set(args.parts) <= {"minilm", "compare", "plot"}:  # MiniLM brings its own tokenizer
        if "minilm" in args.parts:
            results_minilm(args)
        if "plot" in args.parts:
            plot_curves(args)
        return 0
    documents = load_documents(CORPORA)
    if args.quick:
        documents = documents[::20]
    segments = [s for d in documents for s in d]
    start = time.perf_counter()
    tokenizer = train_tokenizer(segments, "wordpiece", args.vocab_size)
    seconds = time.perf_counter() - start
    mb = sum(len(s.encode()) for s in segments) / 2**20
    if "tokenizer" in args.parts:
        emit({"bench": "tokenizer_train", "kind": "wordpiece", "vocab": len(tokenizer), "mb": round(mb, 2),
              "seconds": round(seconds, 2), "mb_per_second": round(mb / seconds, 3)})
        start = time.perf_counter()
        bpe = train_tokenizer(segments, "bpe", args.vocab_size)
        bpe_seconds = time.perf_counter() - start
        emit({"bench": "tokenizer_train", "kind": "bpe", "vocab": len(bpe), "mb": round(mb, 2),
              "seconds": round(bpe_seconds, 2), "mb_per_second": round(mb / bpe_seconds, 3)})
    # the speed part pairs the whole text; the bert part calibrates on its first 400 documents
    docs = (tokenize_documents(tokenizer, documents if "speed" in args.parts else documents[:400])
            if {"speed", "bert"} & set(args.parts) else [])
    if "speed" in args.parts:
        speed(args, tokenizer, docs)
    if "speed-clm" in args.parts:
        speed_clm(args, documents)
    if "bert" in args.parts:
        results_bert(args, tokenizer, docs)
    if "minilm" in args.parts:
        results_minilm(args)
    if "plot" in args.parts:
        plot_curves(args)
    return 0


def stepper(model, batches):
    """One training step per call (forward, backward, AdamW), cycling through ``batches``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    state = {"i": 0}

    def step():
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def compare_speed(bench: str, ours, hf, batches, repeats: int, extra: dict) -> None:
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    ms = interleaved_medians({"deltaformer": stepper(ours, batches), "transformers": stepper(hf, batches)}, repeats)
    for impl, value in ms.items():
        emit({"bench": bench, "impl": impl, "ms": round(value, 1), "tokens_per_second":
              round(tokens / value * 1000, 1), **extra})
    emit({"bench": bench, "speedup": round(ms["transformers"] / ms["deltaformer"], 3), "target": 1.3,
          "reference": "transformers in the same run"})


def profile_shares(step, steps: int, top: int = 8) -> dict:
    """Self CPU time of ``steps`` calls of ``step`` by operator: the ``top`` operators' shares and the total."""
    from torch.profiler import ProfilerActivity, profile

    step()  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return {"step_ms": round(total / 1000 / steps, 1),
            "top_ops": {e.key: round(e.self_cpu_time_total / total, 3) for e in events[:top]}}


def speed(args, tokenizer, docs) -> None:
    import transformers

    from deltaformer.data.masking import MaskingVocab
    from deltaformer.data.nsp import PretrainingCollator, make_pairs
    from deltaformer.models import BertForPreTraining

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=1024,
                                     pad_token_id=tokenizer.pad_token_id)
    hf = transformers.BertForPreTraining(config).train()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = BertForPreTraining.from_pretrained(tmp).train()
    pairs = make_pairs(docs, args.max_length, tokenizer.cls_token_id, tokenizer.sep_token_id)
    collate = PretrainingCollator(MaskingVocab.from_tokenizer(tokenizer), tokenizer.pad_token_id,
                                  generator=torch.Generator().manual_seed(0))
    batches = [collate(pairs[i * args.batch_size:(i + 1) * args.batch_size]) for i in range(args.repeats + 1)]
    compare_speed("mlm_nsp_step", ours, hf, batches, args.repeats,
            {"model": "BERT 4x256", "batch": args.batch_size, "max_length": args.max_length,
             "attention": config._attn_implementation})


def speed_clm(args, documents) -> None:
    import transformers

    from deltaformer.data.clm import LMCollator, chunk_stream, token_stream
    from deltaformer.models import GPT2LMHeadModel
    from deltaformer.tokenizer import train_tokenizer

    segments = [s for d in documents[::4] for s in d]
    tokenizer = train_tokenizer(segments, "bpe", args.vocab_size)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=384, n_layer=6, n_head=6,
                                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    hf = transformers.GPT2LMHeadModel(config).train()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = GPT2LMHeadModel.from_pretrained(tmp).train()
    blocks = chunk_stream(token_stream(tokenizer, ["\n".join(d) for d in documents[:400]]), args.max_length)
    collate = LMCollator(tokenizer.eos_token_id)
    batches = [collate(blocks[i * args.batch_size:(i + 1) * args.batch_size]) for i in range(args.repeats + 1)]
    compare_speed("clm_step", ours, hf, batches, args.repeats,
            {"model": "GPT-2 6x384", "vocab": len(tokenizer), "batch": args.batch_size, "block": args.max_length,
             "attention": config._attn_implementation})
    if args.profile_steps:
        for impl, model in (("deltaformer", ours), ("transformers", hf)):
            emit({"bench": "clm_profile", "impl": impl, "steps": args.profile_steps, "batch": args.batch_size,
                  "block": args.max_length, **profile_shares(stepper(model, batches), args.profile_steps)})


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the corpus is tokenized in a pool)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def calibrated_steps(model, batches, minutes: float, eval_share: float = 0.15) -> tuple[int, float]:
    """Optimizer steps that fit in ``minutes`` of CPU time (less ``eval_share`` for evaluations), from three
    steps of ``model`` on ``batches`` timed by this process's CPU time, which neighbours on a shared machine
    do not inflate as they do wall time (then discarded: the model is a throwaway copy)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for batch in batches[:4]:
        start = time.process_time()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.process_time() - start)
    step = sorted(times[1:])[len(times[1:]) // 2]
    return max(10, int(minutes * 60 * (1 - eval_share) / step)), step


def eval_curve(run_dir: Path) -> list[dict]:
    from deltaformer.train.logs import MetricsLog

    return [{k: r[k] for k in ("step", "loss", "mlm_accuracy", "nsp_accuracy") if k in r}
            for r in MetricsLog(run_dir / "metrics.jsonl").read() if "mlm_accuracy" in r]


def rt_polarity(args, base: Path | str, out: Path, init: str, epochs: int, lr: float, seed: int) -> float:
    from deltaformer.train.finetune import FinetuneSpec, finetune
    from deltaformer.train.methods import MethodSpec
    from deltaformer.train.trainer import TrainConfig

    torch.set_num_threads(args.threads)
    cpu = time.process_time()
    res = finetune(FinetuneSpec(model=str(base), out=out, method=MethodSpec("full"), task="rt-polarity",
                                train=TrainConfig(epochs=epochs, lr=lr, batch_size=32, progress=False,
                                                  device=args.device, seed=seed),
                                limit=args.finetune_limit))
    emit({"bench": "rt_polarity_finetune", "init": init, "seed": seed, "epochs": epochs, "lr": lr,
          "limit": args.finetune_limit, "split_sizes": res["split_sizes"], "best_step": res.get("best_step"),
          "validation_accuracy": round(res["validation"]["accuracy"], 4) if res.get("validation") else None,
          "test_accuracy": round(res["test"]["accuracy"], 4), "wall_seconds": res["wall_seconds"],
          "cpu_seconds": round(time.process_time() - cpu, 1)})
    return float(res["test"]["accuracy"])


def work_dir(args, name: str):
    """``--work``/``name`` (kept, so a comparison can be rerun from a finished pretraining), else a temporary
    directory; a context manager either way."""
    if args.work is None:
        return tempfile.TemporaryDirectory()
    path = args.work / name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return _Kept(path)


class _Kept:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> str:
        return str(self.path)

    def __exit__(self, *exc) -> None:
        return None


def run_budget(run: dict, cpu: float, wall: float, batch: int, steps_budget: float, step_cpu: float) -> dict:
    """What a pretraining run cost: wall and CPU time (the whole call and the training loop), steps, and the
    tokens its batches held (steps x batch x the store's mean tokens per example)."""
    per_example = run["tokens"] / max(1, run.get("pairs") or run["train_examples"] + run["validation_examples"])
    return {"steps": run["steps"], "batch": batch, "budget_cpu_minutes": steps_budget,
            "calibrated_step_cpu_seconds": round(step_cpu, 3), "wall_seconds": round(wall, 1),
            "cpu_seconds": round(cpu, 1), "train_wall_seconds": run["train_seconds"],
            "tokens_seen": int(run["steps"] * batch * per_example), "corpus_tokens": run["tokens"]}


def results_bert(args, tokenizer, docs) -> None:
    """Small BERT, MLM+NSP from scratch within the CPU-time budget, then rt-polarity from it and from random."""
    from deltaformer.data.masking import MaskingVocab
    from deltaformer.data.nsp import PretrainingCollator, make_pairs
    from deltaformer.models import BertForPreTraining
    from deltaformer.train.pretrain import SIZES, PretrainSpec, pretrain
    from deltaformer.train.trainer import TrainConfig

    layers, hidden, heads = SIZES["small"]
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden, pad_token_id=tokenizer.pad_token_id)
    pairs = make_pairs(docs[:400], args.max_length, tokenizer.cls_token_id, tokenizer.sep_token_id)
    collate = PretrainingCollator(MaskingVocab.from_tokenizer(tokenizer), tokenizer.pad_token_id,
                                  generator=torch.Generator().manual_seed(0))
    batches = [collate(pairs[i * args.batch_size:(i + 1) * args.batch_size]) for i in range(4)]
    steps, step_s = calibrated_steps(BertForPreTraining(config), batches, args.pretrain_cpu_minutes)
    if args.pretrain_steps:
        steps = args.pretrain_steps
    with work_dir(args, "bert") as tmp:
        out = Path(tmp)
        tokenizer.save_pretrained(out / "tok")
        (out / "arch").mkdir()
        config.replace(hidden_dropout_prob=args.pretrain_dropout,
                       attention_probs_dropout_prob=args.pretrain_dropout).save(out / "arch")
        cpu, wall = cpu_seconds(), time.perf_counter()
        run = pretrain(PretrainSpec("mlm+nsp", ["rt-reviews"] if args.quick else CORPORA, out / "pre",
                                    config_file=out / "arch" / "config.json", tokenizer=str(out / "tok"), max_length=args.max_length, validation_share=0.02,
                                    train=TrainConfig(
                                        lr=args.pretrain_lr, metric="loss", batch_size=args.batch_size,
                                        max_steps=steps, progress=False, eval_every=max(1, steps // 10),
                                        device=args.device, seed=args.seed)))
        cost = run_budget(run, cpu_seconds() - cpu, time.perf_counter() - wall, args.batch_size,
                          args.pretrain_cpu_minutes, step_s)
        emit({"bench": "pretrain_small_bert", "objective": "mlm+nsp", "max_length": args.max_length,
              "lr": args.pretrain_lr, "dropout": args.pretrain_dropout, **cost, "pairs": run["pairs"],
              "skipped_documents": run["skipped_documents"],
              "positive_rate": run["positive_rate"], "validation": run["validation"],
              "curve": eval_curve(out / "pre")})
        compare(args, out / "pre" / "model", "random", "small BERT (4x256)", args.finetune_epochs, args.finetune_lr,
                out)


def compare(args, model: Path | str, baseline: str, label: str, epochs: int, lr: float,
            work: Path | None = None) -> None:
    """rt-polarity fine-tuning (full) of ``model`` and of ``baseline`` (a model, or ``random``: the same
    architecture from random weights drawn with each seed), the same recipe for both, two processes side by
    side, for every seed of ``--seeds``; emits every accuracy, then the means and the gain."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from deltaformer.config import load_config
    from deltaformer.models import BertModel
    from deltaformer.models.base import resolve_path
    from deltaformer.tokenizer import AutoTokenizer

    accuracy: dict[str, list[float]] = {"pretrained": [], "baseline": []}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        out = Path(tmp)
        for seed in args.seeds:
            bases = {"pretrained": str(model), "baseline": baseline}
            if baseline == "random":
                torch.manual_seed(seed)
                scratch = BertModel(cast(BertConfig, load_config(resolve_path(model))))
                scratch.save_pretrained(out / f"random-{seed}")
                AutoTokenizer.from_pretrained(model).save_pretrained(out / f"random-{seed}")
                bases["baseline"] = str(out / f"random-{seed}")
            with ProcessPoolExecutor(2, mp_context=get_context("fork")) as pool:
                futures = {name: pool.submit(rt_polarity, args, base, out / f"ft-{name}-{seed}",
                                             f"{label}: {name} ({base})", epochs, lr, seed)
                           for name, base in bases.items()}
                for name, future in futures.items():
                    accuracy[name].append(future.result())
    mean = {name: sum(v) / len(v) for name, v in accuracy.items()}
    emit({"bench": "rt_polarity_finetune", "model": label, "baseline": baseline, "seeds": args.seeds,
          "pretrained_test_accuracy": [round(a, 4) for a in accuracy["pretrained"]],
          "baseline_test_accuracy": [round(a, 4) for a in accuracy["baseline"]],
          "pretrained_mean": round(mean["pretrained"], 4), "baseline_mean": round(mean["baseline"], 4),
          "gain_points": round(100 * (mean["pretrained"] - mean["baseline"]), 2),
          "aim": 5 if baseline == "random" else None})


def saved_mlm_accuracy(target: Path) -> float | None:
    """Held-out MLM accuracy of the MLM-headed model already saved at ``target`` (None: nothing there)."""
    results = target / "pretraining-results.json"
    if not results.is_file():
        return None
    return float(json.loads(results.read_text(encoding="utf-8"))["validation"]["mlm_accuracy"])


def swap_in(source: Path, target: Path, extras: dict[str, Path]) -> None:
    """Copy ``source`` (plus ``extras``: name -> file) beside ``target`` and swap it in by two renames, so a
    reader sees the old directory or the new one, whole, never a half-copied one."""
    fresh, old = target.with_name(target.name + ".new"), target.with_name(target.name + ".old")
    for path in (fresh, old):
        if path.exists():
            shutil.rmtree(path)
    shutil.copytree(source, fresh)
    for name, file in extras.items():
        if file.exists():
            shutil.copy(file, fresh / name)
    if target.exists():
        os.replace(target, old)
    os.replace(fresh, target)
    if old.exists():
        shutil.rmtree(old)


def results_minilm(args) -> None:
    """Continued MLM pretraining of MiniLM (a fresh tied head): held-out MLM accuracy before and after, the
    rt-polarity change, and the MLM-headed model saved as an asset-like directory."""
    from deltaformer.data.corpus import load_documents, tokenize_documents
    from deltaformer.data.masking import MaskingVocab
    from deltaformer.data.nsp import PretrainingCollator, make_pairs
    from deltaformer.models import BertForMaskedLM
    from deltaformer.tokenizer import AutoTokenizer
    from deltaformer.train.pretrain import PretrainSpec, build_model, pretrain
    from deltaformer.train.trainer import TrainConfig

    tokenizer = AutoTokenizer.from_pretrained("minilm")
    docs = tokenize_documents(tokenizer, load_documents(["rt-reviews"])[:200])
    pairs = make_pairs(docs, args.max_length, tokenizer.cls_token_id, tokenizer.sep_token_id)
    collate = PretrainingCollator(MaskingVocab.from_tokenizer(tokenizer), tokenizer.pad_token_id, nsp=False,
                                  generator=torch.Generator().manual_seed(0))
    batches = [collate(pairs[i * args.minilm_batch_size:(i + 1) * args.minilm_batch_size]) for i in range(4)]
    model = build_model(PretrainSpec("mlm", [], Path("."), from_model="minilm"), len(tokenizer), tokenizer)
    assert isinstance(model, BertForMaskedLM)
    steps, step_s = calibrated_steps(model, batches, args.minilm_cpu_minutes, eval_share=0.2)
    steps = args.minilm_steps or steps
    with work_dir(args, "minilm") as tmp:
        out = Path(tmp)
        cpu, wall = cpu_seconds(), time.perf_counter()
        run = pretrain(PretrainSpec("mlm", ["rt-reviews"] if args.quick else CORPORA, out / "mlm",
                                    from_model="minilm", max_length=args.max_length, validation_share=0.01,
                                    evaluate_first=True, train=TrainConfig(
                                        lr=args.minilm_lr, metric="loss", batch_size=args.minilm_batch_size,
                                        max_steps=steps, progress=False, eval_every=max(1, steps // 6),
                                        device=args.device, seed=args.seed)))
        cost = run_budget(run, cpu_seconds() - cpu, time.perf_counter() - wall, args.minilm_batch_size,
                          args.minilm_cpu_minutes, step_s)
        after = run["validation"]["mlm_accuracy"]
        emit({"bench": "continued_mlm_minilm", "max_length": args.max_length, "lr": args.minilm_lr, **cost,
              "mlm_accuracy_before": round(run["initial_validation"]["mlm_accuracy"], 4),
              "mlm_accuracy_after": round(after, 4), "validation_examples": run["validation"]["examples"],
              "curve": eval_curve(out / "mlm")})
        if args.save_minilm:
            target = Path(args.save_minilm).expanduser()
            previous = saved_mlm_accuracy(target)
            if previous is None or after > previous:
                swap_in(out / "mlm" / "model", target, {f"pretraining-{name}": out / "mlm" / name
                                                        for name in ("results.json", "metrics.jsonl", "metrics.png")})
                emit({"bench": "continued_mlm_minilm", "saved": str(target), "replaced_mlm_accuracy": previous})
            else:
                emit({"bench": "continued_mlm_minilm", "kept": str(target), "its_mlm_accuracy": previous})
        compare(args, out / "mlm" / "model", "minilm", "MiniLM-L6-H384 after continued MLM",
                args.minilm_finetune_epochs, args.minilm_finetune_lr, out)


def plot_curves(args) -> None:
    """Held-out MLM (and NSP) accuracy against steps, from the last pretraining records of ``--jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not args.jsonl or not args.jsonl.is_file():
        raise SystemExit("--parts plot reads the records of --jsonl: give an existing file")
    last: dict[str, dict] = {}
    for line in args.jsonl.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("curve") and "calibrated_step_cpu_seconds" in record:
            last[record["bench"]] = record
    if not last:
        raise SystemExit(f"{args.jsonl} holds no pretraining curves: run --parts bert or minilm first")
    fig, axes = plt.subplots(1, len(last), figsize=(5 * len(last), 3.4), squeeze=False)
    titles = {"pretrain_small_bert": "small BERT 4x256 from scratch, MLM+NSP",
              "continued_mlm_minilm": "MiniLM-L6-H384, continued MLM"}
    for ax, (bench, record) in zip(axes[0], sorted(last.items(), reverse=True)):
        steps = [0] if "mlm_accuracy_before" in record else []
        mlm = [record["mlm_accuracy_before"]] if steps else []
        steps += [c["step"] for c in record["curve"]]
        mlm += [c["mlm_accuracy"] for c in record["curve"]]
        ax.plot(steps, [100 * a for a in mlm], marker="o", label="MLM accuracy")
        if any("nsp_accuracy" in c for c in record["curve"]):
            ax.plot([c["step"] for c in record["curve"]], [100 * c["nsp_accuracy"] for c in record["curve"]],
                    marker="s", label="NSP accuracy")
        ax.set(title=titles.get(bench, bench), xlabel=f"step (batch {record['batch']} x {record['max_length']})",
               ylabel="held-out accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=80)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    sys.exit(main())
