"""Prompting on a masked LM: templates, verbalizers, scoring against a hand loop, calibration, demonstrations,
routed pattern-verbalizer pairs and PET training through the trainer (tiny random BERT, own vocabulary)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deltaformer import delta, prompting
from deltaformer.config import BertConfig
from deltaformer.data.tabular import Example
from deltaformer.errors import PromptError
from deltaformer.models import BertForMaskedLM
from deltaformer.prompting.model import PvpExample
from deltaformer.tokenizer import AutoTokenizer
from deltaformer.train import TrainConfig, Trainer
from deltaformer.train.methods import MethodSpec

WORDS = ("good great fine bad awful poor film movie plot it was is a the and not very really acting story "
         "boring fun dull n / ##a ##s ##ly won ##der ##ful terr ##ible . , ! ?").split()
LABELS = ["negative", "positive"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab")
    specials = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (folder / "vocab.txt").write_text("\n".join(specials + WORDS) + "\n", encoding="utf-8")
    return AutoTokenizer.from_pretrained(folder)


def tiny_mlm(tokenizer, seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, initializer_range=0.2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(config).eval()


def examples(n: int = 12) -> list[Example]:
    texts = ["a good film", "the plot was dull", "really fun acting", "boring and poor", "a great story",
             "the movie was awful", "very fine acting", "not fun", "a wonderful plot", "a terrible film",
             "really good", "dull and boring story"]
    return [Example(texts[i % len(texts)], None, LABELS[(i + 1) % 2], f"toy#{i}") for i in range(n)]


VERBALIZER = {"negative": ["bad", "terrible"], "positive": ["great", "wonderful"]}


def renderer(tokenizer, template="{text} it was {mask} .", verbalizer=None, **kw) -> prompting.PromptRenderer:
    verb = prompting.Verbalizer.parse(verbalizer or VERBALIZER, LABELS, kw.pop("class_reduce", "mean"))
    return prompting.PromptRenderer(tokenizer, prompting.Template.parse(template), verb, "mlm", kw.pop("max_length", 64),
                                    **kw)


# --- templates and verbalizers ------------------------------------------------------------------------


def test_template_slots_soft_tokens_and_braces():
    t = prompting.Template.parse("{{note}} {soft:3} {text} | {text_b} {soft} it was {mask}.")
    assert [p.kind for p in t.pieces] == ["literal", "soft", "literal", "text", "literal", "text_b", "literal",
                                          "soft", "literal", "mask", "literal"]
    assert t.pieces[0].value == "{note} " and t.soft_tokens == 4 and t.uses_text_b and t.has_mask


@pytest.mark.parametrize("source, message", [
    ("{txt} it was {mask}", "unknown slot"), ("it was {mask}", "no {text} slot"), ("{text} {mask} {mask}", "2 times"),
    ("{text} it was {mask", "unmatched"), ("", "empty"), ("{text} {soft:0}", "at least one"),
])
def test_bad_templates_are_refused(source, message):
    with pytest.raises(PromptError, match=message.replace("{", r"\{").replace("}", r"\}")):
        prompting.Template.parse(source)


def test_template_must_suit_the_model_kind():
    with pytest.raises(PromptError, match="has no .mask.: a masked LM"):
        prompting.Template.parse("{text} it was").check_for("mlm")
    with pytest.raises(PromptError, match="text after .mask."):
        prompting.Template.parse("{text} it was {mask} indeed").check_for("causal")
    prompting.Template.parse("{text} it was {mask}").check_for("causal")


def test_verbalizer_forms_and_bad_ones(tmp_path):
    path = tmp_path / "v.json"
    path.write_text(json.dumps(VERBALIZER), encoding="utf-8")
    for spec in (json.dumps(VERBALIZER), path, VERBALIZER, [["bad", "terrible"], ["great", "wonderful"]]):
        v = prompting.Verbalizer.parse(spec, LABELS)
        assert v.words == (("bad", "terrible"), ("great", "wonderful"))
    assert prompting.Verbalizer.parse('{"negative": "bad", "positive": "good"}', LABELS).words == (("bad",), ("good",))
    with pytest.raises(PromptError, match="lacks class.*'positive'"):
        prompting.Verbalizer.parse('{"negative": "bad"}', LABELS)
    with pytest.raises(PromptError, match="does not have"):
        prompting.Verbalizer.parse('{"negative": "bad", "positive": "good", "neutral": "ok"}', LABELS)
    with pytest.raises(PromptError, match="neither JSON nor an existing file"):
        prompting.Verbalizer.parse("nosuchfile.json", LABELS)
    path.write_text('{"negative": "bad",\n "positive": }', encoding="utf-8")
    with pytest.raises(PromptError, match=r"v.json:2: invalid JSON"):
        prompting.Verbalizer.parse(path, LABELS)


def test_label_word_that_tokenizes_to_nothing(tokenizer):
    with pytest.raises(PromptError, match="'\\\\x07' of class 'positive' tokenizes to nothing"):
        renderer(tokenizer, verbalizer={"negative": "bad", "positive": "\x07"})


def test_a_label_word_of_two_classes_is_refused(tokenizer):
    with pytest.raises(PromptError, match="'good' of class 'negative' and 'good' of class 'positive' are the same"):
        renderer(tokenizer, verbalizer={"negative": ["bad", "good"], "positive": ["great", "good"]})
    renderer(tokenizer, verbalizer={"negative": ["bad", "bad"], "positive": "good"})  # repeated in one class: fine


def test_multi_token_words_get_one_row_per_length(tokenizer):
    r = renderer(tokenizer)
    item = r.render(Example("a good film"))
    assert r.word_ids == [tokenizer.encode(w, add_special_tokens=False) for w in ("bad", "terrible", "great", "wonderful")]
    assert r.lengths == [1, 2, 3] and r.word_row == [0, 1, 0, 2]
    mask = tokenizer.mask_token_id
    assert [row.count(mask) for row in item.rows] == [1, 2, 3]
    for w, pos in enumerate(item.positions):
        assert len(pos) == len(r.word_ids[w]) and all(item.rows[r.word_row[w]][p] == mask for p in pos)
    assert tokenizer.decode(item.rows[0]) == "[CLS] a good film it was [MASK]. [SEP]"


# --- scoring ------------------------------------------------------------------------------------------


def hand_scores(lm, r: prompting.PromptRenderer, example: Example, word_reduce: str, class_reduce: str) -> list[float]:
    """One example, one row at a time, one word at a time, straight from the logits."""
    item = r.render(example)
    per_class: dict[int, list[float]] = {}
    for w, ids in enumerate(r.word_ids):
        row = torch.tensor([item.rows[r.word_row[w]]])
        logp = lm(input_ids=row).logits[0].log_softmax(-1)
        token_scores = [logp[p, t].item() for p, t in zip(item.positions[w], ids)]
        score = {"mean": sum(token_scores) / len(token_scores), "max": max(token_scores), "first": token_scores[0],
                 "sum": sum(token_scores)}[word_reduce]
        per_class.setdefault(r.word_class[w], []).append(score)
    out = []
    for c in range(len(LABELS)):
        s = per_class[c]
        out.append({"mean": sum(s) / len(s), "max": max(s), "logsumexp": math.log(sum(math.exp(x) for x in s))}[class_reduce])
    return out


@pytest.mark.parametrize("word_reduce, class_reduce", [("mean", "mean"), ("max", "logsumexp"), ("first", "max"),
                                                        ("sum", "mean")])
def test_scores_equal_a_hand_loop_over_the_logits(tokenizer, word_reduce, class_reduce):
    lm = tiny_mlm(tokenizer)
    r = renderer(tokenizer, class_reduce=class_reduce)
    model = prompting.PromptModel(lm, [prompting.PVP.build(r, word_reduce=word_reduce)])
    data = examples(5)
    (scores,) = prompting.score_rendered(model, model.render(data, LABELS), batch_size=3)
    with torch.no_grad():
        expected = torch.tensor([hand_scores(lm, r, e, word_reduce, class_reduce) for e in data])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


def test_routed_patterns_equal_each_pattern_alone(tokenizer):
    """Two PVPs under two LoRA deltas, scored in one routed batch, equal each scored alone with its delta."""
    lm = tiny_mlm(tokenizer)
    setup = prompting.PromptSetup(["{text} it was {mask} .", "{mask} ! {text}"], [VERBALIZER], max_length=64)
    model = prompting.build_prompt_model(lm, tokenizer, "mlm", LABELS, setup, MethodSpec("lora", {"rank": 4}))
    with torch.no_grad():
        for p in delta.delta_parameters(lm):
            p.normal_(0, 0.3)
    data = examples(6)
    together = prompting.score_rendered(model, model.render(data, LABELS))
    for i, pvp in enumerate(model.pvps):
        alone = prompting.PromptModel(lm, [pvp])
        (scores,) = prompting.score_rendered(alone, alone.render(data, LABELS))
        torch.testing.assert_close(together[i], scores, atol=1e-5, rtol=0)
    assert not torch.allclose(together[0], together[1])


@pytest.mark.parametrize("method, options", [("prompt", {"num_virtual_tokens": 3}), ("prefix", {"prefix_length": 2}),
                                             ("ia3", {}), ("adapter", {"bottleneck": 8})])
def test_patterns_under_any_method_read_their_masks(tokenizer, method, options):
    """Routed scores equal each row run alone under its delta, read at its mask (after any prepended tokens)."""
    lm = tiny_mlm(tokenizer)
    setup = prompting.PromptSetup(["{text} it was {mask} .", "{mask} ! {text}"], [VERBALIZER], max_length=64)
    model = prompting.build_prompt_model(lm, tokenizer, "mlm", LABELS, setup, MethodSpec(method, options))
    with torch.no_grad():
        for p in delta.delta_parameters(lm):
            p.add_(torch.randn_like(p) * 0.3)
    data = examples(3)
    together = prompting.score_rendered(model, model.render(data, LABELS))
    with torch.no_grad():
        for i, pvp in enumerate(model.pvps):
            delta.set_active(lm, pvp.delta_names)
            expected = []
            for e in data:
                item = pvp.renderer.render(e)
                picked = []
                for w, pos in enumerate(item.positions):
                    logits = lm(input_ids=torch.tensor([item.rows[pvp.renderer.word_row[w]]])).logits[0]
                    picked.append(logits[torch.tensor(pos) + pvp.offset])
                length = pvp.scorer.tokens.shape[1]
                picked = torch.stack([torch.nn.functional.pad(x, (0, 0, 0, length - len(x))) for x in picked])
                expected.append(pvp.scorer.class_scores(picked[None])[0])
            torch.testing.assert_close(together[i], torch.stack(expected), atol=1e-5, rtol=0)
    assert model.pvps[0].offset == (3 if method == "prompt" else 0)


# --- calibration and demonstrations -----------------------------------------------------------------


def test_calibration_divides_out_the_content_free_probabilities():
    cf = torch.tensor([[0.0, 1.0], [0.5, 0.2], [-1.0, 0.0]])
    p_cf = cf.softmax(-1).mean(0)
    scores = torch.tensor([[0.3, 0.1], [2.0, -1.0]])
    q = scores.softmax(-1) / p_cf
    q = q / q.sum(-1, keepdim=True)
    calibrated = prompting.calibrate(scores, prompting.content_free_bias(cf))
    torch.testing.assert_close(calibrated.softmax(-1), q, atol=1e-6, rtol=0)


def test_calibrated_evaluation_uses_the_same_demonstrations(tokenizer):
    lm = tiny_mlm(tokenizer)
    model = prompting.PromptModel(lm, [prompting.PVP.build(renderer(tokenizer, max_length=64))])
    data = examples(8)
    selector = prompting.DemonstrationSelector(examples(12)[8:], 2, "balanced", seed=3, labels=LABELS)
    result = prompting.evaluate_prompts(model, data, selector, prompting.CONTENT_FREE)
    assert result["examples"] == 8 and result["shots"] == 2 and "calibrated" in result
    (raw,) = prompting.score_rendered(model, model.render(data, LABELS, selector.select(data)))
    demos = selector.select(data)[0]
    cf = model.render([Example(t) for t in prompting.CONTENT_FREE], LABELS, [demos] * 3)
    (cf_scores,) = prompting.score_rendered(model, cf)
    calibrated = prompting.calibrate(raw, prompting.content_free_bias(cf_scores))
    gold = torch.tensor([LABELS.index(e.label) for e in data])
    assert result["calibrated"]["accuracy"] == pytest.approx((calibrated.argmax(-1) == gold).float().mean().item())
    assert result["accuracy"] == pytest.approx((raw.argmax(-1) == gold).float().mean().item())


def test_demonstration_strategies_are_seeded_and_balanced():
    pool = [Example(f"text {i}", None, LABELS[i % 2], f"p{i}") for i in range(20)]
    queries = examples(3)
    a = prompting.DemonstrationSelector(pool, 5, "random", seed=1).select(queries)
    assert a == prompting.DemonstrationSelector(pool, 5, "random", seed=1).select(queries)
    assert a != prompting.DemonstrationSelector(pool, 5, "random", seed=2).select(queries)
    assert all(d == a[0] for d in a) and len(set(id(x) for x in a[0])) == 5
    for k in (4, 5):
        chosen = prompting.DemonstrationSelector(pool, k, "balanced", seed=0, labels=LABELS).select(queries)[0]
        counts = [sum(e.label == label for e in chosen) for label in LABELS]
        assert sum(counts) == k and max(counts) - min(counts) <= 1
    with pytest.raises(PromptError, match="pool holds 20"):
        prompting.DemonstrationSelector(pool, 21)
    with pytest.raises(PromptError, match="need 7 examples of 'positive'"):
        prompting.DemonstrationSelector(pool[:12] + [e for e in pool if e.label == "negative"][6:], 14, "balanced",
                                        labels=LABELS).select(queries)


class FixedEncoder:
    """Embeds "text i" as a unit vector at angle i degrees: neighbours are the closest numbers."""

    def encode(self, texts):
        angles = torch.tensor([float(t.split()[-1]) for t in texts]) * math.pi / 180
        return torch.stack([angles.cos(), angles.sin()], -1)


def test_nearest_neighbours_closest_last_and_never_the_query_itself():
    pool = [Example(f"text {i}", None, LABELS[i % 2], f"p{i}") for i in range(0, 40, 2)]
    queries = [Example("text 11.4"), pool[5]]  # pool[5] is "text 10"
    picked = prompting.DemonstrationSelector(pool, 3, "nearest", encoder=FixedEncoder()).select(queries)
    assert [e.text for e in picked[0]] == ["text 14", "text 10", "text 12"]
    assert sorted(e.text for e in picked[1]) == ["text 12", "text 14", "text 8"]


def test_more_shots_than_the_context_holds(tokenizer):
    demos = [Example("a good film " * 4, None, "positive", f"d{i}") for i in range(6)]
    r = renderer(tokenizer, max_length=40)
    item = r.render(Example("not fun"), demos)
    assert item.dropped > 0 and max(len(row) for row in item.rows) <= 40
    assert item.dropped == 6 - sum(1 for _ in range(6 - item.dropped))
    with pytest.raises(PromptError, match="6 demonstration.*context holds 40.*fewer shots"):
        renderer(tokenizer, max_length=40, overflow="error").render(Example("not fun"), demos)
    long = renderer(tokenizer, max_length=12).render(Example("a good film " * 10))
    assert long.truncated and max(len(row) for row in long.rows) <= 12
    with pytest.raises(PromptError, match="template alone needs"):
        renderer(tokenizer, template="{text} it was very very very very very {mask} .", max_length=8).render(
            Example("fun"))


# --- soft tokens and PET ----------------------------------------------------------------------------


def test_soft_tokens_are_a_delta_at_placeholder_positions(tokenizer):
    lm = tiny_mlm(tokenizer)
    setup = prompting.PromptSetup(["{soft:2} {text} it was {mask} ."], [VERBALIZER], max_length=64)
    model = prompting.build_prompt_model(lm, tokenizer, "mlm", LABELS, setup, MethodSpec("lora", {"rank": 2}))
    assert set(delta.deltas(lm)) == {"pvp0", "pvp0-soft"} and model.pvps[0].delta_names == ("pvp0", "pvp0-soft")
    item = model.pvps[0].renderer.render(Example("fun"))
    assert item.rows[0][1:3] == [prompting.placeholder_id(tokenizer)] * 2
    batch = model.collator(tokenizer)(model.render(examples(4), LABELS))
    model.train()
    model(**batch).loss.backward()
    trained = [n for n, p in lm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any("ptuning" in n for n in trained) and any("lora" in n for n in trained)
    assert not any(n.startswith("backbone.layers.0.attention.query.weight") for n in trained)
    assert model.pvps[0].renderer.render(Example("[unused0] fun")).rows[0].count(prompting.placeholder_id(tokenizer)) == 2
    unk = renderer(tokenizer, template="{soft} {text} it was {mask} .", soft_token_id=tokenizer.unk_token_id)
    with pytest.raises(PromptError, match="holds the soft-token placeholder"):
        unk.render(Example("fun \u20ac"))  # an unknown character: the unk id, here the placeholder


def test_pet_trains_every_pattern_through_the_trainer(tokenizer, tmp_path):
    lm = tiny_mlm(tokenizer)
    setup = prompting.PromptSetup(["{text} it was {mask} .", "{mask} ! {text}"], [VERBALIZER], max_length=64)
    model = prompting.build_prompt_model(lm, tokenizer, "mlm", LABELS, setup, MethodSpec("lora", {"rank": 4}))
    data = model.render(examples(12), LABELS)
    before = prompting.score_rendered(model, data)
    config = TrainConfig(epochs=15, batch_size=4, lr=2e-2, warmup_ratio=0.0, progress=False, seed=0)
    results = Trainer(model, config, data, model.collator(tokenizer), tmp_path, num_labels=2).train()
    after = prompting.score_rendered(model, data)
    gold = torch.tensor([d.label for d in data])
    for b, a in zip(before, after):
        assert torch.nn.functional.cross_entropy(a, gold) < 0.5 * torch.nn.functional.cross_entropy(b, gold)
    assert results["steps"] == 45
    prompting.save_prompt_weights(model, MethodSpec("lora", {"rank": 4}), tmp_path)
    assert sorted(p.name for p in (tmp_path / "deltas").iterdir()) == ["pvp0", "pvp1"]


def test_pvp_batches_carry_labels_once(tokenizer):
    model = prompting.PromptModel(tiny_mlm(tokenizer), [prompting.PVP.build(renderer(tokenizer))] * 2)
    batch = model.collator(tokenizer)([PvpExample(x.items, x.label) for x in model.render(examples(3), LABELS)])
    assert batch["labels"].tolist() == [1, 0, 1] and "0.labels" not in batch and batch["1.input_ids"].shape[0] == 9
