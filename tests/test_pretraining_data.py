"""Masked-LM masking (rates, never specials or padding, whole words), next-sentence pairs, and the
pretraining loss against transformers' BertForPreTraining on the same masks and pairs."""

from __future__ import annotations

import random

import pytest
import torch

from deltaformer.data.masking import MaskingConfig, MaskingVocab, mask_tokens
from deltaformer.data.nsp import IS_NEXT, PairStats, PretrainingCollator, make_pairs, truncate_longest_first
from deltaformer.data.tabular import DataError
from deltaformer.models import BertForPreTraining

from .conftest import make_hf_bert

SPECIALS = (0, 1, 2, 3, 4)  # pad, unk, cls, sep, mask
VOCAB = MaskingVocab(mask_token_id=4, vocab_size=30_000, special_ids=SPECIALS, continuation_ids=tuple(range(20_000, 30_000)))


def _batch(rows=1000, cols=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 30_000, (rows, cols), generator=g)
    ids[:, 0], ids[:, cols // 2] = 2, 3  # [CLS] ... [SEP]
    lengths = torch.randint(cols // 2, cols + 1, (rows,), generator=g)
    mask = (torch.arange(cols) < lengths[:, None]).long()
    ids[mask == 0] = 0
    return ids, mask


def test_mlm_rates_over_a_million_tokens_and_never_specials_or_padding():
    ids, mask = _batch()
    masked, labels = mask_tokens(ids, VOCAB, MaskingConfig(), mask, torch.Generator().manual_seed(1))
    eligible = (mask == 1) & ~torch.isin(ids, torch.tensor(SPECIALS))
    picked = labels != -100
    assert int(eligible.sum()) > 700_000
    assert not (picked & ~eligible).any()  # specials and padding are never picked
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(masked[~picked], ids[~picked])  # nothing else changes
    n = int(picked.sum())
    rate = n / int(eligible.sum())
    to_mask = int((masked[picked] == 4).sum()) / n
    kept = int((masked[picked] == ids[picked]).sum()) / n
    assert abs(rate - 0.15) < 0.005
    assert abs(to_mask - 0.80) < 0.005
    assert abs(kept - 0.10) < 0.005
    assert abs((1 - to_mask - kept) - 0.10) < 0.005


def test_whole_word_masking_picks_words_as_units():
    ids, mask = _batch(200, 1000)
    masked, labels = mask_tokens(ids, VOCAB, MaskingConfig(whole_word=True), mask, torch.Generator().manual_seed(2))
    picked = labels != -100
    eligible = (mask == 1) & ~torch.isin(ids, torch.tensor(SPECIALS))
    cont = torch.isin(ids, torch.tensor(VOCAB.continuation_ids))
    prev_eligible = torch.nn.functional.pad(eligible, (1, 0))[:, :-1]
    prev_picked = torch.nn.functional.pad(picked, (1, 0))[:, :-1]
    inside = eligible & cont & prev_eligible  # a continuation piece of the word before it
    assert torch.equal(picked[inside], prev_picked[inside])  # pieces share their word's fate
    assert not (picked & ~eligible).any()
    assert abs(int(picked.sum()) / int(eligible.sum()) - 0.15) < 0.01


def test_masking_is_deterministic_under_a_seed_and_checks_its_rates():
    ids, mask = _batch(8, 64)
    a = mask_tokens(ids, VOCAB, attention_mask=mask, generator=torch.Generator().manual_seed(3))
    b = mask_tokens(ids, VOCAB, attention_mask=mask, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(DataError, match="exceed 1"):
        MaskingConfig(mask_ratio=0.9, random_ratio=0.2)
    with pytest.raises(Exception, match="probability"):
        MaskingConfig(probability=1.5)


def _documents(n_docs=400, seed=0):
    rng = random.Random(seed)
    docs, token = [], 10
    for _ in range(n_docs):
        doc = []
        for _ in range(rng.randint(2, 12)):
            length = rng.randint(3, 20)
            doc.append(list(range(token, token + length)))  # ids are unique across the corpus: traceable
            token += length
        docs.append(doc)
    return docs


def test_next_sentence_pairs_half_positive_structure_and_truncation():
    docs = _documents(400) + [[[7, 8, 9]], []]  # two documents with fewer than two segments
    stats = PairStats()
    pairs: list = []
    seed = 0
    while len(pairs) < 100_000:
        pairs += make_pairs(docs, 64, cls_token_id=2, sep_token_id=3, seed=seed, stats=stats)
        seed += 1
    assert stats.skipped_documents == 2 * seed
    assert abs(stats.positive_rate - 0.5) < 0.01
    assert abs(sum(p.next_sentence_label == IS_NEXT for p in pairs) / len(pairs) - 0.5) < 0.01
    for p in pairs[:2000]:
        ids = p.input_ids
        assert len(ids) <= 64 and ids[0] == 2 and ids[-1] == 3 and ids.count(3) == 2
        sep = ids.index(3)
        assert p.token_type_ids == [0] * (sep + 1) + [1] * (len(ids) - sep - 1)
        a, b = ids[1:sep], ids[sep + 1:-1]
        assert a and b
        if p.next_sentence_label == IS_NEXT:  # B continues A in the same document (ids consecutive)
            assert b[0] > a[-1]
            assert all(y == x + 1 for x, y in zip(a, a[1:]))


def test_truncation_is_longest_first():
    a, b = truncate_longest_first(list(range(10)), list(range(4)), 8)
    assert (len(a), len(b)) == (4, 4) and a == [0, 1, 2, 3]
    a, b = truncate_longest_first([1], list(range(20)), 5)
    assert (len(a), len(b)) == (1, 4)


def test_pairs_need_two_documents_of_two_segments():
    with pytest.raises(DataError, match="at least two such documents"):
        make_pairs([[[5, 6], [7]], [[8]]], 32, 2, 3)


def test_tokenizer_without_mask_token_is_refused():
    from deltaformer.tokenizer import train_tokenizer

    bpe = train_tokenizer(["some text here", "and more text"], kind="bpe", vocab_size=300, min_frequency=1)
    with pytest.raises(DataError, match="no mask token"):
        MaskingVocab.from_tokenizer(bpe)
    wp = train_tokenizer(["playing played player", "plays the game"] * 20, kind="wordpiece", vocab_size=120,
                         min_frequency=1)
    vocab = MaskingVocab.from_tokenizer(wp)
    assert vocab.mask_token_id == wp.mask_token_id and wp.pad_token_id in vocab.special_ids
    assert vocab.continuation_ids  # ## pieces were learned


def test_pretraining_loss_equals_transformers(tmp_path):
    hf, path = make_hf_bert(tmp_path, "BertForPreTraining")
    ours = BertForPreTraining.from_pretrained(path)
    docs = [[[t % 90 + 5 for t in seg] for seg in doc] for doc in _documents(20)]
    pairs = make_pairs(docs, 32, cls_token_id=2, sep_token_id=3, seed=0)[:8]
    vocab = MaskingVocab(mask_token_id=4, vocab_size=99, special_ids=SPECIALS)
    batch = PretrainingCollator(vocab, pad_token_id=0, generator=torch.Generator().manual_seed(0))(pairs)
    assert (batch["labels"] != -100).any() and batch["next_sentence_label"].sum() not in (0, 8)
    with torch.no_grad():
        expected = hf(**batch).loss
        got = ours(**batch).loss
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_training_runs_the_mlm_head_on_picked_positions_only_with_the_same_loss_and_gradients(tmp_path):
    hf, path = make_hf_bert(tmp_path, "BertForPreTraining", hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
    ours = BertForPreTraining.from_pretrained(path)
    docs = [[[t % 90 + 5 for t in seg] for seg in doc] for doc in _documents(20)]
    pairs = make_pairs(docs, 32, cls_token_id=2, sep_token_id=3, seed=0)[:8]
    vocab = MaskingVocab(mask_token_id=4, vocab_size=99, special_ids=SPECIALS)
    batch = PretrainingCollator(vocab, pad_token_id=0, generator=torch.Generator().manual_seed(0))(pairs)
    hf.train(), ours.train()
    expected = hf(**batch).loss
    out = ours(**batch)
    picked = int((batch["labels"] != -100).sum())
    assert out.logits.shape == (picked, 99)  # only the picked positions reach the vocabulary projection
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)
    expected.backward()
    out.loss.backward()
    torch.testing.assert_close(ours.backbone.embeddings.tokens.weight.grad,
                               hf.bert.embeddings.word_embeddings.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.mlm_head.bias.grad, hf.cls.predictions.bias.grad, atol=1e-6, rtol=1e-4)
    ours.eval()
    with torch.no_grad():
        assert ours(**batch).logits.shape == (*batch["input_ids"].shape, 99)  # eval: every position
