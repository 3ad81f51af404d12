"""In-context evaluation by generation: the model writes an answer (greedy), a label is parsed from it.

:func:`parse_label` takes the class whose label word appears first in the answer (case-insensitive, whole
words; on a tie at one position the longer word wins); an answer naming no class counts as wrong and is
reported in ``parsed`` (the fraction of answers a label was found in). Unlike verbalizer ranking this shows
whether the model *says* the answer, which is what a user of a chat model sees.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from ..data.tabular import Example
from ..errors import PromptError
from ..train.metrics import confusion_matrix, scores
from .rendering import PromptRenderer
from .verbalizers import Verbalizer


def parse_label(text: str, verbalizer: Verbalizer) -> int | None:
    """The class whose word occurs first in ``text``; None when no word occurs."""
    best: tuple[int, int, int] | None = None  # (position, -length, class)
    lowered = text.lower()
    for c, words in enumerate(verbalizer.words):
        for word in words:
            m = re.search(rf"(?<!\w){re.escape(word.strip().lower())}(?!\w)", lowered)
            if m and (best is None or (m.start(), -len(word)) < best[:2]):
                best = (m.start(), -len(word), c)
    return None if best is None else best[2]


@torch.no_grad()
def evaluate_by_generation(renderer: PromptRenderer, lm: nn.Module, examples: Sequence[Example],
                           demonstrations: Sequence[Sequence[Example]] | None = None, max_new_tokens: int = 8,
                           batch_size: int = 16) -> dict[str, Any]:
    """Greedy answers to every prompt, left-padded in batches; accuracy and parse rate of the parsed labels."""
    try:
        from ..generation import generate
    except ImportError:
        raise PromptError("evaluation by generation needs deltaformer.generation, which this installation lacks: "
                          "leave out --generate") from None

    if renderer.kind != "causal":
        raise PromptError("evaluation by generation needs a causal LM")
    tokenizer = renderer.tokenizer
    labels = list(renderer.verbalizer.labels)
    device = next(lm.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    predictions: list[int | None] = []
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [renderer.prompt_ids(e, demonstrations[start + i] if demonstrations else ())
                   for i, e in enumerate(chunk)]
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), pad or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, length - len(p):] = torch.tensor(p)
            mask[i, length - len(p):] = 1
        out = generate(lm, ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                       do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        new = out[:, length:]  # generate returns prompt + new tokens
        for row in new.tolist():
            text = tokenizer.decode(row, skip_special_tokens=True)
            answers.append(text)
            predictions.append(parse_label(text, renderer.verbalizer))
    # evaluation examples are labelled (an unlabelled one raises ValueError here, as before)
    gold = torch.tensor([labels.index(cast(str, e.label)) for e in examples])
    parsed = [p is not None for p in predictions]
    # an unparsed answer is wrong: count it as the class after the gold one
    pred = torch.tensor([p if p is not None else (int(g) + 1) % len(labels) for p, g in zip(predictions, gold)])
    result = scores(confusion_matrix(pred, gold, len(labels)))
    return {**result, "parsed": sum(parsed) / max(1, len(parsed)), "examples": len(examples), "answers": answers[:5]}
