"""Prompting on a causal LM: the answer continues the prompt, scored by the sum of its tokens' log-probs;
chat layouts (demonstrations as turns); instruction tuning through the trainer (loss on replies only)."""

from __future__ import annotations

import pytest
import torch

from deltaformer import delta, prompting
from deltaformer.config import GPT2Config
from deltaformer.data.tabular import Example
from deltaformer.models import GPT2LMHeadModel
from deltaformer.prompting.chat import PLAIN, ChatFormat
from deltaformer.prompting.instructions import Conversation
from deltaformer.prompting.sft import CausalLMObjective, LMCollator, encode_conversation
from deltaformer.tokenizer import train_tokenizer
from deltaformer.train import TrainConfig, Trainer
from deltaformer.train.methods import MethodSpec

LABELS = ["negative", "positive"]
CORPUS = ["the film was good and the plot was great", "a bad movie with awful acting and a dull story",
          "review: sentiment: positive negative", "user assistant end hello there how are you"] * 20


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, kind="bpe", vocab_size=300, min_frequency=1, lowercase=False)


def tiny_gpt2(vocab: int, seed: int = 0) -> GPT2LMHeadModel:
    """A random 2-layer GPT-2 without dropout; weights at std 0.2 so log-probabilities differ visibly."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2)
    return GPT2LMHeadModel(config).eval()


VERBALIZER = {"negative": ["bad", "awful acting"], "positive": ["good", "great"]}


def causal_renderer(tokenizer, template="review: {text} sentiment: {mask}", chat=None, **kw):
    verb = prompting.Verbalizer.parse(VERBALIZER, LABELS, kw.pop("class_reduce", "mean"))
    return prompting.PromptRenderer(tokenizer, prompting.Template.parse(template), verb, "causal", kw.pop("max_length", 96),
                                    chat=chat, **kw)


def test_answer_continues_the_prompt_with_its_leading_space(tokenizer):
    r = causal_renderer(tokenizer)
    assert r.word_ids[1] == tokenizer.encode(" awful acting", add_special_tokens=False)
    item = r.render(Example("a dull story"))
    prompt = tokenizer.encode("review: a dull story sentiment:", add_special_tokens=False)
    assert len(item.rows) == len({tuple(ids[:-1]) for ids in r.word_ids})  # a row per word less its last token
    for w, ids in enumerate(r.word_ids):
        row = item.rows[r.word_row[w]]
        assert row == prompt + ids[:-1] or tokenizer.decode(row) == "review: a dull story sentiment:" + \
            tokenizer.decode(ids[:-1])
        assert item.positions[w] == list(range(len(row) - len(ids), len(row)))


@pytest.mark.parametrize("word_reduce", ["sum", "mean"])
def test_causal_scores_equal_a_hand_loop(tokenizer, word_reduce):
    lm = tiny_gpt2(len(tokenizer.get_vocab()))
    r = causal_renderer(tokenizer)
    model = prompting.PromptModel(lm, [prompting.PVP.build(r, word_reduce=word_reduce)])
    data = [Example("the film was good"), Example("a bad movie with a dull story and awful acting")]
    (scores,) = prompting.score_rendered(model, model.render(data, LABELS))
    expected = []
    with torch.no_grad():
        for e in data:
            prompt = r.render(e).rows[0][:r.render(e).positions[0][0] + 1]
            per_class: dict[int, list[float]] = {}
            for w, ids in enumerate(r.word_ids):
                logp = lm(torch.tensor([prompt + ids])).logits[0].log_softmax(-1)
                tokens = [logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(ids)]
                per_class.setdefault(r.word_class[w], []).append(sum(tokens) / (len(tokens) if word_reduce == "mean" else 1))
            expected.append([sum(v) / len(v) for _, v in sorted(per_class.items())])
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-5, rtol=0)


def _turns(messages, add_generation_prompt):
    head = {"system": "system", "user": "user", "assistant": "assistant"}
    text = "".join(f"<{head[m['role']]}>{m['content']}<end>\n" for m in messages)
    return text + ("<assistant>" if add_generation_prompt else "")


CHAT = ChatFormat("test", _turns)


def test_chat_demonstrations_are_turns(tokenizer):
    r = causal_renderer(tokenizer, template="review: {text}", chat=CHAT, max_length=512)
    demos = [Example("a good film", None, "positive"), Example("a dull story", None, "negative")]
    item = r.render(Example("great plot"), demos)
    assert item.dropped == 0
    short = causal_renderer(tokenizer, template="review: {text}", chat=CHAT, max_length=len(item.rows[0]) - 5)
    assert short.render(Example("great plot"), demos).dropped == 1
    text = tokenizer.decode(item.rows[0][:item.positions[0][0] + 1])
    assert text == _turns([{"role": "user", "content": "review: a good film"}, {"role": "assistant", "content": "good"},
                           {"role": "user", "content": "review: a dull story"}, {"role": "assistant", "content": "bad"},
                           {"role": "user", "content": "review: great plot"}], True)
    assert tokenizer.decode(r.word_ids[0]) == "bad"  # the reply starts the assistant turn: no leading space


def test_plain_format_ends_replies_with_eos(tokenizer):
    conv = Conversation(({"role": "user", "content": "hello there"}, {"role": "assistant", "content": "good"}))
    e = encode_conversation(tokenizer, PLAIN, conv, 64)
    learned = [t for t, y in zip(e.input_ids, e.labels) if y != -100]
    assert tokenizer.decode(learned[:-1]) == "good" and learned[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(e.input_ids).startswith("### Instruction:\nhello there")


def test_instruction_tuning_lowers_the_reply_loss_through_the_trainer(tokenizer, tmp_path):
    lm = tiny_gpt2(len(tokenizer.get_vocab()))
    convs = [Conversation(({"role": "user", "content": f"hello {w}"}, {"role": "assistant", "content": w}))
             for w in ("good", "great", "bad", "awful")] * 4
    data = [encode_conversation(tokenizer, CHAT, c, 64) for c in convs]
    objective = CausalLMObjective(lm)
    collate = LMCollator(tokenizer.pad_token_id)
    with torch.no_grad():
        before = objective(**collate(data)).loss.item()
    Trainer(objective, TrainConfig(epochs=10, batch_size=8, lr=3e-3, progress=False, warmup_ratio=0.0), data,
            collate, tmp_path).train()
    with torch.no_grad():
        after = objective(**collate(data)).loss.item()
    assert after < 0.5 * before
    batch = collate(data[:2])
    full = lm(batch["input_ids"], batch["attention_mask"]).logits.log_softmax(-1)
    labels = batch["labels"]
    picked = [-full[b, t - 1, labels[b, t]] for b in range(2) for t in range(1, labels.shape[1]) if labels[b, t] != -100]
    torch.testing.assert_close(objective(**batch).loss, torch.stack(picked).mean(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method, options", [("lora", {"rank": 4}), ("prompt", {"num_virtual_tokens": 2}),
                                             ("prefix", {"prefix_length": 2})])
def test_routed_patterns_on_a_decoder_read_their_answers(tokenizer, method, options):
    """Two patterns under two deltas of a decoder, one routed batch, equal each row alone under its delta."""
    lm = tiny_gpt2(len(tokenizer.get_vocab()))
    if method != "lora" and lm.delta_backbone() is None:
        pytest.skip("input-side deltas on decoders need the decoder's prompt hook (delta_backbone)")
    setup = prompting.PromptSetup(["review: {text} sentiment: {mask}", "{text} it was {mask}"], [VERBALIZER],
                                  max_length=96, class_reduce="logsumexp")
    model = prompting.build_prompt_model(lm, tokenizer, "causal", LABELS, setup, MethodSpec(method, options))
    with torch.no_grad():
        for p in delta.delta_parameters(lm):
            p.add_(torch.randn_like(p) * 0.3)
    data = [Example("the film was good"), Example("a dull story")]
    together = prompting.score_rendered(model, model.render(data, LABELS))
    with torch.no_grad():
        for i, pvp in enumerate(model.pvps):
            delta.set_active(lm, pvp.delta_names)
            for n, e in enumerate(data):
                item = pvp.renderer.render(e)
                words = []
                for w, ids in enumerate(pvp.renderer.word_ids):
                    logp = lm(torch.tensor([item.rows[0][:item.positions[w][0] + 1] + ids])).logits[0].log_softmax(-1)
                    words.append(sum(logp[p + pvp.offset, t].item() for p, t in zip(item.positions[w], ids)))
                per_class = [torch.tensor([s for s, c in zip(words, pvp.renderer.word_class) if c == k]).logsumexp(0)
                             for k in range(2)]
                torch.testing.assert_close(together[i][n], torch.stack(per_class), atol=1e-5, rtol=0)


def test_the_reply_loss_equals_the_models_own_shifted_loss(tokenizer):
    lm = tiny_gpt2(len(tokenizer.get_vocab()))
    convs = [Conversation(({"role": "user", "content": "hello there"}, {"role": "assistant", "content": w}))
             for w in ("good", "awful acting")]
    batch = LMCollator(tokenizer.pad_token_id)([encode_conversation(tokenizer, CHAT, c, 64) for c in convs])
    with torch.no_grad():
        ours = CausalLMObjective(lm)(**batch).loss
        theirs = lm(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_generation_evaluation_parses_labels(tokenizer):
    from deltaformer.prompting.generation_eval import evaluate_by_generation, parse_label

    verb = prompting.Verbalizer.parse(VERBALIZER, LABELS)
    assert parse_label("I think it is Good, not bad", verb) == 1  # the first label word found wins
    assert parse_label("awful acting but good", verb) == 0 and parse_label("goodness", verb) is None
    lm = tiny_gpt2(len(tokenizer.get_vocab()))
    result = evaluate_by_generation(causal_renderer(tokenizer), lm, [Example("a good film", None, "positive")] * 3,
                                    max_new_tokens=3)
    assert result["examples"] == 3 and 0 <= result["parsed"] <= 1 and len(result["answers"]) == 3


@pytest.mark.parametrize("method", [None, "lora", "ia3"])
def test_shared_prompt_scoring_equals_full_rows(tokenizer, method):
    lm = tiny_gpt2(len(tokenizer.get_vocab()))
    setup = prompting.PromptSetup(["review: {text} sentiment: {mask}", "{text} it was {mask}"], [VERBALIZER],
                                  max_length=96, word_reduce="mean")
    model = prompting.build_prompt_model(lm, tokenizer, "causal", LABELS, setup,
                                         MethodSpec(method) if method else None)
    with torch.no_grad():
        for p in delta.delta_parameters(lm):
            p.add_(torch.randn_like(p) * 0.3)
    data = [Example("the film was good"), Example("a bad movie with a dull story and awful acting"), Example("fun")]
    rendered = model.render(data, LABELS)
    shared = prompting.score_rendered(model, rendered, batch_size=2)
    model.word_cache_budget = 1  # one word's copy of its prompt cache at a time
    chunked = prompting.score_rendered(model, rendered, batch_size=2)
    model.share_prompts = False
    full = prompting.score_rendered(model, rendered, batch_size=2)
    for a, b, c in zip(shared, full, chunked):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        torch.testing.assert_close(c, b, atol=1e-5, rtol=0)


def test_one_token_words_share_the_prompts_row(tokenizer):
    """Words that differ only in their last token are read from one row: with one-token words, the prompt's."""
    vocab = tokenizer.get_vocab()
    single = [w for w in ("a", "the", "it", "was", "is", "i", "s", "t", "e", "o")
              if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]
    assert len(single) >= 2, "the test tokenizer spells two of these words with one token"
    verb = prompting.Verbalizer.parse({"negative": [single[0]], "positive": [single[1]]}, LABELS)
    r = prompting.PromptRenderer(tokenizer, prompting.Template.parse("review: {text} sentiment: {mask}"), verb,
                                 "causal", 96)
    item = r.render(Example("a dull story"))
    assert r.rows_per_item == 1 and len(item.rows) == 1 and item.positions[0] == item.positions[1]
    lm = tiny_gpt2(len(vocab))
    (scores,) = prompting.score_rendered(prompting.PromptModel(lm, [prompting.PVP.build(r)]),
                                         [prompting.PvpExample((item,))])
    with torch.no_grad():
        logp = lm(torch.tensor([item.rows[0]])).logits[0, -1].log_softmax(-1)
    torch.testing.assert_close(scores[0], logp[[r.word_ids[0][0], r.word_ids[1][0]]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", [None, "lora"])
def test_a_common_prefix_runs_once_and_scores_equal_full_rows(tokenizer, method):
    """Queries after the same demonstrations share a prefix: it runs once per pattern, the scores do not move."""
    from deltaformer.prompting.shared_prompt import common_prefix

    lm = tiny_gpt2(len(tokenizer.get_vocab()))
    setup = prompting.PromptSetup(["review: {text}", "{text} it was {mask}"], [VERBALIZER], max_length=200,
                                  class_reduce="logsumexp")
    model = prompting.build_prompt_model(lm, tokenizer, "causal", LABELS, setup, MethodSpec(method) if method else None)
    with torch.no_grad():
        for p in delta.delta_parameters(lm):
            p.add_(torch.randn_like(p) * 0.3)
    demos = [Example("a good film", None, "positive"), Example("a dull story", None, "negative")]
    data = [Example("the film was good"), Example("a bad movie with a dull story and awful acting"), Example("fun")]
    rendered = model.render(data, LABELS, [demos] * len(data))
    batch = model.collator(tokenizer)(rendered)
    firsts = batch["0.input_ids"][::model.pvps[0].scorer.rows_per_item]
    assert common_prefix(firsts, batch["0.positions"][:, 0, 0] + 1) >= len(tokenizer.encode("review: a good film"))
    shared = prompting.score_rendered(model, rendered, batch_size=3)
    model.share_prompts = False
    full = prompting.score_rendered(model, rendered, batch_size=3)
    for a, b in zip(shared, full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_common_prefix_leaves_every_row_its_last_token():
    from deltaformer.prompting.shared_prompt import common_prefix

    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 0], [1, 2, 5, 6]])
    assert common_prefix(ids, torch.tensor([4, 3, 4])) == 2
    assert common_prefix(ids[:2], torch.tensor([4, 3])) == 2  # row 1 keeps its last token (3)
    assert common_prefix(ids[:1], torch.tensor([4])) == 0


def test_shared_prompts_train_with_the_gradients_of_full_rows(tokenizer):
    lm = tiny_gpt2(len(tokenizer.get_vocab()))
    setup = prompting.PromptSetup(["review: {text}", "{text} it was {mask}"], [VERBALIZER], max_length=200)
    model = prompting.build_prompt_model(lm, tokenizer, "causal", LABELS, setup, MethodSpec("lora", {"dropout": 0.0}))
    with torch.no_grad():
        for p in delta.delta_parameters(lm):
            p.add_(torch.randn_like(p) * 0.3)
    demos = [Example("a good film", None, "positive")]
    data = [Example("the film was good", None, "positive"), Example("a bad movie", None, "negative")]
    batch = model.collator(tokenizer)(model.render(data, LABELS, [demos, demos]))
    grads = []
    for share, budget in ((True, 1), (False, 1)):  # shared prompts, each word's cache copy apart; full rows
        model.share_prompts, model.word_cache_budget = share, budget
        model.zero_grad()
        model(**batch).loss.backward()
        grads.append([p.grad.clone() for p in delta.delta_parameters(lm)])
    assert all(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
