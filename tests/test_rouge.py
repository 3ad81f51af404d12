"""ROUGE-1/2/L F1 in deltaformer.train.metrics against Google's ``rouge-score`` package (no stemming)."""

from __future__ import annotations

import pytest

from deltaformer.train.metrics import lcs_length, rouge_l, rouge_n, rouge_scores, rouge_tokens

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

HAND_PAIRS = [
    ("the cat sat on the mat", "the cat was on the mat"),
    ("Cat sits on mat", "The cat sat on the mat."),
    ("", "an empty prediction scores zero"),
    ("nothing shared here", "completely different words"),
    ("US$5bn deal for Yukos' oil arm", "Yukos sells oil arm in $5bn deal"),
    ("the the the the", "the cat and the hat"),  # clipped counts
    ("Café owner's 2-for-1 offer", "CAFE owner offers 2 for 1"),  # non-ASCII letters split words, as there
]


def reference_scores(prediction: str, reference: str) -> tuple[float, float, float]:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    got = scorer.score(reference, prediction)  # rouge-score takes (target, prediction)
    return got["rouge1"].fmeasure, got["rouge2"].fmeasure, got["rougeL"].fmeasure


def ours(prediction: str, reference: str) -> tuple[float, float, float]:
    return rouge_n(prediction, reference, 1), rouge_n(prediction, reference, 2), rouge_l(prediction, reference)


@pytest.mark.parametrize(("prediction", "reference"), HAND_PAIRS)
def test_matches_rouge_score_on_hand_pairs(prediction, reference):
    assert ours(prediction, reference) == pytest.approx(reference_scores(prediction, reference), abs=1e-12)


def test_tokens_and_lcs():
    assert rouge_tokens("Blair's U-turn: 10% more!") == ["blair", "s", "u", "turn", "10", "more"]
    assert lcs_length("abcbdab", "bdcaba") == 4
    assert lcs_length([], ["a"]) == 0


def test_corpus_score_is_the_mean_of_pair_scores():
    predictions, references = zip(*HAND_PAIRS)
    got = rouge_scores(list(predictions), list(references))
    expected = [reference_scores(p, r) for p, r in HAND_PAIRS]
    for i, key in enumerate(("rouge1", "rouge2", "rougeL")):
        assert got[key] == pytest.approx(sum(e[i] for e in expected) / len(expected), abs=1e-12)
    assert got["examples"] == len(HAND_PAIRS)
    with pytest.raises(ValueError, match="one of each"):
        rouge_scores(["a"], [])


@pytest.mark.assets
def test_matches_rouge_score_on_bbc_headlines():
    """First sentences of real BBC articles scored against their headlines (the headline task's baseline),
    and headlines against other headlines, so overlaps of every size occur."""
    from deltaformer.data.tasks import load_seq2seq_task

    test = load_seq2seq_task("bbc-headlines").split("test")[:60]
    pairs = [(p.source.split(". ")[0], p.target) for p in test]
    pairs += [(a.target, b.target) for a, b in zip(test, test[1:])]
    for prediction, reference in pairs:
        assert ours(prediction, reference) == pytest.approx(reference_scores(prediction, reference), abs=1e-12), \
            (prediction, reference)
    assert any(rouge_n(p, r, 2) > 0 for p, r in pairs)  # the comparison covered bigram overlaps too
