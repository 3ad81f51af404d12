"""Rendering a template + verbalizer for one example (and its demonstrations) into token rows.

The result, a :class:`PromptItem`, holds the rows the model reads and, for every label word, the positions
whose logits score it. A masked LM gets one row per distinct label-word length (a word of L tokens is read
at L consecutive masks; :attr:`PromptRenderer.word_row` says which row); a causal LM gets one row per word
less its last token (the prompt followed by it), with each answer token read from the logits one position
before it, so words that differ only in their last token (all one-token words) share a row.

Layout. Without a chat format: the tokenizer's own special tokens frame the whole input (``[CLS] ... [SEP]``
for BERT, a bos for Llama; a causal LM keeps only what comes before the text), demonstrations come first,
joined by ``separator``, each rendered with its gold label's first word in place of ``{mask}``. With a chat
format every demonstration is a user turn answered by an assistant turn holding the word, and the query is the
last user turn, followed by the generation prompt; the answer is the assistant's reply. For a causal LM the
whitespace that ends the prompt moves into the answer (``"Sentiment:" + " great"``), as BPE vocabularies
spell a word with its leading space.

Length. The query's texts are cut (the longer first) only if the query alone does not fit ``max_length``;
demonstration texts are cut to ``demo_max_tokens``; then, if the whole still does not fit, demonstrations are
dropped from the front (``overflow="drop"``, counted in :attr:`PromptItem.dropped`) or the example is refused
(``overflow="error"``). Soft tokens appear in the query only: each has one trained vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..data.tabular import Example
from ..errors import PromptError
from .chat import ChatFormat
from .templates import Piece, Template
from .verbalizers import Verbalizer

OVERFLOW = ("drop", "error")


@dataclass(frozen=True)
class PromptItem:
    """One example rendered: ``rows`` of token ids; ``positions[w]`` the logit positions (in row
    ``word_row[w]``) that score word ``w``; ``label`` the class id (-100 unknown)."""

    rows: list[list[int]]
    positions: list[list[int]]
    label: int = -100
    dropped: int = 0
    truncated: bool = False


@dataclass
class _Block:
    """Token segments of one demonstration or of the query: (kind, ids), kind in fixed/text/text_b/mask."""

    segments: list[tuple[str, list[int]]] = field(default_factory=list)

    def length(self, mask_length: int = 0) -> int:
        return sum(mask_length if k == "mask" else len(ids) for k, ids in self.segments)


class PromptRenderer:
    """Tokenizes ``template`` for ``kind`` ("mlm" or "causal") with ``tokenizer``; see the module docstring."""

    def __init__(self, tokenizer, template: Template, verbalizer: Verbalizer, kind: str, max_length: int,
                 chat: ChatFormat | None = None, separator: str = "\n\n", soft_token_id: int | None = None,
                 demo_max_tokens: int | None = None, overflow: str = "drop", system: str | None = None) -> None:
        template.check_for(kind)
        if overflow not in OVERFLOW:
            raise PromptError(f"overflow={overflow!r}: use 'drop' (drop demonstrations that do not fit) or 'error'")
        if kind == "mlm" and chat is not None:
            raise PromptError("chat formats are for causal LMs: leave out the chat template for a masked LM")
        if template.soft_tokens and soft_token_id is None:
            raise PromptError(f"template {template.source!r} has soft tokens: attach them first "
                              "(prompting.soft.attach_soft_tokens) and pass its placeholder id")
        self.tokenizer, self.template, self.verbalizer, self.kind = tokenizer, template, verbalizer, kind
        self.max_length, self.chat, self.separator, self.system = max_length, chat, separator, system
        self.soft_token_id, self.demo_max_tokens, self.overflow = soft_token_id, demo_max_tokens, overflow
        self.pieces = template.prompt_pieces(kind)
        self.mask_id = tokenizer.mask_token_id if kind == "mlm" else None
        if kind == "mlm" and self.mask_id is None:
            raise PromptError("this tokenizer has no mask token: a masked-LM prompt needs one (is it a causal LM?)")
        self.answer_prefix = "" if chat is not None or kind == "mlm" else _trailing_space(self.pieces)
        last = self.pieces[-1] if self.pieces else None
        if self.answer_prefix and last is not None and last.kind == "literal" and last.value.endswith(self.answer_prefix):
            kept = last.value[:len(last.value) - len(self.answer_prefix)]
            self.pieces = (*self.pieces[:-1], *([Piece("literal", kept)] if kept else []))
        self.frame = ([], []) if chat is not None else special_frame(tokenizer)
        if kind == "causal":
            self.frame = (self.frame[0], [])  # nothing may come between the prompt and its answer
        self.word_ids = [self._word_ids(c, w) for c, w in verbalizer.flat()]
        self.word_class = [c for c, _ in verbalizer.flat()]
        owner: dict[tuple[int, ...], tuple[int, str]] = {}
        for (cls, word), ids in zip(verbalizer.flat(), self.word_ids):
            first = owner.setdefault(tuple(ids), (cls, word))
            if first[0] != cls:
                raise PromptError(f"label words {first[1]!r} of class {verbalizer.labels[first[0]]!r} and {word!r} of "
                                  f"class {verbalizer.labels[cls]!r} are the same tokens: a word cannot tell its "
                                  "classes apart; give each class its own words")
        self.answer_rows: list[tuple[int, ...]] = []  # causal: what follows the prompt in each row
        if kind == "mlm":
            self.lengths = sorted({len(ids) for ids in self.word_ids})
            self.word_row = [self.lengths.index(len(ids)) for ids in self.word_ids]
            self.rows_per_item = len(self.lengths)
        else:  # words that differ only in their last token share a row: one-token words all read the prompt's
            self.lengths = []
            self.answer_rows = list(dict.fromkeys(tuple(ids[:-1]) for ids in self.word_ids))
            self.word_row = [self.answer_rows.index(tuple(ids[:-1])) for ids in self.word_ids]
            self.rows_per_item = len(self.answer_rows)
        self.max_word_length = max(len(ids) for ids in self.word_ids)
        self._sep = self._encode(separator) if chat is None else []

    # ---- public ----------------------------------------------------------------------------------------

    def render(self, example: Example, demonstrations: Sequence[Example] = (), label: int = -100) -> PromptItem:
        """The rows and scoring positions of ``example`` after ``demonstrations`` (in order)."""
        query = self._query_block(example)
        budget = self.max_length - len(self.frame[0]) - len(self.frame[1]) - self._answer_room()
        overhead = self._total([], query) - _text_length(query)  # template, masks, glue: everything but texts
        if overhead > budget:
            raise PromptError(f"the template alone needs {overhead + self.max_length - budget} tokens but "
                              f"max_length is {self.max_length}: shorten the template or raise max_length")
        truncated = _cut_texts(query, budget - overhead)
        demos = [self._demo_block(d) for d in demonstrations]
        dropped = 0
        while demos and self._total(demos, query) > budget:
            if self.overflow == "error":
                raise PromptError(
                    f"{example.source or 'an example'}: {len(demonstrations)} demonstration(s) and the query need "
                    f"{self._total(demos, query) + self.max_length - budget} tokens but the context holds "
                    f"{self.max_length}: use fewer shots, a smaller demo_max_tokens, or overflow='drop'")
            demos.pop(0)
            dropped += 1
        return self._assemble(demos, query, label, dropped, truncated)

    def content_free(self, text: str) -> Example:
        """The content-free input ``text`` in every text slot (contextual calibration)."""
        return Example(text=text, text_pair=text if self.template.uses_text_b else None, source="content-free")

    # ---- blocks ----------------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        if not text:
            return []
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.soft_token_id is not None and self.soft_token_id in ids:
            raise PromptError(f"the text {text[:40]!r} holds the soft-token placeholder (id {self.soft_token_id}): "
                              "choose another placeholder token")
        return ids

    def _word_ids(self, cls: int, word: str) -> list[int]:
        ids = self._encode(self.answer_prefix + word)
        if not ids:
            raise PromptError(f"label word {word!r} of class {self.verbalizer.labels[cls]!r} tokenizes to nothing "
                              "with this tokenizer: choose another word")
        return ids

    def _pieces_block(self, example: Example, with_soft: bool) -> _Block:
        block = _Block()
        for p in self.pieces:
            if p.kind == "literal":
                block.segments.append(("fixed", self._encode(p.value)))
            elif p.kind == "text":
                block.segments.append(("text", self._encode(example.text)))
            elif p.kind == "text_b":
                if example.text_pair is None:
                    raise PromptError(f"{example.source or 'an example'} has no second text but the template uses "
                                      "{text_b}: give the pair field or drop {text_b} from the template")
                block.segments.append(("text_b", self._encode(example.text_pair)))
            elif p.kind == "mask":
                block.segments.append(("mask", []))
            elif p.kind == "soft" and with_soft:
                block.segments.append(("fixed", [self.soft_token_id] * p.count))  # type: ignore[list-item]
        return block

    def _query_block(self, example: Example) -> _Block:
        return self._pieces_block(example, with_soft=True)

    def _demo_block(self, demo: Example) -> _Block:
        if demo.label is None or demo.label not in self.verbalizer.labels:
            raise PromptError(f"demonstration {demo.source or demo.text[:40]!r} has label {demo.label!r}, not one of "
                              f"the verbalizer's classes ({', '.join(self.verbalizer.labels)})")
        block = self._pieces_block(demo, with_soft=False)
        if self.demo_max_tokens is not None:
            _cut_texts(block, self.demo_max_tokens)
        cls = self.verbalizer.labels.index(demo.label)
        word = self.verbalizer.words[cls][0]
        answer = self.word_ids[self.word_class.index(cls)]
        if self.chat is not None:
            block.segments = [s for s in block.segments if s[0] != "mask"]
            block.segments.append(("answer", self._encode(word)))  # the assistant's turn
        elif self.kind == "mlm":
            block.segments = [("fixed", answer) if k == "mask" else (k, ids) for k, ids in block.segments]
        else:
            block.segments.append(("fixed", answer))
        return block

    # ---- length ----------------------------------------------------------------------------------------

    def _mask_room(self) -> int:
        return max(self.lengths) if self.kind == "mlm" else 0

    def _answer_room(self) -> int:
        return self.max_word_length if self.kind == "causal" else 0

    def _glue(self, n_demos: int) -> list[list[int]]:
        roles = (["system"] if self.system else []) + ["user", "assistant"] * n_demos + ["user"]
        assert self.chat is not None
        return [self._encode(g) for g in self.chat.glue(roles, add_generation_prompt=True)]

    def _total(self, demos: list[_Block], query: _Block) -> int:
        n = sum(d.length() for d in demos) + query.length(self._mask_room())
        if self.chat is not None:
            return n + sum(len(g) for g in self._glue(len(demos))) + len(self._system_ids())
        return n + len(self._sep) * len(demos)

    def _system_ids(self) -> list[int]:
        return self._encode(self.system) if self.system else []

    # ---- assembly --------------------------------------------------------------------------------------

    def _assemble(self, demos: list[_Block], query: _Block, label: int, dropped: int, truncated: bool) -> PromptItem:
        prefix: list[int] = list(self.frame[0])
        if self.chat is not None:
            glue = self._glue(len(demos))
            contents: list[list[int]] = [self._system_ids()] if self.system else []
            for d in demos:
                contents.append([t for k, ids in d.segments if k != "answer" for t in ids])
                contents.append([t for k, ids in d.segments if k == "answer" for t in ids])
            for g, c in zip(glue, contents):
                prefix += g + c
            prefix += glue[len(contents)]
            head, tail, query_segments = prefix, glue[-1], query.segments
        else:
            for d in demos:
                prefix += [t for _, ids in d.segments for t in ids] + self._sep
            head, tail, query_segments = prefix, list(self.frame[1]), query.segments
        if self.kind == "mlm":
            rows, starts = [], []
            for n in self.lengths:
                ids, start = list(head), -1
                for k, seg in query_segments:
                    if k == "mask":
                        start = len(ids)
                        ids += [self.mask_id] * n  # type: ignore[list-item]
                    else:
                        ids += seg
                rows.append(ids + tail)
                starts.append(start)
            positions = [list(range(starts[r], starts[r] + len(w))) for r, w in zip(self.word_row, self.word_ids)]
            return PromptItem(rows, positions, label, dropped, truncated)
        prompt = list(head) + [t for _, seg in query_segments for t in seg] + tail
        rows = [prompt + list(r) for r in self.answer_rows]
        positions = [list(range(len(prompt) - 1, len(prompt) - 1 + len(w))) for w in self.word_ids]
        return PromptItem(rows, positions, label, dropped, truncated)

    def prompt_ids(self, example: Example, demonstrations: Sequence[Example] = ()) -> list[int]:
        """The causal prompt alone (what generation continues)."""
        if self.kind != "causal":
            raise PromptError("generation needs a causal LM: a masked LM fills its mask instead")
        item = self.render(example, demonstrations)
        return item.rows[0][:item.positions[0][0] + 1]


def _trailing_space(pieces: Sequence[Piece]) -> str:
    """The whitespace ending the prompt, which moves into the answer; a single space when there is none
    (the answer is a new word either way)."""
    if not pieces or pieces[-1].kind != "literal":
        return " "
    value = pieces[-1].value
    return value[len(value.rstrip()):] or " "


def _text_length(block: _Block) -> int:
    return sum(len(ids) for k, ids in block.segments if k in ("text", "text_b"))


def _cut_texts(block: _Block, room: int) -> bool:
    """Cut the block's texts from their ends, the longer first, to ``room`` tokens in all; True if cut."""
    texts = [i for i, (k, _) in enumerate(block.segments) if k in ("text", "text_b")]
    lengths = {i: len(block.segments[i][1]) for i in texts}
    if sum(lengths.values()) <= room:
        return False
    while sum(lengths.values()) > room:
        longest = max(texts, key=lambda i: (lengths[i], -i))
        lengths[longest] -= 1
    for i in texts:
        kind, ids = block.segments[i]
        block.segments[i] = (kind, ids[:lengths[i]])
    return True


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (``[CLS]``/``[SEP]``, a bos)."""
    bare = list(tokenizer("prompt", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("prompt", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    return [], []
