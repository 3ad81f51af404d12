"""Prompt learning, in-context learning and instruction tuning on the built-in tasks.

Causal LM (``--model``, default SmolLM2-135M-Instruct) on the test splits of rt-polarity and bbc-news, through
its chat template (demonstrations are earlier user/assistant turns); masked LM (``--mlm``, default the tiny
MLM) on rt-polarity as a cloze. Mean and sd over ``--seeds`` wherever sampling enters (which demonstrations,
which 32 training examples); one JSON line per measurement:

* ``zero_shot``: verbalizer ranking, raw and contextually calibrated (content-free N/A, '' and [MASK]);
* ``icl``: k = 4, 8, 16 demonstrations, random (one set per seed) and nearest neighbours by MiniLM (per query);
* ``few_shot_32``: 32 labelled examples: prompt-based LoRA (PET) against LoRA with a classification head;
* ``instructions``: LoRA instruction tuning on the built-in mixture without the evaluated task (both
  sentiment tasks are left out for rt-polarity, as they are one task on two text lengths), then zero-shot on
  it, against the model before that tuning;
* ``mlm``: cloze zero-shot (raw, calibrated) and PET with LoRA on rt-polarity;
* ``routing_speed``: 4 pattern-verbalizer pairs under 4 LoRA deltas scored in one routed batch against 4
  sequential passes (median ms, interleaved), with the largest score difference between the two.

Targets (from the papers): calibration raises the mean by >= 3 points or cuts the sd by >= 30%; PET beats the
head by >= 5 points with 32 examples; instruction tuning beats the untuned zero-shot on the held-out task;
routed scoring >= 1.8x faster than sequential. ``summary`` lines compare each to its target.

``--quick`` (40 test examples, 2 seeds, k = 4 from 400 training examples, 20 training steps, 20 instruction
examples per task) proves the
script works in a few minutes on a CPU; the full run (all test examples, 5 seeds, 250 PET steps, 200
instruction examples per task) is hours on 2 CPU cores and minutes on a GPU.

    python benchmarks/prompting.py [--quick] [--model smollm2-135m] [--mlm tiny-mlm] [--only zero_shot,icl,...]
        [--tasks rt-polarity] [--limit rt-polarity=20,bbc-news=8,mlm=200] [--seeds 2] [--steps 8]
        [--batch 4] [--train-length 192] [--per-task 20] [--instruction-steps 6] [--instruction-length 512]

``--limit``, ``--seeds``, ``--steps``, ``--batch`` and ``--train-length`` take one number or ``task=N,...``; every
row records its test examples, and the ``settings`` line every option. A GGUF model is read (dequantized) once
per process: every later load, such as each seed's fresh PET and head model, copies those tensors.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from timing import interleaved_medians

from deltaformer import delta, prompting
from deltaformer.data.tasks import load_task
from deltaformer.prompting.task_eval import TaskEvalSpec, evaluate_task
from deltaformer.train import TrainConfig
from deltaformer.train.methods import MethodSpec

CHAT_TEMPLATES = {
    "rt-polarity": "Movie review: {text}\nIs the sentiment of this review positive or negative? Answer with one word.",
    "bbc-news": "News article: {text}\nWhich topic is this article about: business, entertainment, politics, sports "
                "or tech? Answer with one word.",
}
CHAT_WORDS = {
    "rt-polarity": {"negative": ["negative", "Negative"], "positive": ["positive", "Positive"]},
    "bbc-news": {label: [label, label.capitalize()] for label in ("business", "entertainment", "politics", "sports",
                                                                  "tech")},
}
MLM_TEMPLATE = "{text} It was {mask}."
MLM_WORDS = {"negative": ["terrible", "bad"], "positive": ["great", "good"]}
PVP_TEMPLATES = ["{text} It was {mask}.", "Just {mask}! {text}", "{text} All in all, it was {mask}.",
                 "A {mask} movie. {text}"]
#: Tasks left out of the instruction mixture when evaluating each task.
HELD_OUT = {"rt-polarity": "builtin:-rt-polarity,-rt-reviews", "bbc-news": "builtin:-bbc-news"}


START = time.perf_counter()


def emit(record: dict[str, Any]) -> None:
    print(json.dumps({**record, "elapsed_s": round(time.perf_counter() - START, 1)}), flush=True)


def mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


def setup_for(task: str, chat: bool, max_length: int) -> prompting.PromptSetup:
    if chat:
        return prompting.PromptSetup([CHAT_TEMPLATES[task]], [CHAT_WORDS[task]], max_length, None, "logsumexp", True)
    return prompting.PromptSetup([MLM_TEMPLATE], [MLM_WORDS], max_length)


LOADED: dict[str, Any] = {}
GGUF_READS: list[str] = []


def read_gguf_once() -> None:
    """Dequantize each GGUF file once per process: every later load (PET and head runs build fresh models, with
    fresh deltas, for each seed) copies the same fp32 tensors from memory instead of decoding the file again."""
    from deltaformer.checkpoints import gguf

    original = gguf.GGUFCheckpoint.hf_tensors
    memo: dict[Path, list[tuple[str, torch.Tensor]]] = {}

    def hf_tensors(self):
        if self.path not in memo:
            GGUF_READS.append(str(self.path))
            memo[self.path] = list(original(self))
        return iter(memo[self.path])

    gguf.GGUFCheckpoint.hf_tensors = hf_tensors  # type: ignore[method-assign]


def preloaded(model: str) -> Any:
    """The LM of ``model``, loaded once for every evaluation that attaches no delta (a run directory: None)."""
    if (Path(model) / "run.json").is_file():
        return None
    if model not in LOADED:
        LOADED[model] = prompting.lm.load_lm(model)
    return LOADED[model]


ZERO_SHOT: dict[tuple[str, str, bool], dict[str, Any]] = {}


def zero_shot(model: str, task: str, chat: bool, args) -> dict[str, Any]:
    """Raw and calibrated zero-shot accuracy (once per model and task: the instruction rows reuse it)."""
    if (model, task, chat) not in ZERO_SHOT or (Path(model) / "run.json").is_file():
        ZERO_SHOT[model, task, chat] = _zero_shot(model, task, chat, args)
    return ZERO_SHOT[model, task, chat]


def _zero_shot(model: str, task: str, chat: bool, args) -> dict[str, Any]:
    r = evaluate_task(TaskEvalSpec(model, task, setup_for(task, chat, args.max_length), calibrate=True,
                                   limit=args.limit[task if chat else "mlm"], batch_size=args.batch[task if chat else "mlm"], demo_max_tokens=args.demo_tokens,
                                   preloaded=preloaded(model)))
    return {"accuracy": r["accuracy"], "calibrated": r["calibrated"]["accuracy"], "examples": r["examples"]}


def icl(model: str, task: str, k: int, strategy: str, args) -> dict[str, Any]:
    seeds = range(args.seeds[task]) if strategy == "random" else range(1)  # nearest neighbours do not depend on a seed
    raw, cal, dropped, examples = [], [], 0, 0
    for seed in seeds:
        r = evaluate_task(TaskEvalSpec(model, task, setup_for(task, True, args.max_length), shots=k, strategy=strategy,
                                       seed=seed, calibrate=True, limit=args.limit[task], batch_size=args.batch[task],
                                       demo_max_tokens=args.demo_tokens, pool_limit=args.pool,
                                       preloaded=preloaded(model)))
        raw.append(r["accuracy"])
        cal.append(r["calibrated"]["accuracy"])
        dropped += r["dropped_demonstrations"]
        examples = r["examples"]
    return {"raw": mean_sd(raw), "calibrated": mean_sd(cal), "dropped_demonstrations": dropped, "examples": examples,
            "seeds": len(seeds)}


def pet(model: str, task: str, seed: int, chat: bool, args, out: Path) -> float:
    key = task if chat else "mlm"
    setup = setup_for(task, chat, args.train_length[key])
    spec = prompting.PetSpec(model, out, task, setup, MethodSpec("lora"), few_shot=32,
                             train=TrainConfig(epochs=1, max_steps=args.steps[key], batch_size=args.train_batch, lr=args.lr,
                                               seed=seed, warmup_ratio=0.06, progress=False),
                             test_limit=args.limit[task if chat else "mlm"], overwrite=True)
    return prompting.train_pet(spec)["test"]["accuracy"]


def head(model: str, task: str, seed: int, args, out: Path) -> float:
    """LoRA with a classification head on the same 32 examples (3 of them held out for validation, as the
    head needs one to pick its best step; PET trains on all 32)."""
    from deltaformer.train.finetune import FinetuneSpec, finetune

    data = load_task(task)
    train = prompting.pet.few_shot_sample(data.split("train"), 32, seed)
    test = data.split("test")[:args.limit[task]] if args.limit[task] else data.split("test")
    files = {}
    for name, rows in (("train", train), ("test", test)):
        files[name] = out / f"{name}.jsonl"
        files[name].parent.mkdir(parents=True, exist_ok=True)
        files[name].write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in rows))
    spec = FinetuneSpec(model=model, out=out / "run", method=MethodSpec("lora"), train_file=files["train"],
                        test_file=files["test"], max_length=args.train_length[task],
                        train=TrainConfig(epochs=1, max_steps=args.steps[task], batch_size=args.train_batch, lr=args.lr, seed=seed,
                                          progress=False, eval_every=max(1, args.steps[task] // 5)), overwrite=True)
    return finetune(spec)["test"]["accuracy"]


def instructions(model: str, task: str, args, out: Path) -> dict[str, Any]:
    from deltaformer.prompting.sft import InstructionSpec, train_instructions

    spec = InstructionSpec(model, out, HELD_OUT[task], MethodSpec("lora"),
                           TrainConfig(epochs=1, batch_size=4, lr=args.instruction_lr, progress=False,
                                       max_steps=args.instruction_steps),
                           max_length=args.instruction_length, per_task=args.per_task, overwrite=True)
    trained = train_instructions(spec)
    before = zero_shot(model, task, True, args)
    after = zero_shot(str(out), task, True, args)
    return {"mixture": HELD_OUT[task], "before": before, "after": after, "steps": trained["steps"],
            "first_loss": trained["first_loss"], "final_loss": trained["final_loss"], "lr": args.instruction_lr,
            "per_task": args.per_task, "sequence_length": args.instruction_length}


def routing_speed(model_name: str, args) -> dict[str, Any]:
    lm, tokenizer, kind = prompting.lm.load_lm(model_name)
    templates = PVP_TEMPLATES if kind == "mlm" else [CHAT_TEMPLATES["rt-polarity"]] * 4
    words = MLM_WORDS if kind == "mlm" else CHAT_WORDS["rt-polarity"]
    setup = prompting.PromptSetup(templates, [words], args.max_length, chat=kind == "causal")
    model = prompting.build_prompt_model(lm, tokenizer, kind, load_task("rt-polarity").labels, setup,
                                         MethodSpec("lora", {"rank": 8}))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in delta.delta_parameters(lm):
            p.normal_(0, 0.02)
    model.eval()
    data = load_task("rt-polarity").split("test")[:args.speed_batch]
    rendered = model.render(data, model.pvps[0].renderer.verbalizer.labels)
    batch = model.collator(tokenizer)(rendered)
    batch.pop("labels")
    singles = [prompting.PromptModel(lm, [p]) for p in model.pvps]
    single_batches = [m.collator(tokenizer)(m.render(data, list(words))) for m in singles]
    for b in single_batches:
        b.pop("labels")

    def routed():
        with torch.inference_mode():
            return model.pvp_scores(**batch)

    def sequential():
        with torch.inference_mode():
            return [m.pvp_scores(**b)[0] for m, b in zip(singles, single_batches)]

    diff = max(float((a - b).abs().max()) for a, b in zip(routed(), sequential()))
    ms = interleaved_medians({"routed": routed, "sequential": sequential}, args.repeats)
    return {"model": model_name, "examples": len(data), "routed_ms": ms["routed"], "sequential_ms": ms["sequential"],
            "speedup": ms["sequential"] / ms["routed"], "max_abs_diff": diff}


def limits(text: str | None, default: int | None) -> dict[str, int | None]:
    """``--limit`` (and ``--batch``): one number for every task, or ``task=N,...`` (``mlm=N`` for the masked
    LM's rows)."""
    out: dict[str, int | None] = {t: default for t in (*TASKS, "mlm")}
    for part in (text.split(",") if text else []):
        name, _, value = part.rpartition("=")
        for key in ([name] if name else out):
            if key not in out:
                raise SystemExit(f"--limit names {key!r}: use one of {', '.join(out)}")
            out[key] = int(value) or None
    return out


TASKS = ("rt-polarity", "bbc-news")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="causal LM with a chat template")
    p.add_argument("--mlm", default="tiny-mlm", help="masked LM for the cloze rows")
    p.add_argument("--quick", action="store_true", help="tiny settings that prove the script works")
    p.add_argument("--only", default=None, help="comma-separated sections to run")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks of the causal rows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", default=None, help="test examples scored: N, or task=N,... (0: all)")
    p.add_argument("--seeds", default=None, help="seeds wherever sampling enters: N, or task=N,...")
    p.add_argument("--shots", default=None, help="comma-separated k of the ICL rows")
    p.add_argument("--steps", default=None, help="training steps of the 32-example runs: N, or task=N,...")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-length", default="1024", help="token limit of the 32-example runs' inputs: N, or task=N,...")
    p.add_argument("--batch", default=None, help="scoring batch: N, or task=N,... (a batch's common prefix runs once)")
    p.add_argument("--pool", type=int, default=None, help="demonstrations from the first N training examples")
    p.add_argument("--per-task", type=int, default=None, help="instruction examples per task of the mixture")
    p.add_argument("--instruction-steps", type=int, default=None)
    p.add_argument("--instruction-lr", type=float, default=2e-4)
    p.add_argument("--instruction-length", type=int, default=384, help="token limit of packed instruction sequences")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    read_gguf_once()
    quick = args.quick
    args.limit = limits(args.limit, 40 if quick else None)
    args.pool = args.pool or (400 if quick else None)
    args.seeds = limits(args.seeds, 2 if quick else 5)
    args.shots = [int(k) for k in args.shots.split(",")] if args.shots else [4] if quick else [4, 8, 16]
    args.steps = limits(args.steps, 20 if quick else 250)
    args.train_length = limits(args.train_length, 1024)
    args.lr = 1e-3
    args.per_task = args.per_task or (20 if quick else 200)
    args.instruction_steps = args.instruction_steps or (10 if quick else None)
    args.max_length = 1024
    args.demo_tokens = 96
    args.batch = limits(args.batch, 8)
    args.repeats = 3 if quick else 10
    args.speed_batch = 4
    only = set(args.only.split(",")) if args.only else None

    def want(section: str) -> bool:
        return only is None or section in only

    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="prompting-bench-"))
    emit({"settings": {k: v for k, v in vars(args).items() if k != "only"}, "sections": sorted(only) if only else "all",
          "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": args.threads})
    if want("mlm"):
        zs = zero_shot(args.mlm, "rt-polarity", False, args)
        pets = []
        for s in range(args.seeds["mlm"]):
            pets.append(pet(args.mlm, "rt-polarity", s, False, args, tmp / f"mlm-pet{s}"))
            emit({"section": "run", "row": "mlm_pet", "seed": s, "accuracy": pets[-1]})
        emit({"section": "mlm", "model": args.mlm, "task": "rt-polarity", "zero_shot": zs,
              "pet_lora_32": {**mean_sd(pets), "examples": args.limit["mlm"] or len(load_task("rt-polarity").split("test")),
                              "steps": args.steps["mlm"]}})
    if want("routing_speed"):
        for name in (args.mlm, args.model):
            try:
                emit({"section": "routing_speed", **routing_speed(name, args)})
            except Exception as exc:  # the causal model may be missing on this checkout: say so, go on
                emit({"section": "routing_speed", "model": name, "error": f"{type(exc).__name__}: {exc}"})
    for task in args.tasks.split(","):
        n_test = args.limit[task] or len(load_task(task).split("test"))
        if want("zero_shot"):
            r = zero_shot(args.model, task, True, args)
            emit({"section": "zero_shot", "model": args.model, "task": task, **r,
                  "calibration_gain": r["calibrated"] - r["accuracy"]})
        if want("icl"):
            for strategy in ("random", "nearest"):
                for k in args.shots:
                    r = icl(args.model, task, k, strategy, args)
                    gain = r["calibrated"]["mean"] - r["raw"]["mean"]
                    sd_cut = 1 - r["calibrated"]["sd"] / r["raw"]["sd"] if r["raw"]["sd"] else None
                    emit({"section": "icl", "model": args.model, "task": task, "k": k, "strategy": strategy, **r,
                          "calibration_gain": gain, "sd_cut": sd_cut,
                          "target_met": gain >= 0.03 or (sd_cut is not None and sd_cut >= 0.3)})
        if want("few_shot_32"):
            pets, heads = [], []
            for s in range(args.seeds[task]):
                pets.append(pet(args.model, task, s, True, args, tmp / f"pet-{task}-{s}"))
                heads.append(head(args.model, task, s, args, tmp / f"head-{task}-{s}"))
                emit({"section": "run", "row": "few_shot_32", "task": task, "seed": s, "pet": pets[-1],
                      "head": heads[-1]})
            gain = statistics.fmean(pets) - statistics.fmean(heads)
            emit({"section": "few_shot_32", "model": args.model, "task": task, "pet_lora": mean_sd(pets),
                  "head_lora": mean_sd(heads), "gain": gain, "target_met": gain >= 0.05, "examples": n_test,
                  "steps": args.steps[task], "train_batch": args.train_batch, "train_length": args.train_length[task]})
        if want("instructions"):
            r = instructions(args.model, task, args, tmp / f"sft-{task}")
            gain = r["after"]["accuracy"] - r["before"]["accuracy"]
            emit({"section": "instructions", "model": args.model, "task": task, **r, "gain": gain,
                  "target_met": gain > 0})
    emit({"section": "done", "wall_seconds": round(time.perf_counter() - start, 1), "gguf_reads": GGUF_READS})
    print(f"scratch runs in {tmp}", file=sys.stderr)


if __name__ == "__main__":
    main()
