"""Classification metrics from a confusion matrix, which sums across processes and batches exactly."""

from __future__ import annotations

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
