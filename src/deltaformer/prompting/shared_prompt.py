"""Causal scoring with the prompt computed once per example: prefill, then every label word from its cache.

A causal LM's rows for one example differ only in the answer, so the prompt (demonstrations included, often
hundreds of tokens) is run once, left-padded, into a KV cache; the cache is repeated for each label word
(``KVCache.reorder`` with repeats) and the words, right-padded, are run on top of it. The first answer token
is read from the prompt's last position, the others from the words' own. With W words this costs one prompt
pass instead of W, and gives the scores of the full rows (tested to 1e-5).

It applies when the LM has a cache and a separable head (:func:`~deltaformer.prompting.lm.split_head`) and
no attached delta is input-side (prompt tuning, P-tuning and prefix tuning change what a cached prompt
holds); :class:`~deltaformer.prompting.model.PromptModel` falls back to full rows otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import cast

import torch
from torch import Tensor, nn

from .. import delta
from ..nn.kv_cache import KVCache
from .lm import split_head
from .scoring import PromptScorer

INPUT_SIDE = frozenset({"prompt", "ptuning", "prefix", "ptuning2"})


def can_share_prompts(lm: nn.Module, scorers: Sequence[PromptScorer]) -> bool:
    if not all(s.kind == "causal" for s in scorers) or not hasattr(lm, "new_cache") or split_head(lm) is None:
        return False
    if not isinstance(getattr(lm, "backbone", None), nn.Module):
        return False
    return not (set(delta.deltas(lm).values()) & INPUT_SIDE)


def shared_prompt_scores(lm: nn.Module, scorers: Sequence[PromptScorer], parts: Sequence[dict[str, Tensor]],
                         routing: Callable[[list[int]], AbstractContextManager]) -> list[Tensor]:
    """Class scores (N_p, C) of every PVP p from its full-row inputs ``parts[p]`` (input_ids, attention_mask,
    positions); ``routing(counts)`` routes ``counts[p]`` consecutive rows to PVP p's deltas."""
    head = cast(nn.Module, lm.lm_head)  # can_share_prompts checked a causal LM with a split head
    backbone = cast(nn.Module, lm.backbone)
    new_cache = cast(Callable[[int, int], KVCache], lm.new_cache)
    prompts, lengths, counts = [], [], []
    for scorer, part in zip(scorers, parts):
        words = scorer.tokens.shape[0]
        first = part["input_ids"][::words]  # every word's row starts with the same prompt
        length = part["positions"][:, 0, 0] + 1
        prompts.append((first, length))
        lengths.append(length)
        counts.append(first.shape[0])
    width = int(torch.cat(lengths).max())
    device = parts[0]["input_ids"].device
    ids_rows, mask_rows = [], []
    for first, length in prompts:  # right-padded rows -> left-padded prompts
        shift = width - length
        col = torch.arange(width, device=device)[None, :] - shift[:, None]
        ids_rows.append(first.gather(1, col.clamp_min(0)).masked_fill(col < 0, 0))
        mask_rows.append((col >= 0).long())
    ids, mask = torch.cat(ids_rows), torch.cat(mask_rows)
    longest = max(int(s.tokens.shape[1]) for s in scorers)
    cache = new_cache(ids.shape[0], width + longest)
    with routing(counts):
        last = head(backbone(ids, mask, None, cache).last_hidden_state[:, -1])  # (N_all, V)
    first_logp = last.float().log_softmax(-1)
    # one row per (example, word), PVP by PVP, each example's words together
    repeats = torch.cat([torch.full((n,), s.tokens.shape[0], dtype=torch.long) for s, n in zip(scorers, counts)])
    cache.reorder(torch.repeat_interleave(torch.arange(ids.shape[0]), repeats).to(device))
    word_ids = torch.cat([torch.nn.functional.pad(s.tokens.to(device), (0, longest - s.tokens.shape[1])).repeat(n, 1)
                          for s, n in zip(scorers, counts)])
    word_len = torch.cat([s.lengths.to(device).repeat(n) for s, n in zip(scorers, counts)])
    rest = None
    if longest > 1:
        inputs = word_ids[:, :longest - 1]
        new_mask = (torch.arange(longest - 1, device=device)[None, :] < (word_len - 1)[:, None]).long()
        full_mask = torch.cat([mask.repeat_interleave(repeats.to(device), 0), new_mask], 1)
        with routing([n * s.tokens.shape[0] for s, n in zip(scorers, counts)]):
            rest = head(backbone(inputs, full_mask, None, cache).last_hidden_state).float().log_softmax(-1)
    out, row, start = [], 0, 0
    for scorer, n in zip(scorers, counts):
        words, word_tokens = scorer.tokens.shape
        tokens = scorer.tokens.to(device)
        logp = torch.zeros(n, words, word_tokens, device=device)
        logp[..., 0] = first_logp[start:start + n][:, tokens[:, 0]]
        if word_tokens > 1:
            block = rest[row:row + n * words].view(n, words, longest - 1, -1)[:, :, :word_tokens - 1]  # type: ignore[index]
            logp[..., 1:] = block.gather(-1, tokens[None, :, 1:, None].expand(n, -1, -1, 1)).squeeze(-1)
        out.append(scorer.class_scores(logp=logp))
        start += n
        row += n * words
    return out
