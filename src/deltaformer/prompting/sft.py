"""Instruction tuning: conversations -> token ids with the loss on the assistant's tokens only, packed,
trained with any method through the trainer.

Encoding (:func:`encode_conversation`) lays the conversation out with :meth:`ChatFormat.glue` and labels
exactly the assistant's contents plus the template text that closes its turn (``<|im_end|>`` for ChatML; for
:data:`~deltaformer.prompting.chat.PLAIN`, which has no end marker, the tokenizer's eos), found by rendering
the conversation up to that reply: no generation markers are needed in the template. Everything else (system
and user turns, role headers, the generation prompt) is -100. Packing (:func:`pack`) concatenates encoded
examples greedily, in their shuffled order, into sequences of at most ``max_length`` tokens; as in TRL's
packing, an example may attend to the earlier ones in its sequence (the loss still only covers replies).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .. import delta
from ..data.clm import LMCollator
from ..errors import ConfigError, PromptError
from ..models.base import HeadOutput
from ..train.finetune import model_reference
from ..train.methods import MethodSpec, delta_config
from ..train.seeding import seed_everything
from ..train.trainer import RESULTS, TrainConfig, Trainer, write_json
from .chat import PLAIN, ChatFormat
from .instructions import Conversation, read_instructions
from .lm import load_lm, split_head
from .mixture import build_mixture, parse_builtin
from .rendering import special_frame

TASK_TYPE = "instruction"
DELTA_NAME = "instructions"


@dataclass(frozen=True)
class LMExample:
    """Token ids and their labels (-100: no loss)."""

    input_ids: list[int]
    labels: list[int]


def encode_conversation(tokenizer, fmt: ChatFormat, conversation: Conversation, max_length: int) -> LMExample | None:
    """The conversation's ids and labels within ``max_length``: the longest system/user texts are shortened
    first (from their end), so a long input gives way before its reply does; what still does not fit is cut
    from the end. None when no reply token survives."""
    messages = list(conversation.messages)
    roles = [m["role"] for m in messages]
    glue = fmt.glue(roles, add_generation_prompt=False)
    pieces: list[tuple[str, bool, bool]] = [(glue[0], False, False)]  # text, learned, a shortenable input text
    for i, m in enumerate(messages):
        reply = m["role"] == "assistant"
        after = glue[i + 1]
        if reply and fmt.closes_turns:
            closing = fmt.glue(roles[:i + 1], add_generation_prompt=False)[-1]
            if after.startswith(closing):
                pieces += [(m["content"] + closing, True, False), (after[len(closing):], False, False)]
                continue
        pieces.append((m["content"], reply, not reply))
        if reply and not fmt.closes_turns:
            pieces.append(("\0eos", True, False))
        pieces.append((after, False, False))
    encoded: list[tuple[list[int], bool, bool]] = []
    for text, learn, input_text in pieces:
        if text == "\0eos":
            if tokenizer.eos_token_id is None:
                raise PromptError("the tokenizer has no eos token to end replies with: use a chat template")
            piece = [tokenizer.eos_token_id]
        else:
            piece = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
        encoded.append((piece, learn, input_text))
    ids: list[int] = [] if fmt.closes_turns else list(special_frame(tokenizer)[0])
    excess = len(ids) + sum(len(p) for p, _, _ in encoded) - max_length
    while excess > 0 and any(cut and p for p, _, cut in encoded):
        i = max((j for j, (p, _, cut) in enumerate(encoded) if cut), key=lambda j: len(encoded[j][0]))
        keep = max(0, len(encoded[i][0]) - excess)
        excess -= len(encoded[i][0]) - keep
        encoded[i] = (encoded[i][0][:keep], False, True)
    labels: list[int] = [-100] * len(ids)
    for piece, learn, _ in encoded:
        ids += piece
        labels += piece if learn else [-100] * len(piece)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == -100 for x in labels[1:]):  # the first token is never predicted
        return None
    return LMExample(ids, labels)


def pack(examples: Sequence[LMExample], max_length: int) -> list[LMExample]:
    """Greedy packing, in order: an example joins the current sequence while it fits."""
    packs: list[LMExample] = []
    ids: list[int] = []
    labels: list[int] = []
    for e in examples:
        if ids and len(ids) + len(e.input_ids) > max_length:
            packs.append(LMExample(ids, labels))
            ids, labels = [], []
        ids, labels = ids + e.input_ids, labels + e.labels
    if ids:
        packs.append(LMExample(ids, labels))
    return packs


class CausalLMObjective(nn.Module):
    """Next-token cross-entropy over labelled positions (labels[t] predicted from position t - 1), averaged over
    the batch's labelled tokens. Where the LM's body and head run apart (:func:`split_head`) only the labelled
    positions are projected onto the vocabulary: a reply is a few tokens of a long prompt, and a 49k-word
    projection of every position is most of a small model's memory."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None) -> HeadOutput:
        split = split_head(self.lm)
        if labels is None or split is None:
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask)
            loss = None if labels is None else _shifted_loss(out.logits, labels)
            return HeadOutput(loss=loss, logits=out.logits)
        body, head = split
        hidden = body({"input_ids": input_ids, "attention_mask": attention_mask})
        if hidden.shape[1] != labels.shape[1]:  # soft tokens were prepended: they predict nothing
            labels = F.pad(labels, (hidden.shape[1] - labels.shape[1], 0), value=-100)
        target = labels[:, 1:]
        rows, cols = (target != -100).nonzero(as_tuple=True)
        logits = head(hidden[:, :-1][rows, cols])
        return HeadOutput(loss=F.cross_entropy(logits.float(), target[rows, cols]), logits=logits)


