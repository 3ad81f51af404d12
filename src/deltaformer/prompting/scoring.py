"""Scoring label words from an LM's logits, batched: no Python loop over examples or words.

A word's score is built from the log-probabilities of its tokens at its positions (:class:`PromptItem`):
a causal LM sums them (the log-probability of the answer; ``mean`` normalises by length), a masked LM takes
the ``mean``, ``max`` or ``first`` of the per-mask log-probabilities (``sum`` too). A class reduces its words
(:data:`~deltaformer.prompting.verbalizers.CLASS_REDUCTIONS`). Only the rows and positions that score a word
go through the log-softmax, so a 49k-token vocabulary costs (words x tokens) rows of it, not (T x rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import PromptError
from .lm import split_head
from .rendering import PromptItem, PromptRenderer

WORD_REDUCTIONS = {"mlm": ("mean", "max", "first", "sum"), "causal": ("sum", "mean")}
DEFAULT_WORD_REDUCTION = {"mlm": "mean", "causal": "sum"}


class PromptScorer:
    """The verbalizer's words laid out as tensors for one renderer; :meth:`class_scores` does the scoring."""

    def __init__(self, renderer: PromptRenderer, word_reduce: str | None = None) -> None:
        kind = renderer.kind
        self.word_reduce = word_reduce or DEFAULT_WORD_REDUCTION[kind]
        if self.word_reduce not in WORD_REDUCTIONS[kind]:
            raise PromptError(f"word reduction {self.word_reduce!r} does not apply to a {kind} LM: use one of "
                              f"{', '.join(WORD_REDUCTIONS[kind])}")
        self.renderer = renderer
        self.kind = kind
        self.class_reduce = renderer.verbalizer.class_reduce
        self.num_classes = len(renderer.verbalizer.labels)
        self.rows_per_item = renderer.rows_per_item
        length = renderer.max_word_length
        words = renderer.word_ids
        self.tokens = torch.tensor([w + [0] * (length - len(w)) for w in words], dtype=torch.long)  # (W, L)
        self.lengths = torch.tensor([len(w) for w in words], dtype=torch.long)
        self.word_row = torch.tensor(renderer.word_row, dtype=torch.long)
        self.word_class = torch.tensor(renderer.word_class, dtype=torch.long)

    def rows_of(self, positions: Tensor) -> Tensor:
        """(N, W, L) row (of the batch's N * rows) that each position of ``positions`` (N, W, L) is read in."""
        n, words, length = positions.shape
        rows = torch.arange(n, device=positions.device)[:, None] * self.rows_per_item + self.word_row.to(positions.device)
        return rows[..., None].expand(n, words, length)

    def token_log_probs(self, picked: Tensor) -> Tensor:
        """(N, W, L) log-probability of each word token from ``picked`` (N, W, L, V), the logits at its position."""
        tokens = self.tokens.to(picked.device)[None, ..., None].expand(*picked.shape[:3], 1)
        return picked.float().log_softmax(-1).gather(-1, tokens).squeeze(-1)

    def word_scores(self, picked: Tensor | None = None, logp: Tensor | None = None) -> Tensor:
        """(N, W) word scores under the word reduction, from the logits at the words' positions or from the
        tokens' log-probabilities (N, W, L) directly."""
        if logp is None:
            assert picked is not None  # the caller gives the logits or the log-probabilities
            logp = self.token_log_probs(picked)
        valid = torch.arange(logp.shape[-1], device=logp.device)[None, :] < self.lengths.to(logp.device)[:, None]
        if self.word_reduce == "first":
            return logp[..., 0]
        if self.word_reduce == "max":
            return logp.masked_fill(~valid, float("-inf")).amax(-1)
        total = (logp * valid).sum(-1)
        return total / self.lengths.to(logp.device) if self.word_reduce == "mean" else total

    def class_scores(self, picked: Tensor | None = None, logp: Tensor | None = None) -> Tensor:
        """(N, C) class scores from the logits at the words' positions (:func:`logits_at`), or the tokens'
        log-probabilities: each class reduces its words' scores."""
        words = self.word_scores(picked, logp)
        member = self.word_class.to(words.device)[None, :] == torch.arange(self.num_classes, device=words.device)[:, None]
        spread = words[:, None, :].expand(-1, self.num_classes, -1)  # (N, C, W)
        if self.class_reduce == "mean":
            return (spread * member).sum(-1) / member.sum(-1)
        masked = spread.masked_fill(~member, float("-inf"))
        return masked.amax(-1) if self.class_reduce == "max" else masked.logsumexp(-1)


@dataclass(frozen=True)
class PromptCollator:
    """Pad :class:`PromptItem` rows (right padding) into ``input_ids`` (N * rows, T), ``attention_mask``,
    ``token_type_ids`` (masked LMs only), ``positions`` (N, W, L) and ``labels`` (N) when known."""

    pad_token_id: int
    max_word_length: int
    token_types: bool = True

    def __call__(self, items: Sequence[PromptItem]) -> dict[str, Tensor]:
        rows = [r for item in items for r in item.rows]
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        words = len(items[0].positions)
        positions = torch.zeros((len(items), words, self.max_word_length), dtype=torch.long)
        for n, item in enumerate(items):
            for w, pos in enumerate(item.positions):
                positions[n, w, :len(pos)] = torch.tensor(pos, dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": mask, "positions": positions}
        if self.token_types:
            batch["token_type_ids"] = torch.zeros_like(input_ids)
        labels = [item.label for item in items]
        if any(label != -100 for label in labels):
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch


def logits_at(lm: nn.Module, inputs: dict[str, Tensor], rows: Tensor, positions: Tensor) -> Tensor:
    """The LM's logits at (``rows``, ``positions``) only, shape ``rows.shape + (V,)``.

    The vocabulary projection is a large part of scoring (the tiny MLM's head costs ten times its encoder,
    SmolLM2's a fifth of the model), and only a few positions per row are read, so models whose body and head
    can be called apart (:func:`~deltaformer.prompting.lm.split_head`) project those positions alone; others
    return full logits, gathered here."""
    split = split_head(lm)
    if split is not None:
        body, head = split
        return head(body(inputs)[rows, positions])
    return lm(**inputs).logits[rows, positions]


def collator_for(scorer: PromptScorer, tokenizer) -> PromptCollator:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0  # padded rows are masked out
    return PromptCollator(pad, int(scorer.tokens.shape[1]), token_types=scorer.kind == "mlm")


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The keys of a prompt batch the LM itself takes."""
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
