"""PET's last step: the ensemble labels unlabelled texts, and a sequence classifier learns the soft labels.

The targets are the ensemble's class probabilities sharpened or softened by ``temperature`` (PET uses 2);
the student (any method of :mod:`deltaformer.train.methods` on the same base model, with a fresh
classification head) minimises the cross-entropy to them at the same temperature. It trains through the
ordinary :class:`~deltaformer.train.Trainer`; its validation and test scores use the gold labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.collate import Encoded, PadCollator, encode_examples
from ..data.tabular import Example, LabelMap
from ..models.base import HeadOutput
from ..train.evaluation import evaluate
from ..train.methods import MethodSpec
from ..train.runs import classifier_class, set_labels
from ..train.trainer import TrainConfig, Trainer
from .evaluation import score_rendered
from .model import PromptModel

TEMPERATURE = 2.0


@dataclass(frozen=True)
class SoftEncoded(Encoded):
    """A tokenized example with the teacher's class probabilities."""

    soft: tuple[float, ...] = ()


@dataclass(frozen=True)
class SoftCollator:
    pad: PadCollator

    def __call__(self, items: list[SoftEncoded]) -> dict[str, Tensor]:
        batch = self.pad(list[Encoded](items))
        if all(item.soft for item in items):
            batch["soft_labels"] = torch.tensor([item.soft for item in items], dtype=torch.float)
        return batch


class SoftTargetClassifier(nn.Module):
    """A sequence classifier trained on soft labels (when the batch has them), else on the hard ones."""

    def __init__(self, classifier: nn.Module, temperature: float = TEMPERATURE) -> None:
        super().__init__()
        self.classifier, self.temperature = classifier, temperature

    def forward(self, labels: Tensor | None = None, soft_labels: Tensor | None = None, **batch: Tensor) -> HeadOutput:
        out = self.classifier(labels=None if soft_labels is not None else labels, **batch)
        if soft_labels is None:
            return out
        loss = -(soft_labels * F.log_softmax(out.logits / self.temperature, -1)).sum(-1).mean()
        return HeadOutput(loss=loss, logits=out.logits)


def build_student(base: str, labels: LabelMap, method: MethodSpec) -> nn.Module:
    """The base model under a fresh classification head and ``method``'s delta. A masked-LM checkpoint has no
    pooler, so that is fresh too: it is loaded non-strictly and every fresh weight trains with the head."""
    from ..checkpoints.io import load_state_dict
    from ..config import load_config
    from ..models.base import resolve_path
    from ..train.methods import apply_method

    path = resolve_path(base)
    config = load_config(path)
    config.extra = {k: v for k, v in config.extra.items() if k not in ("id2label", "label2id")}
    config.extra["num_labels"] = len(labels)
    model = classifier_class(base)(config)
    report = model.load_hf_state_dict(load_state_dict(path), strict=False)
    set_labels(model, labels)
    apply_method(model, method)
    fresh = set(report.missing)
    for name, p in model.named_parameters():
        if name in fresh:
            p.requires_grad_(True)
    return model


def teacher_probabilities(model: PromptModel, examples: list[Example], temperature: float = TEMPERATURE) -> Tensor:
    """The ensemble's class probabilities at ``temperature`` for unlabelled ``examples``."""
    labels = list(model.pvps[0].renderer.verbalizer.labels)
    unlabelled = [Example(e.text, e.text_pair, None, e.source) for e in examples]
    scores = score_rendered(model, model.render(unlabelled, labels))
    ensemble = torch.stack([s.log_softmax(-1) for s in scores]).logsumexp(0)
    return (ensemble / temperature).softmax(-1)


def distill(model: PromptModel, pool: list[Example], task, spec, out: Path) -> dict[str, Any]:
    """Label ``pool`` with the ensemble, train the student, score it on the task's test split."""
    from ..tokenizer import AutoTokenizer

    method = spec.distill_method or MethodSpec("lora")
    config = spec.distill_train or TrainConfig(epochs=3, batch_size=16, lr=2e-3, seed=spec.train.seed,
                                                progress=spec.train.progress, device=spec.train.device)
    probs = teacher_probabilities(model, pool)
    labels = LabelMap(task.labels)
    tokenizer = AutoTokenizer.from_pretrained(spec.model)
    hard = [Example(e.text, e.text_pair, task.labels[int(p.argmax())], e.source) for e, p in zip(pool, probs)]
    encoded = encode_examples(tokenizer, hard, task.max_length, labels)
    soft = [SoftEncoded(x.input_ids, x.token_type_ids, x.label, tuple(p.tolist())) for x, p in zip(encoded, probs)]
    student = build_student(spec.model, labels, method)
    collate = SoftCollator(PadCollator(tokenizer.pad_token_id or 0))
    wrapped = SoftTargetClassifier(student)
    results = Trainer(wrapped, config, soft, collate, out, num_labels=len(labels)).train()
    test = encode_examples(tokenizer, task.split("test")[:spec.test_limit] if spec.test_limit else task.split("test"),
                           task.max_length, labels)
    results["test"] = evaluate(student, test, PadCollator(tokenizer.pad_token_id or 0), len(labels))
    results["teacher_agreement_examples"] = len(pool)
    return results
