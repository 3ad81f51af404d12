"""An LM under one or more pattern-verbalizer pairs (PVPs), as a classifier the trainer can train.

Each PVP is a renderer + scorer and, optionally, the name of the delta it runs under. One forward takes the
rows of every PVP, concatenates them into one batch, routes each row to its PVP's delta
(:func:`deltaformer.delta.route`) and runs the LM once; each PVP then scores its own rows. The loss is the
sum of the PVPs' cross-entropies over their class scores (PET's objective, one per pattern), so one training
run trains every PVP's delta at once (each delta only gets gradients from its own rows); ``logits`` are the
ensemble's log-probabilities (the mean of the PVPs' class probabilities, PET's unweighted ensemble).
That makes it a drop-in model for :class:`deltaformer.train.Trainer` and :func:`deltaformer.train.evaluate`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import delta
from ..data.tabular import Example
from ..errors import PromptError
from ..models.base import HeadOutput
from .rendering import PromptItem, PromptRenderer
from .scoring import PromptCollator, PromptScorer, collator_for, logits_at, model_inputs
from .shared_prompt import WORD_CACHE_BUDGET, can_share_prompts, shared_prompt_scores


@dataclass
class PVP:
    """A pattern-verbalizer pair and the deltas it runs under: one name, several (composed, e.g. LoRA and the
    template's soft tokens), or none (the bare model)."""

    renderer: PromptRenderer
    scorer: PromptScorer
    delta: str | tuple[str, ...] | None = None
    offset: int = 0  # soft tokens its deltas put before the input (prompt tuning): every position moves by it

    @classmethod
    def build(cls, renderer: PromptRenderer, delta_names: str | tuple[str, ...] | None = None,
              word_reduce: str | None = None, lm: nn.Module | None = None) -> PVP:
        pvp = cls(renderer, PromptScorer(renderer, word_reduce), delta_names)
        if lm is not None:
            pvp.offset = prepended_tokens(lm, pvp.delta_names)
        return pvp

    @property
    def delta_names(self) -> tuple[str, ...]:
        return () if self.delta is None else (self.delta,) if isinstance(self.delta, str) else tuple(self.delta)


@dataclass(frozen=True)
class PvpExample:
    """One example rendered by every PVP (``items[p]`` by PVP p)."""

    items: tuple[PromptItem, ...]
    label: int = -100


@dataclass(frozen=True)
class PvpCollator:
    """Collate :class:`PvpExample` s: PVP p's tensors under ``"p.<key>"``, the labels once."""

    collators: tuple[PromptCollator, ...]

    def __call__(self, examples: Sequence[PvpExample]) -> dict[str, Tensor]:
        batch: dict[str, Tensor] = {}
        for p, collate in enumerate(self.collators):
            for key, value in collate([e.items[p] for e in examples]).items():
                if key != "labels":
                    batch[f"{p}.{key}"] = value
        labels = [e.label for e in examples]
        if any(label != -100 for label in labels):
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch


class PromptModel(nn.Module):
    """``lm`` (any model whose output has ``.logits``) scored through ``pvps``; see the module docstring."""

    def __init__(self, lm: nn.Module, pvps: Sequence[PVP]) -> None:
        super().__init__()
        if not pvps:
            raise PromptError("a prompt model needs at least one pattern-verbalizer pair")
        classes = {len(p.renderer.verbalizer.labels) for p in pvps}
        if len(classes) != 1:
            raise PromptError(f"the pattern-verbalizer pairs disagree on the number of classes ({sorted(classes)})")
        self.lm = lm
        self.pvps = list(pvps)
        self.num_labels = classes.pop()
        self.config = getattr(lm, "config", None)
        self.train(lm.training)  # a model loaded for scoring stays in eval mode (no dropout)
        #: causal LMs: each prompt runs once, every label word from its cache (shared_prompt.py; in training too)
        self.share_prompts = True
        #: the most bytes of prompt-cache copies that label words continue at once (shared prompts only)
        self.word_cache_budget = WORD_CACHE_BUDGET

    def collator(self, tokenizer) -> PvpCollator:
        return PvpCollator(tuple(collator_for(p.scorer, tokenizer) for p in self.pvps))

    def render(self, examples: Sequence[Example], labels: Sequence[str], demonstrations=None) -> list[PvpExample]:
        """Render every example by every PVP; ``demonstrations[i]``: example i's demonstrations (or none)."""
        out = []
        for i, e in enumerate(examples):
            label = labels.index(e.label) if e.label is not None and e.label in labels else -100
            demos = demonstrations[i] if demonstrations is not None else ()
            out.append(PvpExample(tuple(p.renderer.render(e, demos, label) for p in self.pvps), label))
        return out

    def pvp_scores(self, **batch: Tensor) -> list[Tensor]:
        """Class scores (N, C) of every PVP, from one forward of the LM over all PVPs' rows."""
        parts = [model_inputs({k.split(".", 1)[1]: v for k, v in batch.items() if k.startswith(f"{p}.")})
                 for p in range(len(self.pvps))]
        counts = [x["input_ids"].shape[0] for x in parts]
        scorers = [p.scorer for p in self.pvps]
        if self.share_prompts and can_share_prompts(self.lm, scorers):
            for p, part in enumerate(parts):
                part["positions"] = batch[f"{p}.positions"]
            return shared_prompt_scores(self.lm, scorers, parts, self._routing, self.word_cache_budget)
        joined = _concat(parts)
        rows, positions, start = [], [], 0
        for p, (pvp, n) in enumerate(zip(self.pvps, counts)):
            rows.append(pvp.scorer.rows_of(batch[f"{p}.positions"]) + start)
            positions.append(batch[f"{p}.positions"] + pvp.offset)
            start += n
        # the words of one length read the same masks (an MLM) and one-token words the same last position (a
        # causal LM): project and normalise each distinct (row, position) once, for every PVP together
        flat_rows = torch.cat([r.flatten() for r in rows])
        flat_positions = torch.cat([q.flatten() for q in positions])
        width = int(joined["input_ids"].shape[1]) + max(p.offset for p in self.pvps)
        where, read = torch.unique(flat_rows * width + flat_positions, return_inverse=True)
        with self._routing(counts):
            picked = logits_at(self.lm, joined, where // width, where % width)
        logp = picked.float().log_softmax(-1)  # (distinct positions, V)
        scores, start = [], 0
        for pvp, r in zip(self.pvps, rows):
            size = r.numel()
            tokens = pvp.scorer.tokens.to(logp.device).expand(r.shape[0], -1, -1)  # (N, W, L)
            scores.append(pvp.scorer.class_scores(logp=logp[read[start:start + size].view(r.shape), tokens]))
            start += size
        return scores

    def _routing(self, counts: list[int]) -> contextlib.AbstractContextManager:
        """Every PVP under the same deltas: make them active for the pass; else route each row to its PVP's."""
        groups = {p.delta_names for p in self.pvps}
        if not delta.deltas(self.lm):
            if any(groups):
                raise PromptError(f"no delta is attached, but a pattern runs under {sorted(groups)[-1]}")
            return contextlib.nullcontext()
        if len(groups) == 1:
            names = groups.pop()
            return _activated(self.lm, names) if names else delta.bare(self.lm)
        if any(len(g) > 1 for g in groups):
            raise PromptError("patterns that each compose several deltas cannot share one routed batch (routing gives "
                              "each sample one delta): use one delta per pattern, e.g. no soft tokens with LoRA")
        return delta.route(self.lm, [p.delta_names[0] if p.delta_names else None
                                     for p, n in zip(self.pvps, counts) for _ in range(n)])

    def forward(self, labels: Tensor | None = None, **batch: Tensor) -> HeadOutput:
        scores = self.pvp_scores(**batch)
        logp = torch.stack([s.log_softmax(-1) for s in scores])  # (P, N, C)
        ensemble = logp.logsumexp(0) - math.log(len(scores))
        loss = None
        if labels is not None:
            total = sum(F.cross_entropy(s, labels) for s in scores)
            assert isinstance(total, Tensor)  # one score tensor per PVP, and there is at least one
            loss = total
        return HeadOutput(loss=loss, logits=ensemble)


def prepended_tokens(lm: nn.Module, names: tuple[str, ...]) -> int:
    """How many soft tokens the deltas ``names`` prepend to each input: prompt tuning's and P-tuning's without
    placeholders (prefix tuning adds key/value slots, which move no position)."""
    from ..delta.base import find_router

    router = find_router(lm)
    total = 0
    for name in names:
        config = router.deltas[name].config if router is not None and name in router.deltas else None
        method = getattr(config, "method", "")
        if method == "prompt" or (method == "ptuning" and getattr(config, "placeholder_id", None) is None):
            total += int(config.num_virtual_tokens)  # type: ignore[union-attr]
    return total


@contextlib.contextmanager
def _activated(lm: nn.Module, names: tuple[str, ...]):
    saved = delta.active(lm)
    delta.set_active(lm, names)
    try:
        yield
    finally:
        delta.set_active(lm, saved)


def _concat(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate rows of several PVPs, right-padding to the longest (the padding is masked out)."""
    if len(parts) == 1:
        return dict(parts[0])
    length = max(x["input_ids"].shape[1] for x in parts)
    out = {}
    for key in parts[0]:
        out[key] = torch.cat([F.pad(x[key], (0, length - x[key].shape[1])) for x in parts])
    return out
