"""Causal scoring with the prompt computed once per example: prefill, then every label word from its cache.

A causal LM's rows for one example differ only in the answer, so the prompt (demonstrations included, often
hundreds of tokens) is run once into a KV cache; the cache is copied for each label word (``KVCache.take``, a
chunk of rows at a time within a memory budget) and the words are run on top of it. The first answer token is read from the prompt's last
position, the others from the words' own. The prompts of a batch often begin alike (the chat template's system
turn; the same demonstrations, drawn once per seed, before every query): that common prefix is run once per
PVP and its cache copied to the PVP's rows, then only the rest of each prompt runs, right-padded (padding
between a prompt and its words is masked out; positions come from the mask). With W words and a shared prefix
of S tokens this costs one prompt pass instead of W, S tokens once instead of per row, and gives the scores of
the full rows (tested to 1e-5). In training the cache is a :class:`GradCache` (concatenating, so gradients
flow through it to the deltas): PET's rows of one example cost one prompt pass there too.

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


class _GrowingLayer:
    def __init__(self, owner: GradCache) -> None:
        self.owner = owner
        self.keys: Tensor | None = None
        self.values: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[2])

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.keys = k if self.keys is None else torch.cat([self.keys, k], 2)
        self.values = v if self.values is None else torch.cat([self.values, v], 2)
        return self.keys, self.values


class GradCache:
    """A KV cache that gradients flow through (training): each step's keys and values are concatenated to the
    past instead of written into a preallocated buffer in place, which autograd cannot differentiate once
    the buffer is read and written again. The interface the decoders use of :class:`KVCache`."""

    def __init__(self, n_layers: int, batch: int) -> None:
        self.layers = [_GrowingLayer(self) for _ in range(n_layers)]
        self._batch = batch
        self.position_offset: Tensor | None = None

    def layer(self, i: int) -> _GrowingLayer:
        return self.layers[i]

    @property
    def length(self) -> int:
        return min(layer.length for layer in self.layers)

    @property
    def batch(self) -> int:
        return self._batch

    def reorder(self, rows: Tensor) -> None:
        for layer in self.layers:
            if layer.keys is not None and layer.values is not None:
                layer.keys = layer.keys.index_select(0, rows.to(layer.keys.device))
                layer.values = layer.values.index_select(0, rows.to(layer.values.device))
        self._batch = int(rows.numel())

    def take(self, rows: Tensor) -> GradCache:
        """A new cache of rows ``rows`` (repeats allowed); this one is unchanged (as :meth:`KVCache.take`)."""
        taken = GradCache(len(self.layers), self._batch)
        for mine, theirs in zip(taken.layers, self.layers):
            mine.keys, mine.values = theirs.keys, theirs.values
        taken.reorder(rows)
        return taken

    @property
    def row_bytes(self) -> int:
        """Memory one batch row's stored keys and values take."""
        return sum(2 * layer.keys[0].numel() * layer.keys.element_size()
                   for layer in self.layers if layer.keys is not None)


def _cache(lm: nn.Module, batch: int, max_length: int) -> KVCache:
    if torch.is_grad_enabled():
        return cast(KVCache, GradCache(len(cast(nn.ModuleList, cast(nn.Module, lm.backbone).layers)), batch))
    return cast(Callable[[int, int], KVCache], lm.new_cache)(batch, max_length)


def common_prefix(ids: Tensor, lengths: Tensor) -> int:
    """How many leading tokens every row of the right-padded ``ids`` (N, T) shares, leaving each row at
    least its last token (whose logits read the answer)."""
    limit = int(lengths.min()) - 1
    if ids.shape[0] < 2 or limit <= 0:
        return 0
    same = (ids[:, :limit] == ids[:1, :limit]).all(0)
    return limit if bool(same.all()) else int((~same).nonzero()[0])


