"""``deltaformer finetune MODEL --task T | --train F --method M --out DIR``: train a classifier.

Works under ``torchrun --nproc_per_node N -m deltaformer.cli.main finetune ...`` too (data parallel; the
batch size is per process).

Prompt-based training (PET): ``--task T --few-shot N --template ... --verbalizer ...``; instruction tuning:
``--instructions FILE|builtin[:-TASK]`` (loss on the assistant's tokens only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.tabular import Fields
from ..data.tasks import SEQ2SEQ_TASKS, TASKS
from ..train.finetune import FinetuneSpec, finetune
from ..train.methods import (
    DEFAULT_LR,
    METHODS,
    QUANTIZE,
    QUANTIZE_OPTION,
    MethodSpec,
    all_options,
    method_options,
)
from ..train.schedule import SCHEDULES
from ..train.trainer import PLOT, TrainConfig


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a classifier on a built-in task or your CSV/TSV/JSONL files",
        description="Fine-tune MODEL (a model directory or asset name such as minilm) for classification "
        "with a full or parameter-efficient method. Writes metrics, a plot, checkpoints and the model to --out.",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("model", help="model directory or asset name (e.g. minilm)")
    add_data_args(p)
    add_method_args(p)
    add_training_args(p)
    p.add_argument("--out", type=Path, required=True, help="run directory to write")
    add_prompt_training_args(p)
    from .seq2seq import add_seq2seq_args

    add_seq2seq_args(p)


class DefaultsFormatter(argparse.HelpFormatter):
    """Show an option's default in --help when it has a meaningful one and the help text does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (a built-in task, or your own files)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", choices=sorted([*TASKS, *SEQ2SEQ_TASKS]),
                     help="built-in task with fixed 80/10/10 splits (bbc-headlines: sequence-to-sequence)")
    src.add_argument("--train", type=Path, help="training file (.csv, .tsv or .jsonl; plain .txt with --objective clm)")
    src.add_argument("--instructions", metavar="FILE|builtin[:-TASK]",
                     help="instruction tuning: a JSONL file (instruction/input/output or chat messages per line), or "
                     "the built-in multitask mixture, optionally without a task (builtin:-rt-polarity)")
    g.add_argument("--objective", choices=("classify", "clm"), default="classify",
                   help="classify: a classification head (decoders read the last token); clm: fine-tune a decoder "
                   "LM on the raw text of --train (blocks of --max-length tokens, default 512 or the context)")
    g.add_argument("--validation", type=Path, help="validation file (default: 10%% of --train, stratified)")
    g.add_argument("--test", type=Path, help="test file, scored at the end")
    g.add_argument("--limit", type=int, default=None,
                   help="keep only the first N examples of each split (quick runs; splits are shuffled)")
    g.add_argument("--text-field", default="text", help="column/key of the text")
    g.add_argument("--pair-field", default=None, help="column/key of a second text (sentence-pair tasks)")
    g.add_argument("--label-field", default="label", help="column/key of the label")
    g.add_argument("--skip-bad-rows", action="store_true",
                   help="skip rows with missing text/label, bad encoding or unknown labels (and count them) "
                   "instead of stopping with an error")


def add_method_args(p: argparse.ArgumentParser, default: str = "lora") -> None:
    """``--method`` and one flag per method option, built from the methods' config fields."""
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=METHODS, default=default,
                   help="what to train (qlora: lora on every linear layer of an NF4 base with double quantization)")
    g.add_argument("--quantize", choices=tuple(QUANTIZE), default=None,
                   help="train the delta on a frozen base quantized this way: int8 (per output channel), llm.int8 "
                   "(int8 products, outlier features in fp32), nf4 / fp4 (4-bit blocks of 64, double quantization), "
                   "q4_1 (GGUF's 4-bit blocks of 32 with scale and minimum); qlora implies nf4")
    for name, (option, methods) in all_options().items():
        flag = "--" + name.replace("_", "-")
        defaults = {m: method_options(m)[name].default for m in methods}
        shown = ", ".join(f"{m} {_shown(d)}" for m, d in defaults.items() if d is not None)
        text = f"{option.help} ({', '.join(methods)}{'; default ' + shown if shown else ''})"
        if option.kind is bool:
            g.add_argument(flag, action="store_true", default=None, help=text)
        else:
            g.add_argument(flag, type=str if option.kind is list else option.kind, help=text)


def _shown(value: object) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def add_training_args(p: argparse.ArgumentParser, epochs: int = 3) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch-size", type=int, default=32, help="examples per step and process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: " + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + ")")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-ratio", type=float, default=0.06, help="fraction of steps of linear warmup")
    g.add_argument("--schedule", choices=SCHEDULES, default="linear", help="decay after warmup")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    g.add_argument("--max-length", type=int, default=None, help="tokens per example (default: task's, or 128)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: each epoch)")
    g.add_argument("--save-every", type=int, default=None, help="also checkpoint every N steps")
    g.add_argument("--patience", type=int, default=None, help="stop after N evaluations without improvement")
    g.add_argument("--metric", choices=("accuracy", "macro_f1", "loss"), default="accuracy",
                   help="validation metric that picks the best checkpoint")
    g.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer (and a causal LM's loss, in chunks) in the backward instead of keeping "
                   "its activations: far less memory for about one more forward of time, the same gradients")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in --out, with the same settings (a changed one is "
                   "refused, listed; a finished run is not extended: start a new one to train longer)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it or --resume, an existing run is refused)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_prompt_training_args(p: argparse.ArgumentParser) -> None:
    from .prompt_args import add_template_args

    add_template_args(p)
    g = p.add_argument_group("prompt-based fine-tuning (PET) and instruction tuning")
    g.add_argument("--few-shot", type=int, default=None, help="PET: train on N labelled examples of --task")
    g.add_argument("--validation-size", type=int, default=0, help="PET: validation examples (0: none, train "
                   "for the full schedule)")
    g.add_argument("--distill", type=int, default=0, metavar="N",
                   help="PET: label N unlabelled training texts with the ensemble and train a classifier on them")
    g.add_argument("--test-limit", type=int, default=None, help="score only the first N test examples")
    g.add_argument("--per-task", type=int, default=200,
                   help="built-in instruction mixture: examples per task (each phrased by a random template)")
    g.add_argument("--no-packing", action="store_true", help="instruction tuning: one example per sequence")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="instruction file: skip (and count) broken lines instead of stopping")


