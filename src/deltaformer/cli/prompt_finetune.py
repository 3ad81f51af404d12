"""The prompt-based (PET) and instruction-tuning modes of ``deltaformer finetune``."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..errors import ConfigError
from ..train.methods import MethodSpec
from ..train.trainer import TrainConfig
from .prompt_args import verbalizers_from_args

#: PET's default length of training when neither --max-steps nor a larger --epochs says otherwise.
PET_STEPS = 250


def run_prompt_finetune(args: argparse.Namespace, method: MethodSpec, train: TrainConfig) -> int:
    """``method`` and ``train``: what the finetune verb parsed from the shared method and training flags."""
    if args.instructions:
        return _instructions(args, method, train)
    return _pet(args, method, train)


def _pet(args: argparse.Namespace, method: MethodSpec, train: TrainConfig) -> int:
    from ..prompting.pet import PetSpec, PromptSetup, train_pet

    if not args.task:
        raise ConfigError("prompt-based fine-tuning needs --task T (the few labelled examples are drawn from its "
                          "training split)")
    if not args.few_shot or not args.template:
        raise ConfigError("prompt-based fine-tuning needs --few-shot N, --template and --verbalizer")
    if args.max_steps is None:
        train = dataclasses.replace(train, max_steps=PET_STEPS)
    setup = PromptSetup(args.template, verbalizers_from_args(args), args.max_length, args.word_reduce,
                        args.class_reduce, args.chat)
    spec = PetSpec(args.model, args.out, args.task, setup, method, args.few_shot,
                   args.validation_size, train, args.test_limit, args.distill, overwrite=args.overwrite)
    results = train_pet(spec)
    test = results["test"]
    for i, pattern in enumerate(test.get("patterns", [])):
        print(f"pattern {i}: test accuracy {pattern['accuracy']:.4f}")
    print(f"{'ensemble' if 'patterns' in test else 'pattern 0'}: test accuracy {test['accuracy']:.4f}, "
          f"macro-F1 {test['macro_f1']:.4f} on {test['examples']} examples")
    if "distilled" in results:
        print(f"distilled classifier: test accuracy {results['distilled']['test']['accuracy']:.4f}")
    print(f"run saved in {args.out}")
    return 0


def _instructions(args: argparse.Namespace, method: MethodSpec, train: TrainConfig) -> int:
    from ..prompting.sft import InstructionSpec, train_instructions

    if args.template or args.few_shot:
        raise ConfigError("--instructions trains on instruction data: leave out --template / --few-shot (PET)")
    spec = InstructionSpec(args.model, args.out, args.instructions, method, train, max_length=args.max_length or 512,
                           per_task=args.per_task, packing=not args.no_packing, chat=True if args.chat else None,
                           skip_bad_lines=args.skip_bad_lines, overwrite=args.overwrite)
    results = train_instructions(spec)
    if results.get("skipped_lines"):
        print(f"skipped {results['skipped_lines']} bad line(s); first: {results['first_skipped']}", file=sys.stderr)
    print(f"trained on {results['examples']} examples in {results['sequences']} sequences "
          f"({results['steps']} steps); final training loss {results.get('final_loss', float('nan')):.4f}")
    print(f"run saved in {args.out}")
    return 0
