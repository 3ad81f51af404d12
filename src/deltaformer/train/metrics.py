"""Classification metrics from a confusion matrix, which sums across processes and batches exactly; ROUGE
for generated text."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(num_labels, num_labels) int64 counts, rows = true label, columns = prediction."""
    index = labels.long() * num_labels + preds.long()
    return torch.bincount(index, minlength=num_labels * num_labels).view(num_labels, num_labels)


def scores(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 (mean F1 over labels that occur in the data or in the predictions)."""
    confusion = confusion.double()
    total = confusion.sum().item()
    correct = confusion.diag().sum().item()
    true = confusion.sum(1)
    pred = confusion.sum(0)
    f1 = []
    for k in range(confusion.shape[0]):
        if true[k] == 0 and pred[k] == 0:
            continue
        tp = confusion[k, k].item()
        f1.append(2 * tp / (true[k].item() + pred[k].item()))
    return {"accuracy": correct / total if total else 0.0, "macro_f1": sum(f1) / len(f1) if f1 else 0.0}


# --- ROUGE (Lin, 2004) ----------------------------------------------------------------------------------

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """Lowercase words: runs of ASCII letters and digits, as Google's ``rouge-score`` (without stemming)
    splits them, so scores are comparable with published ones."""
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).split()


def f1(overlap: int, predicted: int, reference: int) -> float:
    """Harmonic mean of precision ``overlap / predicted`` and recall ``overlap / reference`` (0 when empty)."""
    if not overlap:
        return 0.0
    precision, recall = overlap / predicted, overlap / reference
    return 2 * precision * recall / (precision + recall)


def rouge_n(prediction: str, reference: str, n: int) -> float:
    """ROUGE-N F1: clipped n-gram overlap (an n-gram counts as often as it occurs in both)."""
    grams = [Counter(zip(*(tokens[i:] for i in range(n)))) for tokens in map(rouge_tokens, (prediction, reference))]
    overlap = sum((grams[0] & grams[1]).values())
    return f1(overlap, sum(grams[0].values()), sum(grams[1].values()))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of words, so order counts but gaps are allowed."""
    predicted, wanted = rouge_tokens(prediction), rouge_tokens(reference)
    return f1(lcs_length(predicted, wanted), len(predicted), len(wanted))


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 over pairs (per-pair scores averaged, as ``rouge-score`` users
    usually report), in 0..1."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references: pass one of each per example")
    pairs = list(zip(predictions, references))
    count = max(1, len(pairs))
    return {
        "rouge1": sum(rouge_n(p, r, 1) for p, r in pairs) / count,
        "rouge2": sum(rouge_n(p, r, 2) for p, r in pairs) / count,
        "rougeL": sum(rouge_l(p, r) for p, r in pairs) / count,
        "examples": len(pairs),
    }
