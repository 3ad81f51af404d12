"""``deltaformer pretrain --objective mlm+nsp|mlm|clm (--size S | --config FILE | --from MODEL) --text ... --out DIR``.

Masked-LM (+ next-sentence) pretraining of a BERT, or causal-LM pretraining of a GPT-2 / Llama on packed blocks,
on text files or the text assets, on the same trainer as ``finetune`` (checkpoints, --resume, torchrun, progress
bar, metrics.jsonl and metrics.png in --out).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.corpus import TEXT_ASSETS
from ..data.masking import MaskingConfig
from ..errors import ConfigError
from ..train.pretrain import OBJECTIVES, SIZES, PretrainSpec, pretrain
from .finetune import DefaultsFormatter, add_training_args, train_config_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain", help="pretrain a BERT (masked LM, + next-sentence prediction) or a decoder (causal LM) on raw text",
        description="Pretrain a model from scratch (--size, --config) or continue a checkpoint's pretraining "
        "(--from; a BERT without an MLM head gets one, tied to the word embeddings). mlm+nsp and mlm train a BERT; "
        "clm trains a decoder LM (a GPT-2 of --size, a GPT-2 or Llama --config, or a --from checkpoint) on the "
        "text packed into blocks of --max-length tokens. Writes the trainer's files, data/ (the tokenized "
        "corpus) and model/ (HF format, with the tokenizer) to --out.", formatter_class=DefaultsFormatter,
    )
    p.add_argument("--objective", choices=OBJECTIVES, default="mlm+nsp", help="what to learn")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--size", choices=sorted(SIZES), help="a fresh model: tiny (2x128) or small (4x256); a BERT, or a GPT-2 for clm")
    src.add_argument("--config", type=Path, help="a fresh model from this config.json")
    src.add_argument("--from", dest="from_model", help="continue pretraining this model directory or asset")
    p.add_argument("--text", nargs="+", required=True,
                   help=f"text files (a document per blank-line block, a segment per line), folders of .txt, or "
                   f"assets: {', '.join(TEXT_ASSETS)}")
    p.add_argument("--per-file", action="store_true", help="one document per file instead of per block")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the --from model's, or one trained on "
                   "--text: WordPiece, byte-level BPE for clm)")
    p.add_argument("--vocab-size", type=int, default=8000, help="vocabulary of a tokenizer trained on --text")
    p.add_argument("--mlm-probability", type=float, default=0.15, help="share of tokens picked for masking")
    p.add_argument("--whole-word", action="store_true", help="mask whole words")
    add_training_args(p, epochs=1)
    p.set_defaults(metric="loss", max_length=128)
    p.add_argument("--out", type=Path, required=True, help="run directory to write")


def run(args: argparse.Namespace) -> int:
    if args.metric != "loss":
        raise ConfigError("pretrain keeps the checkpoint of lowest validation loss: drop --metric")
    args.method = "full"
    train = train_config_from_args(args)
    if args.lr is None:
        train.lr = 5e-5 if args.from_model else 5e-4
    spec = PretrainSpec(objective=args.objective, text=args.text, out=args.out, size=args.size,
                        config_file=args.config, from_model=args.from_model, tokenizer=args.tokenizer,
                        vocab_size=args.vocab_size, max_length=args.max_length,
                        masking=MaskingConfig(probability=args.mlm_probability, whole_word=args.whole_word),
                        per_file=args.per_file, train=train, resume=args.resume, overwrite=args.overwrite)
    results = pretrain(spec)
    val = results.get("validation") or {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in val.items() if k not in ("examples", "tokens"))
    if args.objective == "clm":
        print(f"{results['blocks']} blocks of up to {args.max_length} tokens ({results['tokens']} tokens) from "
              f"{results['documents']} documents; best validation: {shown}")
    else:
        print(f"{results['pairs']} pairs from {results['documents']} documents ({results['skipped_documents']} "
              f"skipped, under two segments); best validation: {shown}")
    print(f"trained in {results['train_seconds']:.0f} s; model saved in {args.out / 'model'}")
    return 0
