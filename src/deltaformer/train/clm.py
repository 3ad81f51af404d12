"""Fine-tune a decoder LM on raw text (``deltaformer finetune MODEL --objective clm --train FILE.txt``).

The text becomes blocks of ``max_length`` tokens (:mod:`deltaformer.data.clm`); any method trains them with
the causal-LM loss; validation reports loss and perplexity (a ``--validation`` file, or 10% of the blocks).
The run directory holds ``run.json``, the delta (``delta/``, loadable with ``--delta``) or, for ``full``, the
whole model with its tokenizer (``model/``), and the trainer's metrics, plot and checkpoints.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import delta
from ..data.clm import LMCollator, chunk_stream, read_documents, token_stream
from ..errors import ConfigError
from ..models.base import PreTrainedModel, resolve_path
from .distributed import barrier, init_distributed
from .evaluation import evaluate_lm
from .finetune import _check_out, model_reference
from .methods import DELTA_NAME, MethodSpec, apply_method
from .seeding import seed_everything
from .trainer import RESULTS, TrainConfig, Trainer, write_json

TASK_TYPE = "causal_lm"
LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass
class CLMSpec:
    """What ``finetune --objective clm`` takes."""

    model: str
    out: Path
    train_file: Path
    validation_file: Path | None = None
    method: MethodSpec = field(default_factory=lambda: MethodSpec("lora"))
    max_length: int | None = None  # block size; default min(512, the model's context)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(metric="loss"))
    resume: bool = False
    overwrite: bool = False


def causal_lm_class(base: str | Path) -> type[PreTrainedModel]:
    """The causal-LM class of the base checkpoint's model type; a clear error for encoders."""
    from ..config import load_config
    from ..models import auto  # noqa: F401  (fills the registry)

    config = load_config(resolve_path(base))
    for cls in PreTrainedModel.registry.values():
        if cls.config_class is type(config) and cls.hf_architecture.endswith(LM_SUFFIXES):
            return cls
    raise ConfigError(f"--objective clm needs a decoder LM (GPT-2, Llama); {base} is a {config.model_type!r} model")


def finetune_clm(spec: CLMSpec) -> dict[str, Any]:
    """Train, save the run, report validation loss and perplexity; returns results (also in results.json)."""
    from ..tokenizer import AutoTokenizer

    start = time.perf_counter()
    env = init_distributed(spec.train.device)
    out = Path(spec.out)
    _check_out(out, spec.resume, spec.overwrite)
    if spec.method.name == "probe":
        raise ConfigError("--method probe trains a fresh head, and a causal LM keeps its own: use lora (or another "
                          "delta) or full")
    if spec.train.metric != "loss":
        raise ConfigError(f"--objective clm picks checkpoints by validation loss, not {spec.train.metric}: drop --metric")
    seed_everything(spec.train.seed)
    model = causal_lm_class(spec.model).from_pretrained(spec.model)
    tokenizer = AutoTokenizer.from_pretrained(spec.model)
    block = spec.max_length or min(512, model.config.max_position_embeddings)
    if block > model.config.max_position_embeddings:
        raise ConfigError(f"--max-length {block} is longer than the model's {model.config.max_position_embeddings} "
                          "positions: lower it")
    train_blocks = chunk_stream(token_stream(tokenizer, read_documents(spec.train_file)), block)
    if spec.validation_file is not None:
        val_blocks = chunk_stream(token_stream(tokenizer, read_documents(spec.validation_file)), block)
    else:
        random.Random(spec.train.seed).shuffle(train_blocks)
        held = max(1, len(train_blocks) // 10) if len(train_blocks) > 1 else 0
        val_blocks, train_blocks = train_blocks[:held], train_blocks[held:]
    if not train_blocks:
        raise ConfigError(f"{spec.train_file} holds too little text for a training block: add text or pass "
                          "--validation")
    apply_method(model, spec.method)
    info = {"format": 1, "task_type": TASK_TYPE, "base_model": model_reference(spec.model),
            "method": spec.method.name, "method_options": spec.method.options, "max_length": block,
            "data": {"train": str(Path(spec.train_file).resolve()),
                     "validation": str(Path(spec.validation_file).resolve()) if spec.validation_file else None},
            "train_config": asdict(spec.train)}
    barrier(env)  # every process has looked at ``out`` before the main one writes to it
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "run.json", info)
    barrier(env)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    collate = LMCollator(pad)
    trainer = Trainer(model, spec.train, train_blocks, collate, out, eval_data=val_blocks or None,
                      evaluator=evaluate_lm)
    results = trainer.train(resume=spec.resume)
    if env.is_main and spec.method.is_delta:
        delta.save_delta(model, out / "delta", DELTA_NAME)
    elif env.is_main:
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = model.num_parameters()
    results.update({
        "method": spec.method.name, "objective": "clm", "block_size": block,
        "train_blocks": len(train_blocks), "validation_blocks": len(val_blocks),
        "train_tokens": sum(len(b.input_ids) for b in train_blocks),
        "trainable_parameters": trainable, "total_parameters": total,
        "trainable_percent": 100.0 * trainable / max(1, total),
        "wall_seconds": round(time.perf_counter() - start, 2),
    })
    if env.is_main:
        write_json(out / RESULTS, results)
    barrier(env)
    return results