def method_from_args(args: argparse.Namespace) -> MethodSpec:
    options = all_options()
    given: dict[str, object] = {}
    for name, (option, _) in options.items():
        value = getattr(args, name)
        if value is not None and option.kind is list:
            value = [t.strip() for t in value.split(",") if t.strip()] or None
        if value is not None:
            given[name] = value
    unused = sorted(set(given) - set(method_options(args.method)))
    if unused:
        from ..errors import ConfigError

        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise ConfigError(f"{flags} do(es) not apply to --method {args.method}")
    quantize = getattr(args, "quantize", None)
    if quantize is not None:
        given[QUANTIZE_OPTION] = quantize
    return MethodSpec(args.method, given)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr if args.lr is not None else DEFAULT_LR[args.method], weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, schedule=args.schedule, max_grad_norm=args.max_grad_norm or None,
        bf16=args.bf16, eval_every=args.eval_every, save_every=args.save_every, metric=args.metric,
        patience=args.patience, seed=args.seed, max_steps=args.max_steps, progress=not args.no_progress,
        device=args.device, gradient_checkpointing=args.gradient_checkpointing,
    )


def spec_from_args(args: argparse.Namespace) -> FinetuneSpec:
    return FinetuneSpec(
        model=args.model, out=args.out, method=method_from_args(args), task=args.task, train_file=args.train,
        validation_file=args.validation, test_file=args.test,
        fields=Fields(args.text_field, args.pair_field, args.label_field), skip_bad_rows=args.skip_bad_rows,
        max_length=args.max_length, train=train_config_from_args(args), resume=args.resume,
        overwrite=args.overwrite, limit=args.limit,
    )


def print_summary(results: dict, out: Path) -> None:
    val = results.get("validation") or {}
    print(f"method {results['method']}: {results['trainable_parameters']:,} trainable parameters "
          f"({results['trainable_percent']:.2f}% of {results['total_parameters']:,})")
    if val:
        print(f"best validation accuracy {val['accuracy']:.4f} (step {results['best_step']})")
    if "test" in results:
        test = results["test"]
        print(f"test accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f} on {test['examples']} examples")
    print(f"trained in {results['train_seconds']:.0f} s ({results['wall_seconds']:.0f} s wall); "
          f"run saved in {out}; plot: {out / PLOT}")


def run(args: argparse.Namespace) -> int:
    from ..train.distributed import init_distributed

    if args.task in SEQ2SEQ_TASKS:
        from .seq2seq import run_finetune

        return run_finetune(args, train_config_from_args(args))
    if args.instructions or args.few_shot or args.template:
        from .prompt_finetune import run_prompt_finetune

        if method_from_args(args).quantize is not None:
            from ..errors import ConfigError

            raise ConfigError("prompt-based training (--template, --few-shot, --instructions) runs on an fp32 base: "
                              "drop --quantize (and use lora instead of qlora) there")

        return run_prompt_finetune(args, method_from_args(args), train_config_from_args(args))
    if args.objective == "clm":
        return run_clm(args)
    results = finetune(spec_from_args(args))
    if init_distributed(args.device).is_main:
        print_summary(results, args.out)
    return 0


def run_clm(args: argparse.Namespace) -> int:
    """``--objective clm``: causal-LM fine-tuning on a text file."""
    from ..errors import ConfigError
    from ..train.clm import CLMSpec, finetune_clm
    from ..train.distributed import init_distributed

    if args.train is None:
        raise ConfigError("--objective clm trains on your own text: pass --train FILE.txt (not --task)")
    if args.metric == "macro_f1":
        raise ConfigError("--objective clm picks checkpoints by validation loss: drop --metric")
    args.metric = "loss"
    spec = CLMSpec(model=args.model, out=args.out, train_file=args.train, validation_file=args.validation,
                   method=method_from_args(args), max_length=args.max_length, train=train_config_from_args(args),
                   resume=args.resume, overwrite=args.overwrite)
    results = finetune_clm(spec)
    if init_distributed(args.device).is_main:
        val = results.get("validation") or {}
        print(f"method {results['method']}: {results['trainable_parameters']:,} trainable parameters "
              f"({results['trainable_percent']:.2f}% of {results['total_parameters']:,}); "
              f"{results['train_blocks']} blocks of up to {results['block_size']} tokens")
        if val:
            print(f"best validation loss {val['loss']:.4f}, perplexity {val['perplexity']:.2f} "
                  f"(step {results['best_step']})")
        print(f"trained in {results['train_seconds']:.0f} s; run saved in {args.out}")
    return 0
