"""Evaluating a model on a built-in task through prompts: what ``deltaformer evaluate MODEL --template`` runs.

MODEL is a checkpoint or asset with an LM head, a prompt-based (PET) run directory (its own patterns unless
templates are given), or an instruction-tuning run directory (its base model under its trained delta).
Demonstrations come from the task's training split; the examples scored from ``split``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import delta
from ..data.tasks import load_task
from ..errors import ConfigError
from .demonstrations import DemonstrationSelector
from .encoder import SentenceEncoder
from .evaluation import evaluate_prompts
from .lm import load_lm
from .model import PromptModel
from .pet import TASK_TYPE as PROMPT_RUN
from .pet import PromptSetup, build_prompt_model, load_prompt_run

INSTRUCTION_RUN = "instruction"


@dataclass
class TaskEvalSpec:
    model: str
    task: str
    setup: PromptSetup | None = None
    split: str = "test"
    shots: int = 0
    strategy: str = "random"
    seed: int = 0
    calibrate: bool = False
    encoder: str = "minilm"
    demo_max_tokens: int | None = None
    overflow: str = "drop"
    limit: int | None = None
    batch_size: int = 16
    device: str | None = None
    generate: bool = False
    max_new_tokens: int = 8
    pool_limit: int | None = None  # draw demonstrations from the first N training examples only
    preloaded: tuple[nn.Module, Any, str] | None = None  # (lm, tokenizer, kind) already loaded from ``model``


def run_type(path: str) -> str | None:
    """``"prompt"`` / ``"instruction"`` for those run directories, else None (a model)."""
    info = Path(path) / "run.json"
    if not info.is_file():
        return None
    try:
        data = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data.get("task_type") if isinstance(data, dict) else None  # a damaged run.json is judged by its loader


def load_for_prompting(spec: TaskEvalSpec, labels: list[str]) -> PromptModel:
    kind_of_run = run_type(spec.model)
    if kind_of_run == PROMPT_RUN and spec.setup is None:
        model, _ = load_prompt_run(spec.model)
        return model
    if spec.setup is None:
        raise ConfigError("give --template and --verbalizer (or a prompt-based run directory that has them)")
    lm, tokenizer, kind = spec.preloaded if spec.preloaded is not None else _load_base(spec.model, kind_of_run)
    return build_prompt_model(lm, tokenizer, kind, labels, spec.setup, None)


def _load_base(model: str, kind_of_run: str | None) -> tuple[nn.Module, Any, str]:
    if kind_of_run == INSTRUCTION_RUN:
        info = json.loads((Path(model) / "run.json").read_text(encoding="utf-8"))
        lm, tokenizer, kind = load_lm(info["base_model"])
        if info.get("method") == "full":
            lm, tokenizer, kind = load_lm(str(Path(model) / "model"))
        else:
            delta.load_delta(lm, Path(model) / "delta", "instructions")
        return lm, tokenizer, kind
    if kind_of_run == PROMPT_RUN:
        raise ConfigError(f"{model} is a prompt-based run: evaluate it with its own patterns (leave out --template)")
    return load_lm(model)


def evaluate_task(spec: TaskEvalSpec) -> dict[str, Any]:
    """Scores of every pattern (and the ensemble), raw and calibrated, on ``split`` of ``task``."""
    task = load_task(spec.task)
    device = torch.device(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_for_prompting(spec, task.labels).to(device).eval()
    examples = task.split(spec.split)[:spec.limit] if spec.limit else task.split(spec.split)
    for pvp in model.pvps:
        pvp.renderer.demo_max_tokens, pvp.renderer.overflow = spec.demo_max_tokens, spec.overflow
    selector = None
    if spec.shots:
        encoder = SentenceEncoder(spec.encoder, device) if spec.strategy == "nearest" else None
        pool = task.split("train")[:spec.pool_limit] if spec.pool_limit else task.split("train")
        selector = DemonstrationSelector(pool, spec.shots, spec.strategy, spec.seed, task.labels,
                                         encoder)
    from .calibration import CONTENT_FREE

    result = evaluate_prompts(model, examples, selector, CONTENT_FREE if spec.calibrate else None, spec.batch_size)
    result.update({"task": spec.task, "split": spec.split, "strategy": spec.strategy if spec.shots else None,
                   "seed": spec.seed, "templates": [p.renderer.template.source for p in model.pvps]})
    if spec.generate:
        from .generation_eval import evaluate_by_generation

        result["generation"] = evaluate_by_generation(model.pvps[0].renderer, model.lm, examples,
                                                      selector.select(examples) if selector else None,
                                                      spec.max_new_tokens, spec.batch_size)
    return result
