"""Zero- and few-shot evaluation by verbalizer ranking: score every class, predict the best, count.

Each example is rendered (after its demonstrations, if a :class:`DemonstrationSelector` is given), scored by
every PVP of the :class:`PromptModel` in one routed pass per batch, and, with ``calibrate``, also scored
calibrated (:mod:`deltaformer.prompting.calibration`): the content-free inputs are rendered with the same
demonstrations as the examples they calibrate, so each distinct demonstration set is calibrated once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..data.tabular import Example
from ..errors import PromptError
from ..train.evaluation import move
from ..train.metrics import confusion_matrix, scores
from .calibration import calibrate, content_free_bias
from .demonstrations import DemonstrationSelector
from .model import PromptModel, PvpExample


@torch.no_grad()
def score_rendered(model: PromptModel, rendered: Sequence[PvpExample], batch_size: int = 16) -> list[Tensor]:
    """Class scores (N, C) of every PVP for already rendered examples, on the model's device."""
    device = next(model.parameters()).device
    collate = model.collator(model.pvps[0].renderer.tokenizer)
    was_training = model.training
    model.eval()
    chunks: list[list[Tensor]] = []
    for start in range(0, len(rendered), batch_size):
        batch = move(collate(rendered[start:start + batch_size]), device)
        batch.pop("labels", None)
        chunks.append([s.float().cpu() for s in model.pvp_scores(**batch)])
    model.train(was_training)
    if not chunks:
        return [torch.zeros(0, model.num_labels) for _ in model.pvps]
    return [torch.cat([c[p] for c in chunks]) for p in range(len(model.pvps))]


def metrics(class_scores: Tensor, labels: Tensor, num_labels: int) -> dict[str, float]:
    return scores(confusion_matrix(class_scores.argmax(-1), labels, num_labels))


def evaluate_prompts(
    model: PromptModel,
    examples: Sequence[Example],
    selector: DemonstrationSelector | None = None,
    calibrate_with: Sequence[str] | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Accuracy and macro-F1 of every PVP (and their ensemble), raw and, with ``calibrate_with`` (content-free
    texts, e.g. :data:`CONTENT_FREE`), calibrated; plus how many demonstrations were dropped to fit."""
    labels = list(model.pvps[0].renderer.verbalizer.labels)
    unknown = [e for e in examples if e.label not in labels]
    if unknown:
        raise PromptError(f"{unknown[0].source or 'an example'} has label {unknown[0].label!r}, which the verbalizer "
                          f"does not name ({', '.join(labels)}): evaluation needs labelled examples of the task")
    if not examples:
        raise PromptError("nothing to evaluate: no examples")
    demos = selector.select(examples) if selector is not None else None
    rendered = model.render(examples, labels, demos)
    gold = torch.tensor([r.label for r in rendered])
    raw = score_rendered(model, rendered, batch_size)
    result: dict[str, Any] = {"examples": len(examples), "shots": selector.k if selector else 0,
                              "dropped_demonstrations": sum(r.items[0].dropped for r in rendered),
                              "truncated_examples": sum(r.items[0].truncated for r in rendered)}
    result.update(_summarise(raw, gold, model.num_labels))
    if calibrate_with:
        bias = content_free_biases(model, demos or [[] for _ in examples], calibrate_with, batch_size)
        calibrated = [calibrate(s, b) for s, b in zip(raw, bias)]
        result["calibrated"] = _summarise(calibrated, gold, model.num_labels)
    return result


def content_free_biases(model: PromptModel, demos: Sequence[Sequence[Example]], texts: Sequence[str],
                        batch_size: int = 16) -> list[Tensor]:
    """``log p_cf`` (N, C) per PVP: each distinct demonstration set is scored with the content-free texts once."""
    labels = list(model.pvps[0].renderer.verbalizer.labels)
    keys = [tuple(id(d) for d in ds) for ds in demos]
    distinct = list(dict.fromkeys(keys))
    first = {k: keys.index(k) for k in distinct}
    cf_examples, cf_demos = [], []
    for key in distinct:
        for text in texts:
            cf_examples.append(model.pvps[0].renderer.content_free(text))
            cf_demos.append(demos[first[key]])
    cf = score_rendered(model, model.render(cf_examples, labels, cf_demos), batch_size)
    out = []
    for s in cf:
        per_set = s.view(len(distinct), len(texts), -1)
        bias = torch.stack([content_free_bias(per_set[i]) for i in range(len(distinct))])
        out.append(bias[torch.tensor([distinct.index(k) for k in keys])])
    return out


def _summarise(per_pvp: list[Tensor], gold: Tensor, num_labels: int) -> dict[str, Any]:
    out: dict[str, Any] = metrics(per_pvp[0], gold, num_labels) if len(per_pvp) == 1 else {}
    if len(per_pvp) > 1:
        out["patterns"] = [metrics(s, gold, num_labels) for s in per_pvp]
        ensemble = torch.stack([s.log_softmax(-1) for s in per_pvp]).logsumexp(0)
        out.update(metrics(ensemble, gold, num_labels))
    return out
