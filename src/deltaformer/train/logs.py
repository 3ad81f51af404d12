"""The run directory's record of training: ``metrics.jsonl`` (one JSON object a line) and its plot.

A resumed run first cuts the log back to the checkpoint's step, so the log of a killed-and-resumed run reads
exactly like the log of an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..checkpoints.io import atomic_write


class MetricsLog:
    """Append-only JSON-lines log of train and evaluation records, each carrying its ``step``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line half-written when the process was killed: drop it and what follows
        return records

    def truncate(self, step: int) -> None:
        """Keep only records up to ``step`` (inclusive); used when resuming from a checkpoint at ``step``."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)


def plot_metrics(records: list[dict[str, Any]], path: Path, metric: str = "accuracy") -> Path | None:
    """Training loss and validation loss/``metric`` against the optimizer step, as a PNG (matplotlib Agg)."""
    train = [r for r in records if r.get("split") == "train" and "loss" in r]
    val = [r for r in records if r.get("split") == "validation"]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if val:
        ax_loss.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation loss")
        ax_metric.plot([r["step"] for r in val], [r.get(metric, float("nan")) for r in val], "o-", color="C2",
                       label=f"validation {metric}")
        pick = min if metric == "loss" else max
        best = pick(val, key=lambda r: r.get(metric, float("nan")))
        ax_metric.set_title(f"best {metric} {best.get(metric, float('nan')):.4f} at step {best['step']}")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_metric.set_xlabel("optimizer step")
    ax_metric.set_ylabel(metric)
    if val:
        ax_metric.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