def _shifted_loss(logits: Tensor, labels: Tensor) -> Tensor:
    if logits.shape[1] != labels.shape[1]:
        labels = F.pad(labels, (logits.shape[1] - labels.shape[1], 0), value=-100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


@dataclass
class InstructionSpec:
    """``deltaformer finetune MODEL --instructions FILE|builtin[:-TASK] --method M --out DIR``."""

    model: str
    out: Path
    instructions: str
    method: MethodSpec = field(default_factory=lambda: MethodSpec("lora"))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, batch_size=4, lr=2e-4))
    max_length: int = 512
    per_task: int = 200
    packing: bool = True
    chat: bool | None = None  # None: the tokenizer's chat template when it has one, else PLAIN
    skip_bad_lines: bool = False
    overwrite: bool = False


def chat_format(tokenizer, chat: bool | None) -> ChatFormat:
    if chat is False:
        return PLAIN
    try:
        return ChatFormat.from_tokenizer(tokenizer)
    except PromptError:
        if chat:
            raise
        return PLAIN


def load_conversations(spec: InstructionSpec) -> tuple[list[Conversation], list[str]]:
    if spec.instructions.startswith("builtin"):
        return build_mixture(parse_builtin(spec.instructions), spec.per_task, spec.train.seed), []
    data = read_instructions(spec.instructions, spec.skip_bad_lines)
    return data.conversations, data.skipped


def train_instructions(spec: InstructionSpec) -> dict[str, Any]:
    """Instruction-tune ``spec.model``; writes ``run.json``, the delta (``delta/``) or model (``model/``) and
    ``results.json`` into ``spec.out``."""
    start = time.perf_counter()
    out = Path(spec.out)
    if (out / "run.json").is_file() and not spec.overwrite:
        raise ConfigError(f"--out {out} already holds a run: pass --overwrite to replace it, or choose another --out")
    if spec.method.name == "probe":
        raise ConfigError("--method probe has no LM head to train: use a delta method (lora, ...) or full")
    conversations, skipped = load_conversations(spec)
    seed_everything(spec.train.seed)
    lm, tokenizer, kind = load_lm(spec.model)
    if kind != "causal":
        raise PromptError(f"instruction tuning trains a causal LM to write replies; {spec.model} is a masked LM")
    fmt = chat_format(tokenizer, spec.chat)
    encoded = [encode_conversation(tokenizer, fmt, c, spec.max_length) for c in conversations]
    kept = [e for e in encoded if e is not None]
    if not kept:
        raise PromptError(f"no example keeps a reply token within max_length {spec.max_length}: raise --max-length")
    random.Random(spec.train.seed).shuffle(kept)
    data = pack(kept, spec.max_length) if spec.packing else kept
    if spec.method.is_delta:
        delta.attach(lm, delta_config(spec.method), DELTA_NAME)
        delta.freeze_base(lm)
    else:
        for p in lm.parameters():
            p.requires_grad_(True)
    info = {"format": 1, "task_type": TASK_TYPE, "base_model": model_reference(spec.model), "method": spec.method.name,
            "method_options": spec.method.options, "instructions": spec.instructions, "chat_format": fmt.name,
            "max_length": spec.max_length, "packing": spec.packing, "train_config": asdict(spec.train)}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", info)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    objective = CausalLMObjective(lm)
    results = Trainer(objective, spec.train, data, LMCollator(pad), out).train()
    if spec.method.is_delta:
        delta.save_delta(lm, out / "delta", DELTA_NAME)
    else:
        lm.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
    losses = [r["loss"] for r in _train_records(out)]
    results.update({"examples": len(kept), "dropped_examples": len(encoded) - len(kept), "sequences": len(data),
                    "skipped_lines": len(skipped), "first_skipped": skipped[0] if skipped else None,
                    "final_loss": losses[-1] if losses else None, "first_loss": losses[0] if losses else None,
                    "wall_seconds": round(time.perf_counter() - start, 2)})
    write_json(out / RESULTS, results)
    return results


def _train_records(out: Path) -> list[dict[str, Any]]:
    from ..train.logs import MetricsLog
    from ..train.trainer import METRICS

    return [r for r in MetricsLog(out / METRICS).read() if r.get("split") == "train"]
