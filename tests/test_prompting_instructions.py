"""Instruction data: JSONL files (broken lines named or skipped), the built-in mixture, the loss mask on the
assistant's tokens (templates without generation markers too) and packing."""

from __future__ import annotations

import json

import pytest

from deltaformer.errors import PromptError
from deltaformer.prompting.chat import ChatFormat
from deltaformer.prompting.instructions import Conversation, read_instructions
from deltaformer.prompting.mixture import PHRASINGS, parse_builtin
from deltaformer.prompting.sft import LMCollator, encode_conversation, pack
from deltaformer.tokenizer import AutoTokenizer

WORDS = "user bot end sys hello there fine thanks how are you good yes no . ! ?".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return AutoTokenizer.from_pretrained(folder)


def _turns(messages, add_generation_prompt):
    """A ChatML-like template in the test vocabulary: 'user ... end', 'bot ... end'; no generation markers."""
    head = {"system": "sys", "user": "user", "assistant": "bot"}
    text = "".join(f"{head[m['role']]} {m['content']} end " for m in messages)
    return text + ("bot " if add_generation_prompt else "")


CHAT = ChatFormat("test", _turns)


def test_loss_only_on_the_assistant_replies_and_their_turn_end(tokenizer):
    conv = Conversation(({"role": "system", "content": "fine"}, {"role": "user", "content": "hello there"},
                         {"role": "assistant", "content": "good ."}, {"role": "user", "content": "how are you"},
                         {"role": "assistant", "content": "fine thanks !"}))
    e = encode_conversation(tokenizer, CHAT, conv, 64)
    assert tokenizer.decode(e.input_ids) == tokenizer.decode(tokenizer.encode(_turns(list(conv.messages), False),
                                                                              add_special_tokens=False))
    learned = tokenizer.decode([t for t, y in zip(e.input_ids, e.labels) if y != -100])
    assert learned == "good. end fine thanks! end"
    assert all(y in (-100, t) for t, y in zip(e.input_ids, e.labels))
    assert encode_conversation(tokenizer, CHAT, conv, 5) is None  # no reply token survives the cut


def test_a_long_input_gives_way_before_its_reply(tokenizer):
    conv = Conversation(({"role": "user", "content": "hello there how are you " * 10},
                         {"role": "assistant", "content": "fine thanks !"}))
    full = encode_conversation(tokenizer, CHAT, conv, 512)
    e = encode_conversation(tokenizer, CHAT, conv, 20)
    assert len(full.input_ids) > 20 and len(e.input_ids) <= 20
    learned = [t for t, y in zip(e.input_ids, e.labels) if y != -100]
    assert learned == [t for t, y in zip(full.input_ids, full.labels) if y != -100]  # the reply is whole
    assert e.input_ids[-len(learned):] == learned


def test_packing_keeps_every_example_and_its_labels(tokenizer):
    convs = [Conversation(({"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes " * n}))
             for n in range(1, 7)]
    examples = [encode_conversation(tokenizer, CHAT, c, 64) for c in convs]
    packs = pack(examples, 16)
    assert all(len(p.input_ids) <= 16 for p in packs) and len(packs) < len(examples)
    assert [t for p in packs for t in p.input_ids] == [t for e in examples for t in e.input_ids]
    assert [t for p in packs for t in p.labels] == [t for e in examples for t in e.labels]
    batch = LMCollator(0)(packs)
    assert batch["labels"].shape == batch["input_ids"].shape and (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_instruction_files_name_broken_lines_or_skip_them(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"instruction": "Say hi", "output": "hi"}), "",
             json.dumps({"instruction": "Add", "input": "1+1", "output": "2", "system": "be brief"}),
             '{"instruction": "broken", ',
             json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
             json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
             json.dumps({"instruction": "no output"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(PromptError, match=r"data.jsonl:4: invalid JSON"):
        read_instructions(path)
    data = read_instructions(path, skip_bad_lines=True)
    assert len(data.conversations) == 3 and len(data.skipped) == 3
    assert "data.jsonl:6: the conversation has no assistant" in data.skipped[1]
    assert "data.jsonl:7: missing or empty 'output'" in data.skipped[2]
    add = data.conversations[1].messages
    assert [m["role"] for m in add] == ["system", "user", "assistant"] and add[1]["content"] == "Add\n\n1+1"
    (tmp_path / "bad.jsonl").write_bytes(b'{"instruction": "a", "output": "\xff"}\n')
    with pytest.raises(PromptError, match="bad.jsonl:1: not UTF-8"):
        read_instructions(tmp_path / "bad.jsonl")


def test_builtin_mixture_specs():
    assert parse_builtin("builtin") == list(PHRASINGS)
    assert parse_builtin("builtin:-rt-polarity") == ["rt-reviews", "bbc-news", "bbc-headlines"]
    assert parse_builtin("builtin:minus-bbc-news,-rt-reviews") == ["rt-polarity", "bbc-headlines"]
    assert all(len(set(p)) >= 5 for p in PHRASINGS.values())
    with pytest.raises(PromptError, match="'sst2' is not a task of the mixture"):
        parse_builtin("builtin:-sst2")


@pytest.mark.assets
@pytest.mark.slow
def test_builtin_mixture_draws_training_examples_only():
    from deltaformer.data.tasks import load_seq2seq_task, load_task
    from deltaformer.prompting.mixture import build_mixture

    mixture = build_mixture(parse_builtin("builtin:-rt-polarity"), per_task=10, seed=0)
    assert len(mixture) == 30 and not any(c.source.startswith("rt-polarity") for c in mixture)
    news = {e.label for e in load_task("bbc-news").split("train")}
    test_headlines = {p.target for p in load_seq2seq_task("bbc-headlines").split("test")}
    for c in mixture:
        user, reply = (m["content"] for m in c.messages)
        if c.source.startswith("bbc-news"):
            assert reply in news and any(user.startswith(p.split("{text}")[0]) for p in PHRASINGS["bbc-news"])
        if c.source.startswith("bbc-headlines"):
            assert reply not in test_headlines
    assert build_mixture(["rt-reviews"], per_task=5, seed=1) == build_mixture(["rt-reviews"], per_task=5, seed=1)
