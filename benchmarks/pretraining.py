"""Pretraining: speed of an MLM+NSP step against transformers, tokenizer training throughput, and whether
pretraining a small BERT helps fine-tuning.

``speed``: the small BERT (4 layers, hidden 256, 4 heads) in train mode, batches of next-sentence pairs from
brown + bbc-news + rt-reviews masked by :class:`~deltaformer.data.nsp.PretrainingCollator`; ours
(``BertForPreTraining``) and transformers' (same weights, same batches, eager attention) each run forward,
backward and an AdamW step, timed in alternation (medians). ``tokenizer``: WordPiece training MB/s on the same
text. ``results``: ``pretrain`` (MLM+NSP) for ``--pretrain-steps``, then ``finetune --task rt-polarity``
(full) from those weights and from random weights of the same architecture; prints both test accuracies.

Prints one JSON line per measurement.

    python benchmarks/pretraining.py --quick          # tiny settings: proves the script runs (~6 min on a busy 2-core CPU)
    python benchmarks/pretraining.py                  # full: 3000 steps of 32 x 128 (hours on a 2-core CPU; not yet timed)
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

CORPORA = ["brown", "bbc-news", "rt-reviews"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke run)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--pretrain-steps", type=int, default=3000)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--skip", nargs="*", default=[], choices=("speed", "tokenizer", "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.max_length, args.vocab_size, args.repeats = 8, 64, 2000, 2
        args.pretrain_steps, args.finetune_epochs = 20, 1
    return args


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from deltaformer.data.corpus import load_documents, tokenize_documents
    from deltaformer.tokenizer import train_tokenizer

    documents = load_documents(CORPORA)
    segments = [s for d in documents for s in d]
    if args.quick:
        documents, segments = documents[::20], [s for d in documents[::20] for s in d]
    start = time.perf_counter()
    tokenizer = train_tokenizer(segments, "wordpiece", args.vocab_size)
    seconds = time.perf_counter() - start
    mb = sum(len(s.encode()) for s in segments) / 2**20
    if "tokenizer" not in args.skip:
        emit({"bench": "tokenizer_train", "kind": "wordpiece", "vocab": len(tokenizer), "mb": round(mb, 2),
              "seconds": round(seconds, 2), "mb_per_second": round(mb / seconds, 3)})
    if "speed" not in args.skip:
        speed(args, tokenizer, tokenize_documents(tokenizer, documents))
    if "results" not in args.skip:
        results(args)
    return 0


def speed(args, tokenizer, docs) -> None:
    import transformers

    from deltaformer.data.masking import MaskingVocab
    from deltaformer.data.nsp import PretrainingCollator, make_pairs
    from deltaformer.models import BertForPreTraining

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=1024)
    config._attn_implementation = "eager"
    hf = transformers.BertForPreTraining(config).train()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = BertForPreTraining.from_pretrained(tmp).train()
    pairs = make_pairs(docs, args.max_length, tokenizer.cls_token_id, tokenizer.sep_token_id)
    collate = PretrainingCollator(MaskingVocab.from_tokenizer(tokenizer), tokenizer.pad_token_id,
                                  generator=torch.Generator().manual_seed(0))
    batches = [collate(pairs[i * args.batch_size:(i + 1) * args.batch_size]) for i in range(args.repeats + 1)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)

    def stepper(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        state = {"i": 0}

        def step():
            batch = batches[state["i"] % len(batches)]
            state["i"] += 1
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    ms = interleaved_medians({"deltaformer": stepper(ours), "transformers": stepper(hf)}, args.repeats)
    for impl, value in ms.items():
        emit({"bench": "mlm_nsp_step", "impl": impl, "ms": round(value, 1), "tokens_per_second":
              round(tokens / value * 1000, 1), "batch": args.batch_size, "max_length": args.max_length,
              "threads": torch.get_num_threads()})
    emit({"bench": "mlm_nsp_step", "speedup": round(ms["transformers"] / ms["deltaformer"], 3),
          "target": 1.3})


def results(args) -> None:
    from deltaformer.train.finetune import FinetuneSpec, finetune
    from deltaformer.train.methods import MethodSpec
    from deltaformer.train.pretrain import PretrainSpec, pretrain
    from deltaformer.train.trainer import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        text = ["rt-reviews"] if args.quick else CORPORA
        run = pretrain(PretrainSpec("mlm+nsp", text, out / "pre", size="small", vocab_size=args.vocab_size,
                                    max_length=args.max_length,
                                    train=TrainConfig(lr=5e-4, metric="loss", batch_size=args.batch_size,
                                                      max_steps=args.pretrain_steps, progress=False,
                                                      eval_every=args.pretrain_steps if args.quick else max(1, args.pretrain_steps // 10),
                                                      device=args.device)))
        emit({"bench": "pretrain_small_bert", "steps": run["steps"], "train_seconds": run["train_seconds"],
              **{k: v for k, v in (run["validation"] or {}).items()}})
        from deltaformer.models import BertModel

        scratch = out / "scratch"
        model = BertModel.from_pretrained(out / "pre" / "model")
        torch.manual_seed(0)
        model.init_weights()
        model.save_pretrained(scratch)
        from deltaformer.tokenizer import AutoTokenizer

        AutoTokenizer.from_pretrained(out / "pre" / "model").save_pretrained(scratch)
        accuracy = {}
        for name, base in (("pretrained", out / "pre" / "model"), ("random", scratch)):
            res = finetune(FinetuneSpec(model=str(base), out=out / f"ft-{name}", method=MethodSpec("full"),
                                        task="rt-polarity", train=TrainConfig(
                                            epochs=args.finetune_epochs, lr=1e-4, batch_size=32, progress=False,
                                            device=args.device), limit=200 if args.quick else None))
            accuracy[name] = res["test"]["accuracy"]
            emit({"bench": "rt_polarity_finetune", "init": name, "test_accuracy": round(accuracy[name], 4),
                  "wall_seconds": res["wall_seconds"]})
        emit({"bench": "rt_polarity_finetune", "gain_points": round(100 * (accuracy["pretrained"] -
                                                                          accuracy["random"]), 2), "aim": 5})


if __name__ == "__main__":
    sys.exit(main())
