"""Pretrain a BERT with masked LM (+ next-sentence prediction) on raw text, on the shared :class:`Trainer`.

Text -> documents of segments (:mod:`deltaformer.data.corpus`) -> ids -> next-sentence pairs
(:mod:`deltaformer.data.nsp`; for ``mlm`` alone the pairs' NSP label is simply not used) -> masked batches
(:mod:`deltaformer.data.masking`, drawn from the trainer's seeded generator) -> ``BertForPreTraining`` or
``BertForMaskedLM``. A model comes from a config file, a named size, or a checkpoint (``--from``); a checkpoint
without an MLM head (MiniLM) gets a fresh one, its decoder tied to the word embeddings. Validation is a fixed
masking of held-out pairs, so its MLM and NSP accuracies are comparable from one evaluation to the next.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..checkpoints.io import load_state_dict
from ..config import BertConfig, load_config
from ..data.corpus import load_documents, tokenize_documents
from ..data.masking import MaskingConfig, MaskingVocab
from ..data.nsp import PairStats, PretrainingCollator, make_pairs
from ..data.tabular import DataError
from ..errors import ConfigError
from ..models.base import resolve_path
from ..models.bert import BertForMaskedLM, BertForPreTraining, BertTaskModel
from .distributed import DistEnv, all_reduce_sum
from .evaluation import _loader, autocast, move
from .finetune import _check_out
from .trainer import RESULTS, TrainConfig, Trainer, write_json

OBJECTIVES = ("mlm+nsp", "mlm")
#: Named sizes for pretraining from scratch: (layers, hidden, heads); feed-forward is 4 x hidden.
SIZES = {"tiny": (2, 128, 2), "small": (4, 256, 4)}


@dataclass
class PretrainSpec:
    """Everything ``deltaformer pretrain`` takes."""

    objective: str
    text: list[str]
    out: Path
    size: str | None = None
    config_file: Path | None = None
    from_model: str | None = None
    tokenizer: str | None = None
    vocab_size: int = 8000
    max_length: int = 128
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    per_file: bool = False
    validation_share: float = 0.05
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, metric="loss"))
    resume: bool = False
    overwrite: bool = False


def pretrain(spec: PretrainSpec) -> dict[str, Any]:
    """Train and save ``out/model`` (HF directory with the tokenizer); returns results (also results.json)."""
    from ..tokenizer import AutoTokenizer, train_tokenizer

    if spec.objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {spec.objective!r}: use {' or '.join(OBJECTIVES)} (causal LM: "
                          "deltaformer finetune --objective clm)")
    if sum(x is not None for x in (spec.size, spec.config_file, spec.from_model)) != 1:
        raise ConfigError("give exactly one of --size, --config or --from")
    out = Path(spec.out)
    _check_out(out, spec.resume, spec.overwrite)
    documents = load_documents(spec.text, spec.per_file)
    tokenizer_name = spec.tokenizer or spec.from_model
    if tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    else:
        tokenizer = train_tokenizer((s for doc in documents for s in doc), "wordpiece", spec.vocab_size)
    vocab = MaskingVocab.from_tokenizer(tokenizer)
    model = build_model(spec, len(tokenizer), tokenizer.pad_token_id or 0)
    if spec.max_length > model.config.max_position_embeddings:
        raise DataError(f"--max-length {spec.max_length} is above the model's {model.config.max_position_embeddings} "
                        "positions: lower --max-length or use a config with more max_position_embeddings")
    stats = PairStats()
    pairs = make_pairs(tokenize_documents(tokenizer, documents), spec.max_length, tokenizer.cls_token_id,
                       tokenizer.sep_token_id, seed=spec.train.seed, stats=stats)
    random.Random(spec.train.seed).shuffle(pairs)
    held = max(1, round(spec.validation_share * len(pairs)))
    if len(pairs) - held < 1:
        raise DataError(f"the corpus makes only {len(pairs)} pair(s): give more text")
    collate = PretrainingCollator(vocab, tokenizer.pad_token_id or 0, spec.masking, spec.objective == "mlm+nsp")
    trainer = Trainer(model, spec.train, pairs[held:], collate, out, eval_data=pairs[:held],
                      evaluator=evaluate_pretraining)
    results = trainer.train(resume=spec.resume)
    if trainer.env.is_main:
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        results.update({"objective": spec.objective, "documents": len(documents), "pairs": stats.pairs,
                        "skipped_documents": stats.skipped_documents,
                        "positive_rate": round(stats.positive_rate, 4), "parameters": model.num_parameters(),
                        "masking": asdict(spec.masking)})
        write_json(out / RESULTS, results)
    return results


def build_model(spec: PretrainSpec, vocab_size: int, pad_token_id: int) -> BertTaskModel:
    """A fresh model of a named size or config, or a checkpoint with any missing MLM / NSP head initialised."""
    cls = BertForPreTraining if spec.objective == "mlm+nsp" else BertForMaskedLM
    if spec.from_model is not None:
        path = resolve_path(spec.from_model)
        config = load_config(path)
        if not isinstance(config, BertConfig) or type(config) is not BertConfig:
            raise ConfigError(f"{spec.from_model} is a {config.model_type!r} model: pretrain takes BERT checkpoints")
        model = cls(config)
        report = model.load_hf_state_dict(load_state_dict(path), strict=False)
        lost = [n for n in report.missing if not n.startswith(("mlm_head.", "nsp_head.", "backbone.pooler."))]
        if lost:
            raise ConfigError(f"{spec.from_model} lacks {len(lost)} encoder weight(s), e.g. {lost[0]}: is it a BERT "
                              "checkpoint?")
        return model
    if spec.config_file is not None:
        config = load_config(spec.config_file)
        if type(config) is not BertConfig:
            raise ConfigError(f"{spec.config_file} describes a {config.model_type!r} model: pretrain takes BERT configs")
        # checked a BertConfig above; replace keeps the class
        new_config = cast(BertConfig, config.replace(vocab_size=vocab_size, pad_token_id=pad_token_id))
    else:
        if spec.size not in SIZES:
            raise ConfigError(f"unknown size {spec.size!r}: use {', '.join(SIZES)}")
        layers, hidden, heads = SIZES[spec.size]
        new_config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, intermediate_size=4 * hidden,
                                max_position_embeddings=512, pad_token_id=pad_token_id)
    return cls(new_config)


@torch.no_grad()
def evaluate_pretraining(model: nn.Module, dataset, collate: PretrainingCollator, batch_size: int = 64,
                         env: DistEnv | None = None, bf16: bool = False) -> dict[str, float]:
    """Loss, MLM accuracy (over picked tokens) and NSP accuracy, under one fixed masking of ``dataset``."""
    env = env or DistEnv(device=next(model.parameters()).device)
    fixed = dataclasses.replace(collate, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=env.device)  # loss*n, n, mlm hits, mlm n, nsp hits
    for batch in _loader(dataset, fixed, batch_size, env):
        batch = move(batch, env.device)
        with autocast(env.device, bf16):
            out = model(**batch)
        picked = batch["labels"] != -100
        n = batch["labels"].shape[0]
        nsp = 0.0
        if "next_sentence_label" in batch:
            nsp = float((out.extra_logits["seq_relationship"].argmax(-1) == batch["next_sentence_label"]).sum())
        totals += torch.tensor([float(out.loss) * n, n, float((out.logits.argmax(-1)[picked] == batch["labels"][picked])
                                .sum()), float(picked.sum()), nsp], dtype=torch.float64, device=env.device)
    model.train(was_training)
    all_reduce_sum(totals, env)
    result = {"loss": totals[0].item() / max(1.0, totals[1].item()),
              "mlm_accuracy": totals[2].item() / max(1.0, totals[3].item()), "examples": int(totals[1].item())}
    if collate.nsp:
        result["nsp_accuracy"] = totals[4].item() / max(1.0, totals[1].item())
    return result