def _later_word_tokens(backbone: nn.Module, head: nn.Module, cache: KVCache, mask: Tensor, word_ids: Tensor,
                       word_len: Tensor, repeats: Tensor, rows_per_pvp: list[int],
                       routing: Callable[[list[int]], AbstractContextManager], budget: int) -> Tensor:
    """(rows, longest - 1) log-probabilities of every word's tokens after its first, one row per (example,
    word), each on a copy of its example's prompt cache; ``repeats[i]``: example i's words. The copies are
    made a chunk of rows at a time, at most ``budget`` bytes of them at once (10 words after a 1024-token
    prompt would otherwise hold 10 copies of that prompt's cache per example)."""
    total = int(repeats.sum())
    example_of = torch.repeat_interleave(torch.arange(repeats.numel(), device=repeats.device), repeats)
    chunk = max(1, budget // max(1, cache.row_bytes))
    steps = word_ids.shape[1] - 1
    new_mask = (torch.arange(steps, device=word_ids.device)[None, :] < (word_len - 1)[:, None]).long()
    bounds = torch.tensor([0, *rows_per_pvp]).cumsum(0).tolist()
    pieces = []
    for a in range(0, total, chunk):
        b = min(total, a + chunk)
        examples = example_of[a:b]
        part = cache.take(examples)
        full_mask = torch.cat([mask.index_select(0, examples), new_mask[a:b]], 1)
        counts = [max(0, min(b, hi) - max(a, lo)) for lo, hi in zip(bounds[:-1], bounds[1:])]
        with routing(counts):
            logp = head(backbone(word_ids[a:b, :steps], full_mask, None, part).last_hidden_state).float().log_softmax(-1)
        pieces.append(logp.gather(-1, word_ids[a:b, 1:, None]).squeeze(-1))
    return torch.cat(pieces)


#: the most memory (bytes) the copies of prompt caches that label words continue may take at once
WORD_CACHE_BUDGET = 512 * 2**20


def shared_prompt_scores(lm: nn.Module, scorers: Sequence[PromptScorer], parts: Sequence[dict[str, Tensor]],
                         routing: Callable[[list[int]], AbstractContextManager],
                         cache_budget: int = WORD_CACHE_BUDGET) -> list[Tensor]:
    """Class scores (N_p, C) of every PVP p from its full-row inputs ``parts[p]`` (input_ids, attention_mask,
    positions); ``routing(counts)`` routes ``counts[p]`` consecutive rows to PVP p's deltas; the words'
    copies of their prompts' caches take at most ``cache_budget`` bytes at once."""
    head = cast(nn.Module, lm.lm_head)  # can_share_prompts checked a causal LM with a split head
    backbone = cast(nn.Module, lm.backbone)
    firsts, lengths, counts = [], [], []
    for scorer, part in zip(scorers, parts):
        firsts.append(part["input_ids"][::scorer.rows_per_item])  # every row of an example starts with its prompt
        lengths.append(part["positions"][:, 0, 0] + 1)
        counts.append(firsts[-1].shape[0])
    width = max(int(f.shape[1]) for f in firsts)
    device = parts[0]["input_ids"].device
    prompts = torch.cat([torch.nn.functional.pad(f, (0, width - f.shape[1])) for f in firsts])
    length = torch.cat(lengths)
    shared = common_prefix(prompts, length)
    rest_width = int(length.max()) - shared
    longest = max(int(s.tokens.shape[1]) for s in scorers)
    per_pvp = torch.repeat_interleave(torch.arange(len(scorers), device=device), torch.tensor(counts, device=device))
    if shared:  # the common prefix (a system prompt, shared demonstrations) once per PVP, then copied to its rows
        cache = _cache(lm, len(scorers), shared + rest_width + longest)
        with routing([1] * len(scorers)):
            backbone(prompts[:1, :shared].expand(len(scorers), -1), None, None, cache)
        cache.reorder(per_pvp)
    else:
        cache = _cache(lm, prompts.shape[0], rest_width + longest)
    col = torch.arange(rest_width, device=device)
    ids = prompts[:, shared:shared + rest_width]
    mask = torch.cat([torch.ones(prompts.shape[0], shared, dtype=torch.long, device=device),
                      (col[None, :] < (length - shared)[:, None]).long()], 1)  # right padding, masked out
    with routing(counts):
        hidden = backbone(ids, mask, None, cache).last_hidden_state
        last = head(hidden[torch.arange(hidden.shape[0], device=device), length - shared - 1])  # (N_all, V)
    first_logp = last.float().log_softmax(-1)
    # one row per (example, word), PVP by PVP, each example's words together
    repeats = torch.cat([torch.full((n,), s.tokens.shape[0], dtype=torch.long) for s, n in zip(scorers, counts)])
    word_ids = torch.cat([torch.nn.functional.pad(s.tokens.to(device), (0, longest - s.tokens.shape[1])).repeat(n, 1)
                          for s, n in zip(scorers, counts)])
    word_len = torch.cat([s.lengths.to(device).repeat(n) for s, n in zip(scorers, counts)])
    rest = None
    if longest > 1:  # the words' later tokens, after their prompt (padding between them is masked out)
        rows_per_pvp = [n * s.tokens.shape[0] for s, n in zip(scorers, counts)]
        rest = _later_word_tokens(backbone, head, cache, mask, word_ids, word_len, repeats.to(device),
                                  rows_per_pvp, routing, cache_budget)
    out, row, start = [], 0, 0
    for scorer, n in zip(scorers, counts):
        words, word_tokens = scorer.tokens.shape
        tokens = scorer.tokens.to(device)
        logp = torch.zeros(n, words, word_tokens, device=device)
        logp[..., 0] = first_logp[start:start + n][:, tokens[:, 0]]
        if word_tokens > 1:
            assert rest is not None  # a word of several tokens makes longest > 1
            logp[..., 1:] = rest[row:row + n * words].view(n, words, longest - 1)[:, :, :word_tokens - 1]
        out.append(scorer.class_scores(logp=logp))
        start += n
        row += n * words
    return out
