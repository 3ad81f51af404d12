"""Pretraining: training speed against transformers, tokenizer training throughput, and whether pretraining helps.

Parts (``--parts``, all by default):

* ``tokenizer``: WordPiece training MB/s on brown + bbc-news + rt-reviews.
* ``speed``: the small BERT (4 layers, hidden 256, 4 heads) in train mode on batches of next-sentence pairs of
  that text masked by :class:`~deltaformer.data.nsp.PretrainingCollator`: ours (``BertForPreTraining``) and
  transformers' (same weights, same batches) each run forward, backward and an AdamW step, timed in
  alternation (medians); training tokens/s counts real (non-padding) tokens.
* ``speed-clm``: the same for a GPT-2 of 6 layers x 384 on packed blocks of the text (ours ``GPT2LMHeadModel``
  against transformers' ``GPT2LMHeadModel``).
* ``bert``: ``pretrain`` MLM+NSP of the small BERT from scratch, its steps calibrated to ``--pretrain-minutes``
  (MLM and NSP accuracy curves on held-out pairs), then ``finetune --task rt-polarity`` (full) from those
  weights and from random weights of the same architecture.
* ``minilm``: continued MLM pretraining of MiniLM (no MLM head shipped: a fresh one, tied to the word
  embeddings): held-out MLM accuracy before and after, rt-polarity before and after, and the MLM-headed model
  saved to ``--save-minilm`` (config, weights, tokenizer, the run's results) for cloze prompts.

Prints one JSON line per measurement (and appends it to ``--jsonl``).

    python benchmarks/pretraining.py --quick                       # tiny settings: proves the script runs
    nice -n 15 python benchmarks/pretraining.py --parts bert --jsonl benchmarks/pretraining_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from timing import interleaved_medians

from deltaformer.config import BertConfig

CORPORA = ["brown", "bbc-news", "rt-reviews"]
PARTS = ("tokenizer", "speed", "speed-clm", "bert", "minilm")
JSONL: list[Path] = []


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke run)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--jsonl", type=Path, help="also append every record to this file")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--pretrain-minutes", type=float, default=25.0, help="budget of the small BERT's pretraining")
    p.add_argument("--pretrain-steps", type=int, default=None, help="fixed steps instead of the budget")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--finetune-limit", type=int, default=None, help="rt-polarity examples per split (all: None)")
    p.add_argument("--minilm-minutes", type=float, default=15.0, help="budget of MiniLM's continued pretraining")
    p.add_argument("--minilm-steps", type=int, default=None, help="fixed steps instead of the budget")
    p.add_argument("--minilm-batch-size", type=int, default=16)
    p.add_argument("--minilm-finetune-epochs", type=int, default=1)
    p.add_argument("--save-minilm", default="~/.cache/deltaformer/runs/minilm-mlm",
                   help="where the MLM-headed MiniLM goes ('' to skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.max_length, args.vocab_size, args.repeats = 8, 64, 2000, 2
        args.pretrain_steps, args.finetune_epochs, args.minilm_steps = 20, 1, 4
        args.save_minilm, args.finetune_limit = "", 200
    return args


def emit(record: dict) -> None:
    line = json.dumps({**record, "threads": torch.get_num_threads()})
    print(line, flush=True)
    for path in JSONL:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.jsonl:
        JSONL.append(args.jsonl)
    from deltaformer.data.corpus import load_documents, tokenize_documents
    from deltaformer.tokenizer import train_tokenizer

    if set(args.parts) <= {"minilm"}:  # MiniLM brings its own tokenizer
        results_minilm(args)
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
    docs = tokenize_documents(tokenizer, documents) if {"speed", "speed-clm", "bert"} & set(args.parts) else []
    if "speed" in args.parts:
        speed(args, tokenizer, docs)
    if "speed-clm" in args.parts:
        speed_clm(args, documents)
    if "bert" in args.parts:
        results_bert(args, tokenizer, docs)
    if "minilm" in args.parts:
        results_minilm(args)
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


def compare(bench: str, ours, hf, batches, repeats: int, extra: dict) -> None:
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    ms = interleaved_medians({"deltaformer": stepper(ours, batches), "transformers": stepper(hf, batches)}, repeats)
    for impl, value in ms.items():
        emit({"bench": bench, "impl": impl, "ms": round(value, 1), "tokens_per_second":
              round(tokens / value * 1000, 1), **extra})
    emit({"bench": bench, "speedup": round(ms["transformers"] / ms["deltaformer"], 3), "target": 1.3,
          "reference": "transformers in the same run"})


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
    compare("mlm_nsp_step", ours, hf, batches, args.repeats,
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
    compare("clm_step", ours, hf, batches, args.repeats,
            {"model": "GPT-2 6x384", "vocab": len(tokenizer), "batch": args.batch_size, "block": args.max_length,
             "attention": config._attn_implementation})


def calibrated_steps(model, batches, minutes: float, eval_share: float = 0.15) -> tuple[int, float]:
    """Optimizer steps that fit in ``minutes`` (less ``eval_share`` for evaluations), from three timed steps
    of ``model`` on ``batches`` (then discarded: the model is a throwaway copy)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for batch in batches[:4]:
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    step = sorted(times[1:])[len(times[1:]) // 2]
    return max(10, int(minutes * 60 * (1 - eval_share) / step)), step


def eval_curve(run_dir: Path) -> list[dict]:
    from deltaformer.train.logs import MetricsLog

    return [{k: r[k] for k in ("step", "loss", "mlm_accuracy", "nsp_accuracy") if k in r}
            for r in MetricsLog(run_dir / "metrics.jsonl").read() if "mlm_accuracy" in r]


def rt_polarity(args, base: Path | str, out: Path, init: str, epochs: int, lr: float) -> float:
    from deltaformer.train.finetune import FinetuneSpec, finetune
    from deltaformer.train.methods import MethodSpec
    from deltaformer.train.trainer import TrainConfig

    res = finetune(FinetuneSpec(model=str(base), out=out, method=MethodSpec("full"), task="rt-polarity",
                                train=TrainConfig(epochs=epochs, lr=lr, batch_size=32, progress=False,
                                                  device=args.device, seed=args.seed),
                                limit=args.finetune_limit))
    emit({"bench": "rt_polarity_finetune", "init": init, "epochs": epochs, "lr": lr, "limit": args.finetune_limit,
          "test_accuracy": round(res["test"]["accuracy"], 4), "wall_seconds": res["wall_seconds"]})
    return float(res["test"]["accuracy"])


def results_bert(args, tokenizer, docs) -> None:
    """Small BERT, MLM+NSP from scratch within the time budget, then rt-polarity from it and from random."""
    from deltaformer.data.masking import MaskingVocab
    from deltaformer.data.nsp import PretrainingCollator, make_pairs
    from deltaformer.models import BertForPreTraining, BertModel
    from deltaformer.train.pretrain import SIZES, PretrainSpec, pretrain
    from deltaformer.train.trainer import TrainConfig

    layers, hidden, heads = SIZES["small"]
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden, pad_token_id=tokenizer.pad_token_id)
    pairs = make_pairs(docs[:400], args.max_length, tokenizer.cls_token_id, tokenizer.sep_token_id)
    collate = PretrainingCollator(MaskingVocab.from_tokenizer(tokenizer), tokenizer.pad_token_id,
                                  generator=torch.Generator().manual_seed(0))
    batches = [collate(pairs[i * args.batch_size:(i + 1) * args.batch_size]) for i in range(4)]
    steps, step_s = calibrated_steps(BertForPreTraining(config), batches, args.pretrain_minutes)
    if args.pretrain_steps:
        steps = args.pretrain_steps
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        tokenizer.save_pretrained(out / "tok")
        run = pretrain(PretrainSpec("mlm+nsp", ["rt-reviews"] if args.quick else CORPORA, out / "pre", size="small", tokenizer=str(out / "tok"),
                                    max_length=args.max_length, validation_share=0.02, train=TrainConfig(
                                        lr=5e-4, metric="loss", batch_size=args.batch_size, max_steps=steps,
                                        progress=False, eval_every=max(1, steps // 8), device=args.device,
                                        seed=args.seed)))
        emit({"bench": "pretrain_small_bert", "objective": "mlm+nsp", "steps": run["steps"],
              "batch": args.batch_size, "max_length": args.max_length, "calibrated_step_seconds": round(step_s, 3),
              "budget_minutes": args.pretrain_minutes, "train_seconds": run["train_seconds"],
              "pairs": run["pairs"], "skipped_documents": run["skipped_documents"],
              "positive_rate": run["positive_rate"], "validation": run["validation"],
              "curve": eval_curve(out / "pre")})
        scratch = out / "scratch"
        model = BertModel.from_pretrained(out / "pre" / "model")
        torch.manual_seed(args.seed)
        model.init_weights()
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        accuracy = {name: rt_polarity(args, base, out / f"ft-{name}", name, args.finetune_epochs, 1e-4)
                    for name, base in (("pretrained", out / "pre" / "model"), ("random", scratch))}
        emit({"bench": "rt_polarity_finetune", "model": "small BERT (4x256)", "gain_points": round(
            100 * (accuracy["pretrained"] - accuracy["random"]), 2), "aim": 5})


def results_minilm(args) -> None:
    """Continued MLM pretraining of MiniLM (a fresh tied head): held-out MLM accuracy before and after, the
    rt-polarity change, and the MLM-headed model saved as an asset-like directory."""
    import shutil

    from deltaformer.data.corpus import load_documents, tokenize_documents
    from deltaformer.data.masking import MaskingVocab
    from deltaformer.data.nsp import PretrainingCollator, make_pairs
    from deltaformer.models import BertForMaskedLM
    from deltaformer.tokenizer import AutoTokenizer
    from deltaformer.train.pretrain import PretrainSpec, build_model, pretrain
    from deltaformer.train.pretrain import PretrainSpec as _Spec
    from deltaformer.train.trainer import TrainConfig

    tokenizer = AutoTokenizer.from_pretrained("minilm")
    docs = tokenize_documents(tokenizer, load_documents(["rt-reviews"])[:200])
    pairs = make_pairs(docs, args.max_length, tokenizer.cls_token_id, tokenizer.sep_token_id)
    collate = PretrainingCollator(MaskingVocab.from_tokenizer(tokenizer), tokenizer.pad_token_id, nsp=False,
                                  generator=torch.Generator().manual_seed(0))
    batches = [collate(pairs[i * args.minilm_batch_size:(i + 1) * args.minilm_batch_size]) for i in range(4)]
    model = build_model(_Spec("mlm", [], Path("."), from_model="minilm"), len(tokenizer), tokenizer)
    assert isinstance(model, BertForMaskedLM)
    steps, step_s = calibrated_steps(model, batches, args.minilm_minutes, eval_share=0.25)
    steps = args.minilm_steps or steps
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        run = pretrain(PretrainSpec("mlm", ["rt-reviews"] if args.quick else CORPORA, out / "mlm",
                                    from_model="minilm", max_length=args.max_length, validation_share=0.01,
                                    evaluate_first=True, train=TrainConfig(
                                        lr=5e-5, metric="loss", batch_size=args.minilm_batch_size, max_steps=steps,
                                        progress=False, eval_every=max(1, steps // 4), device=args.device,
                                        seed=args.seed)))
        emit({"bench": "continued_mlm_minilm", "steps": run["steps"], "batch": args.minilm_batch_size,
              "budget_minutes": args.minilm_minutes, "calibrated_step_seconds": round(step_s, 3),
              "max_length": args.max_length, "train_seconds": run["train_seconds"],
              "mlm_accuracy_before": round(run["initial_validation"]["mlm_accuracy"], 4),
              "mlm_accuracy_after": round(run["validation"]["mlm_accuracy"], 4),
              "validation_examples": run["validation"]["examples"], "curve": eval_curve(out / "mlm")})
        if args.save_minilm:
            target = Path(args.save_minilm).expanduser()
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(out / "mlm" / "model", target)
            for name in ("results.json", "metrics.jsonl", "metrics.png"):
                if (out / "mlm" / name).exists():
                    shutil.copy(out / "mlm" / name, target / f"pretraining-{name}")
            emit({"bench": "continued_mlm_minilm", "saved": str(target)})
        before = rt_polarity(args, "minilm", out / "ft-minilm", "minilm", args.minilm_finetune_epochs, 5e-5)
        after = rt_polarity(args, out / "mlm" / "model", out / "ft-minilm-mlm", "minilm+continued-mlm",
                            args.minilm_finetune_epochs, 5e-5)
        emit({"bench": "rt_polarity_finetune", "model": "MiniLM-L6-H384", "change_points": round(
            100 * (after - before), 2)})


if __name__ == "__main__":
    sys.exit(main())
