"""Prompt-based fine-tuning (PET, Schick & Schütze, 2021) with any delta method, through the trainer.

Every pattern-verbalizer pair gets its own delta (``pvp0``, ``pvp1``, ...; plus ``pvpN-soft`` for a template's
soft tokens) on one shared base model. :class:`~deltaformer.prompting.model.PromptModel` scores all of them in
one routed batch, so one :class:`~deltaformer.train.Trainer` run trains every PVP on the same few labelled
examples (each delta only learns from its own rows; gradient clipping, when on, is over all of them together).
The ensemble (mean of the PVPs' class probabilities) is what evaluation reports, beside each pattern; with
``distill_examples`` it labels unlabelled training texts and a sequence classifier learns from those soft
labels (:mod:`deltaformer.prompting.distill`), as PET does.

Run directory: ``run.json`` (``task_type: "prompt"``: base model, templates, verbalizers, method, labels),
``deltas/<name>/`` (each delta in the delta files' format) or ``model/`` for full fine-tuning, the
trainer's files, ``results.json``; and ``student/`` when distilled.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from torch import nn

from .. import delta
from ..data.tabular import Example
from ..data.tasks import load_task
from ..errors import ConfigError, PromptError
from ..models.base import PreTrainedModel
from ..train.finetune import model_reference
from ..train.methods import MethodSpec, delta_config
from ..train.seeding import seed_everything
from ..train.trainer import RESULTS, TrainConfig, Trainer, write_json
from .chat import ChatFormat
from .evaluation import evaluate_prompts
from .lm import load_lm
from .model import PVP, PromptModel
from .rendering import PromptRenderer
from .soft import attach_soft_tokens
from .templates import Template
from .verbalizers import Verbalizer

TASK_TYPE = "prompt"
RUN_FORMAT = 1


@dataclass
class PromptSetup:
    """What the patterns are: templates, verbalizers (one per template, or one for all), how words are scored."""

    templates: list[str]
    verbalizers: list[Any]
    max_length: int | None = None
    word_reduce: str | None = None
    class_reduce: str = "mean"
    chat: bool = False
    soft_encoder: str = "mlp"

    def verbalizer_for(self, i: int) -> Any:
        if len(self.verbalizers) not in (1, len(self.templates)):
            raise PromptError(f"{len(self.verbalizers)} verbalizers for {len(self.templates)} templates: give one "
                              "for all, or one per template")
        return self.verbalizers[0] if len(self.verbalizers) == 1 else self.verbalizers[i]


def build_prompt_model(lm: nn.Module, tokenizer, kind: str, labels: list[str], setup: PromptSetup,
                       method: MethodSpec | None = None) -> PromptModel:
    """Attach one delta per pattern (and its soft tokens) and build the routed prompt model.

    ``method`` None (or ``full``) attaches no method delta: patterns run on the model itself (zero-shot,
    or full fine-tuning of one shared model)."""
    if not setup.templates:
        raise PromptError("give at least one template")
    if method is not None and method.name == "probe":
        raise ConfigError("--method probe trains a classification head on frozen features; prompt-based training "
                          "has no head to train: use a delta method (lora, ...) or full")
    chat = ChatFormat.from_tokenizer(tokenizer) if setup.chat else None
    max_length = min(setup.max_length or 10**9, _model_max_length(lm, tokenizer))
    pvps = []
    for i, source in enumerate(setup.templates):
        template = Template.parse(source)
        verbalizer = Verbalizer.parse(setup.verbalizer_for(i), labels, setup.class_reduce)
        names: list[str] = []
        if method is not None and method.is_delta:
            delta.attach(lm, delta_config(method), f"pvp{i}")
            names.append(f"pvp{i}")
        soft_id = None
        if template.soft_tokens:
            soft_id = attach_soft_tokens(lm, template, f"pvp{i}-soft", tokenizer, setup.soft_encoder)
            names.append(f"pvp{i}-soft")
        renderer = PromptRenderer(tokenizer, template, verbalizer, kind, max_length, chat=chat, soft_token_id=soft_id)
        pvps.append(PVP.build(renderer, tuple(names) or None, setup.word_reduce, lm))
    if delta.deltas(lm):
        delta.set_active(lm, ())
        if method is None or method.is_delta:
            delta.freeze_base(lm)
        else:
            for p in lm.parameters():
                p.requires_grad_(True)
    elif method is not None and method.name == "full":
        for p in lm.parameters():
            p.requires_grad_(True)
    return PromptModel(lm, pvps)


def _model_max_length(lm: nn.Module, tokenizer) -> int:
    limit = getattr(getattr(lm, "config", None), "max_position_embeddings", None) or 512
    return int(min(limit, tokenizer.model_max_length or limit))


@dataclass
class PetSpec:
    """``deltaformer finetune MODEL --task T --few-shot N --template ... --verbalizer ...``."""

    model: str
    out: Path
    task: str
    setup: PromptSetup
    method: MethodSpec = field(default_factory=lambda: MethodSpec("lora"))
    few_shot: int = 32
    validation_size: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, max_steps=250, batch_size=4))
    test_limit: int | None = None
    distill_examples: int = 0
    distill_method: MethodSpec | None = None
    distill_train: TrainConfig | None = None
    overwrite: bool = False


def few_shot_sample(examples: list[Example], n: int, seed: int) -> list[Example]:
    """``n`` examples drawn at random (seeded) from ``examples``, the way few-shot benchmarks draw them."""
    if n < 1:
        raise ConfigError(f"--few-shot must be at least 1, got {n}")
    if n > len(examples):
        raise ConfigError(f"--few-shot {n} is more than the {len(examples)} training examples")
    return random.Random(seed).sample(examples, n)


def train_pet(spec: PetSpec) -> dict[str, Any]:
    """Train every PVP's delta on ``few_shot`` examples, save the run, score the test split (each pattern and
    the ensemble); optionally distil the ensemble into a classifier. Returns (and writes) the results."""
    out = Path(spec.out)
    if (out / "run.json").is_file() and not spec.overwrite:
        raise ConfigError(f"--out {out} already holds a run: pass --overwrite to replace it, or choose another --out")
    task = load_task(spec.task)
    seed = spec.train.seed
    train = few_shot_sample(task.split("train"), spec.few_shot, seed)
    chosen = {id(e) for e in train}
    validation = task.split("validation")[:spec.validation_size] if spec.validation_size else []
    seed_everything(seed)
    lm, tokenizer, kind = load_lm(spec.model)
    model = build_prompt_model(lm, tokenizer, kind, task.labels, spec.setup, spec.method)
    info = {"format": RUN_FORMAT, "task_type": TASK_TYPE, "base_model": model_reference(spec.model),
            "kind": kind, "method": spec.method.name, "method_options": spec.method.options,
            "setup": asdict(spec.setup), "labels": task.labels, "task": spec.task, "few_shot": spec.few_shot,
            "train_config": asdict(spec.train)}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", info)
    collate = model.collator(tokenizer)
    trainer = Trainer(model, spec.train, model.render(train, task.labels), collate, out,
                      eval_data=model.render(validation, task.labels) or None, num_labels=len(task.labels))
    results = trainer.train()
    save_prompt_weights(model, spec.method, out)
    test = task.split("test")[:spec.test_limit] if spec.test_limit else task.split("test")
    results["test"] = evaluate_prompts(model, test)
    results.update({"method": spec.method.name, "task": spec.task, "few_shot": spec.few_shot, "seed": seed,
                    "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)})
    if spec.distill_examples:
        from .distill import distill

        pool = [e for e in task.split("train") if id(e) not in chosen][:spec.distill_examples]
        results["distilled"] = distill(model, pool, task, spec, out / "student")
    write_json(out / RESULTS, results)
    return results


def save_prompt_weights(model: PromptModel, method: MethodSpec, out: Path) -> None:
    """Each attached delta under ``out/deltas/<name>``; for full training also the whole LM under ``out/model``
    (saved without the deltas, which are unloaded for the save and loaded back from their files)."""
    names = list(delta.deltas(model.lm))
    for name in names:
        delta.save_delta(model.lm, out / "deltas" / name, name)
    if method.name == "full":
        if names:
            delta.unload(model.lm)
        cast(PreTrainedModel, model.lm).save_pretrained(out / "model")  # a prompt model wraps a loaded LM
        model.pvps[0].renderer.tokenizer.save_pretrained(out / "model")
        for name in names:
            delta.load_delta(model.lm, out / "deltas" / name, name)
        if names:
            delta.set_active(model.lm, ())


def load_prompt_run(directory: str | Path, device: Any = None) -> tuple[PromptModel, dict[str, Any]]:
    """The trained prompt model of a PET run directory, and its run.json."""
    import json

    directory = Path(directory)
    try:
        info = json.loads((directory / "run.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{directory} is not a readable prompt run ({exc}): pass the --out of a PET finetune") from None
    if info.get("task_type") != TASK_TYPE:
        raise ConfigError(f"{directory} holds a {info.get('task_type')!r} run, not a prompt-based one")
    base = str(directory / "model") if info["method"] == "full" else info["base_model"]
    lm, tokenizer, kind = load_lm(base)
    setup = PromptSetup(**info["setup"])
    model = build_prompt_model(lm, tokenizer, kind, info["labels"], setup, None)
    for name in sorted(p.name for p in (directory / "deltas").glob("*")) if (directory / "deltas").is_dir() else []:
        if name.endswith("-soft"):
            delta.detach(lm, name)  # re-attached by build_prompt_model fresh: replace by the trained one
        delta.load_delta(lm, directory / "deltas" / name, name)
    if delta.deltas(lm):
        delta.set_active(lm, ())
    model.pvps = [PVP.build(p.renderer, tuple(n for n in (f"pvp{i}", f"pvp{i}-soft") if n in delta.deltas(lm)) or None,
                            setup.word_reduce, lm) for i, p in enumerate(model.pvps)]
    return (model.to(device) if device is not None else model).eval(), info
