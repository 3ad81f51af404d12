"""Tokenizer: HF parity (``transformers`` is the reference, test-only), loading, saving, training, errors.

Offline tests build a tiny BERT vocab.txt; ``assets`` tests use the real MiniLM tokenizer and 300 real
movie-review sentences (rt-polarity).
"""

from __future__ import annotations

import csv
import json
import pickle
import shutil
import threading

import pytest

from deltaformer.errors import DeltaformerError
from deltaformer.tokenizer import VERY_LARGE_INTEGER, AutoTokenizer, Encoding, TokenizerError, train_tokenizer

transformers = pytest.importorskip("transformers")

KEYS = ("input_ids", "token_type_ids", "attention_mask")
STRATEGIES = ("longest_first", "only_first", "only_second")

TINY_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]"]
    + "the rock is hello world cafe café play new conan naive resume résumé Hello Café un ##s ##ing ##ed ##a ##b ##e".split()
    + list("abcdefghijklmnopqrstuvwxyz")
    + list(".,!?'\"-()")
    + ["中", "文", "字"]
)
HELLO, WORLD, THE, ROCK = (TINY_VOCAB.index(w) for w in ("hello", "world", "the", "rock"))
TEXTS = [
    "Hello world, the rock is playing!",
    "Café naïve résumé — played the new CONAN?",
    "中文字 and 中文 mixed with words",
    "  lots   of\twhite\nspace  ",
    "[CLS] hello [MASK] world [SEP]",
    'punctuation!!! (un-played) "quoted" it\'s',
    "zzzzqqq xyzzy unknownword ÀÉÎÕÜ",
    "a" * 120,
    "hello\x00world\ufffd control\u200bchars",
    "",
]


def plain(value):
    """Lists from lists, tensors or arrays, so results of either library compare with ==."""
    return value.tolist() if hasattr(value, "tolist") else value


def assert_same(ours, theirs, keys=KEYS):
    for key in keys:
        assert plain(ours[key]) == plain(theirs[key]), key


def call_both(ours, theirs, *args, **kwargs):
    """Call both tokenizers; both must fail (ours with TokenizerError) or both give the same encoding."""
    try:
        expected = theirs(*args, **kwargs)
    except Exception:
        with pytest.raises(TokenizerError):
            ours(*args, **kwargs)
        return False
    assert_same(ours(*args, **kwargs), expected)
    return True


def write_vocab_dir(path, lowercase=True, **config):
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    config = {"do_lower_case": lowercase, "tokenizer_class": "BertTokenizer", **config}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def hf_python_tokenizer(directory):
    """HF's pure-Python BERT tokenizer: an implementation independent of the ``tokenizers`` library."""
    cls = getattr(transformers, "BertTokenizerLegacy", None) or transformers.BertTokenizer  # v5 / v4 names
    return cls.from_pretrained(directory)


@pytest.fixture(params=[True, False], ids=["uncased", "cased"])
def tiny_dir(tmp_path, request):
    return write_vocab_dir(tmp_path / "tiny", lowercase=request.param)


# ---- vocab.txt pipeline against HF --------------------------------------------------------------------


def test_vocab_txt_matches_hf_fast(tiny_dir):
    # from_pretrained: transformers 5 ignores BertTokenizerFast(vocab_file=...) and builds a 5-token vocab
    ours, hf = (
        AutoTokenizer.from_pretrained(tiny_dir),
        transformers.BertTokenizerFast.from_pretrained(tiny_dir),
    )
    pairs = list(zip(TEXTS, TEXTS[1:] + TEXTS[:1]))
    for text in TEXTS:
        assert_same(ours(text), hf(text))
        assert_same(ours(text, add_special_tokens=False), hf(text, add_special_tokens=False))
        assert ours.tokenize(text) == hf.tokenize(text)
        assert ours.encode(text) == hf.encode(text)
        for strategy in ("longest_first", "only_first"):
            call_both(ours, hf, text, truncation=strategy, max_length=5)
    for a, b in pairs:
        if not b:  # see test_empty_second_text_is_still_a_pair
            continue
        assert_same(ours(a, b), hf(a, b))
        for strategy in STRATEGIES:
            for max_length in (4, 7, 12):
                call_both(ours, hf, a, b, truncation=strategy, max_length=max_length)
    firsts, seconds = [a for a, _ in pairs], [b for _, b in pairs]
    assert_same(ours(TEXTS), hf(TEXTS))
    assert_same(ours(TEXTS, padding=True), hf(TEXTS, padding=True))
    assert_same(ours(firsts, seconds, padding=True), hf(firsts, seconds, padding=True))
    assert_same(ours(pairs, padding=True), hf(pairs, padding=True))  # a batch of (text, pair) tuples
    assert_same(
        ours(firsts, seconds, padding="max_length", truncation=True, max_length=9, return_tensors="pt"),
        hf(firsts, seconds, padding="max_length", truncation=True, max_length=9, return_tensors="pt"),
    )
    assert_same(
        ours(TEXTS, padding="max_length", max_length=40), hf(TEXTS, padding="max_length", max_length=40)
    )


def test_vocab_txt_matches_hf_pure_python_tokenizer(tiny_dir):
    """The pure-Python reference is independent of ``tokenizers``; it differs on pair truncation, so no pairs
    are truncated here (see test_pair_truncation_follows_the_fast_tokenizer)."""
    ours, ref = AutoTokenizer.from_pretrained(tiny_dir), hf_python_tokenizer(tiny_dir)
    for a, b in zip(TEXTS, TEXTS[1:] + TEXTS[:1]):
        assert ours.tokenize(a) == ref.tokenize(a)
        assert_same(ours(a, b), ref(a, b, return_token_type_ids=True))
        assert_same(
            ours(a, truncation=True, max_length=6),
            ref(a, truncation=True, max_length=6, return_token_type_ids=True),
        )


def test_empty_second_text_is_still_a_pair(tmp_path):
    """HF's fast tokenizer drops an empty text_pair for one text but keeps it in batches; we always keep it,
    as HF's Python tokenizer does."""
    directory = write_vocab_dir(tmp_path)
    ours, hf = (
        AutoTokenizer.from_pretrained(directory),
        transformers.BertTokenizerFast.from_pretrained(directory),
    )
    assert ours("hello", "").input_ids == [2, HELLO, 3, 3] == hf(["hello"], [""]).input_ids[0]
    assert ours("hello", "").input_ids == hf_python_tokenizer(directory)("hello", "").input_ids
    assert hf("hello", "").input_ids == [2, HELLO, 3]


def test_pair_truncation_follows_the_fast_tokenizer(tmp_path):
    """longest_first with an odd budget: HF's fast tokenizer (which we follow) gives the spare token to the
    second text, HF's Python one to the first. only_first on a too-short text: fast raises, Python does not."""
    directory = write_vocab_dir(tmp_path)
    ours = AutoTokenizer.from_pretrained(directory)
    ids = ours("a b c d e f g", "h i j k l m n", truncation="longest_first", max_length=17)["input_ids"]
    assert ids == ours("a b c d e f g", "h i j k l m n")["input_ids"]  # fits: nothing removed
    ids = ours("a b c d e f g", "h i j k l m n", truncation="longest_first", max_length=12)["input_ids"]
    assert ours.convert_ids_to_tokens(ids) == ["[CLS]", *"abcd", "[SEP]", *"hijkl", "[SEP]"]
    with pytest.raises(TokenizerError, match="too short"):
        ours("a", "h i j k l m n", truncation="only_first", max_length=6)


def test_decode_matches_hf(tiny_dir):
    ours, hf = (
        AutoTokenizer.from_pretrained(tiny_dir),
        transformers.BertTokenizerFast.from_pretrained(tiny_dir),
    )
    batch = ours(TEXTS, TEXTS[::-1], padding=True, return_tensors="pt")["input_ids"]
    for ids in batch:
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids.tolist(), skip) == hf.decode(ids.tolist(), skip_special_tokens=skip)
    assert ours.batch_decode(batch, skip_special_tokens=True) == hf.batch_decode(
        batch, skip_special_tokens=True
    )
    assert ours.decode(5) == hf.decode(5)
    assert ours.decode([7, 8, 9], clean_up_tokenization_spaces=True) == hf.decode(
        [7, 8, 9], clean_up_tokenization_spaces=True
    )


def test_vocabulary_and_special_tokens_match_hf(tiny_dir):
    ours, hf = (
        AutoTokenizer.from_pretrained(tiny_dir),
        transformers.BertTokenizerFast.from_pretrained(tiny_dir),
    )
    assert ours.get_vocab() == hf.get_vocab()
    assert (len(ours), ours.vocab_size) == (len(hf), hf.vocab_size) == (len(TINY_VOCAB), len(TINY_VOCAB))
    for kind in ("pad", "unk", "cls", "sep", "mask", "bos", "eos"):
        assert getattr(ours, f"{kind}_token") == getattr(hf, f"{kind}_token"), kind
        assert getattr(ours, f"{kind}_token_id") == getattr(hf, f"{kind}_token_id"), kind
    assert set(ours.all_special_tokens) == set(hf.all_special_tokens)
    assert sorted(ours.all_special_ids) == sorted(hf.all_special_ids)
    tokens = ["hello", "##ing", "not-in-vocab", "[MASK]"]
    assert (
        ours.convert_tokens_to_ids(tokens)
        == hf.convert_tokens_to_ids(tokens)
        == [HELLO, TINY_VOCAB.index("##ing"), 1, 4]
    )
    assert ours.convert_tokens_to_ids("rock") == hf.convert_tokens_to_ids("rock")
    assert ours.convert_ids_to_tokens([2, 9, 3]) == hf.convert_ids_to_tokens([2, 9, 3])
    assert ours.convert_ids_to_tokens([2, HELLO, 3], skip_special_tokens=True) == ["hello"]
    assert ours.convert_ids_to_tokens(HELLO) == "hello"
    assert ours.model_max_length == hf.model_max_length == VERY_LARGE_INTEGER


@pytest.mark.filterwarnings("ignore:`max_length` is ignored")
def test_max_length_defaults_follow_hf(tmp_path):
    limited = write_vocab_dir(tmp_path / "limited", model_max_length=8)
    unlimited = write_vocab_dir(tmp_path / "unlimited")  # no model_max_length: HF's "no limit" sentinel
    long_text, batch = "a b c d e f g h i j k l", ["a b c d e f g h i j k l", "a"]
    for directory in (limited, unlimited):
        ours, hf = (
            AutoTokenizer.from_pretrained(directory),
            transformers.BertTokenizerFast.from_pretrained(directory),
        )
        for kwargs in (
            {},
            {"truncation": True},
            {"truncation": "only_first"},
            {"padding": "max_length"},
            {"padding": "max_length", "truncation": True},
            {"max_length": 5},  # max_length alone truncates
            {"max_length": 5, "padding": True},  # ... but not when padding
            {"max_length": 5, "truncation": False},
            {"max_length": 20, "padding": "max_length"},
        ):
            assert_same(ours(batch, **kwargs), hf(batch, **kwargs))
            assert_same(ours(long_text, **kwargs), hf(long_text, **kwargs))
    assert AutoTokenizer.from_pretrained(limited).model_max_length == 8
    assert len(AutoTokenizer.from_pretrained(limited)(long_text, truncation=True)["input_ids"]) == 8


def test_padding_side_and_multiple_follow_hf(tmp_path):
    directory = write_vocab_dir(tmp_path, padding_side="left")
    ours, hf = (
        AutoTokenizer.from_pretrained(directory),
        transformers.BertTokenizerFast.from_pretrained(directory),
    )
    assert ours.padding_side == "left"
    assert_same(ours(TEXTS, padding=True), hf(TEXTS, padding=True))
    assert_same(
        ours(TEXTS, padding=True, padding_side="right"), hf(TEXTS, padding=True, padding_side="right")
    )
    assert_same(
        ours(TEXTS, padding=True, pad_to_multiple_of=8), hf(TEXTS, padding=True, pad_to_multiple_of=8)
    )
    assert len(ours(TEXTS, padding=True, pad_to_multiple_of=8)["input_ids"][0]) % 8 == 0


def test_encoding_container_and_tensors(tmp_path):
    tok = AutoTokenizer.from_pretrained(write_vocab_dir(tmp_path))
    enc = tok("hello world")
    assert isinstance(enc, Encoding) and isinstance(enc, dict)
    assert enc.input_ids == enc["input_ids"] == [2, HELLO, WORLD, 3] and enc.attention_mask == [1, 1, 1, 1]
    with pytest.raises(AttributeError):
        _ = enc.no_such_key
    single = tok("hello world", return_tensors="pt")
    assert tuple(single.input_ids.shape) == (1, 4) and str(single.input_ids.dtype) == "torch.int64"
    assert single.to("cpu").input_ids.tolist() == [[2, HELLO, WORLD, 3]]
    batch = tok(["hello", "hello world"], padding=True, return_tensors="np")
    assert batch["input_ids"].shape == (2, 4) and batch["attention_mask"].tolist() == [
        [1, 1, 1, 0],
        [1, 1, 1, 1],
    ]
    assert tok(["hello"], ["world"])["token_type_ids"] == [[0, 0, 0, 1, 1]]
    assert tok([])["input_ids"] == [] and tuple(tok([], return_tensors="pt").input_ids.shape) == (0, 0)


def test_tokenizer_json_settings_do_not_leak(tmp_path):
    """A tokenizer.json may carry padding/truncation (MiniLM's pads to 128); calls decide, as in HF."""
    tok = AutoTokenizer.from_pretrained(write_vocab_dir(tmp_path / "src"))
    backend = tok.backend_tokenizer
    backend.enable_padding(length=32)
    backend.enable_truncation(max_length=3)
    backend.save(str(tmp_path / "tokenizer.json"))
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tokenizer.json")  # a file path works too
    assert loaded("hello world the rock")["input_ids"] == [2, HELLO, WORLD, THE, ROCK, 3]
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf("hello world the rock")["input_ids"] == [2, HELLO, WORLD, THE, ROCK, 3]


def test_save_pretrained_reloads_in_ours_and_hf(tiny_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    out = tok.save_pretrained(tmp_path / "saved")
    assert {p.name for p in out.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "vocab.txt"}
    assert (out / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1] == TINY_VOCAB
    firsts, seconds = TEXTS, TEXTS[::-1]
    expected = tok(firsts, seconds, padding=True)
    assert_same(AutoTokenizer.from_pretrained(out)(firsts, seconds, padding=True), expected)
    assert_same(transformers.AutoTokenizer.from_pretrained(out)(firsts, seconds, padding=True), expected)
    (out / "tokenizer.json").unlink()  # the vocab.txt written beside it is enough on its own
    assert_same(AutoTokenizer.from_pretrained(out)(firsts, seconds, padding=True), expected)
    assert_same(transformers.AutoTokenizer.from_pretrained(out)(firsts, seconds, padding=True), expected)


# ---- training --------------------------------------------------------------------------------------------

SYNTHETIC = [
    f"The {adj} {noun} {verb} the {adj2} {noun2} near café number {i}."
    for i, (adj, noun, verb, adj2, noun2) in enumerate(
        zip(
            ["quick", "lazy", "happy", "Sad", "bright", "dark"] * 50,
            ["fox", "dog", "cat", "bird", "fish", "horse", "mouse"] * 43,
            ["jumps over", "sees", "chases", "ignores", "likes"] * 60,
            ["small", "large", "red", "blue"] * 75,
            ["tree", "house", "river", "garden", "stone"] * 60,
        )
    )
]


def check_trained(tok, texts, tmp_path, exact_round_trip):
    ids = tok(texts)["input_ids"]
    unk = tok.unk_token_id
    assert all(unk not in row for row in ids)
    for text, row in zip(texts, ids):
        decoded = tok.decode(row, skip_special_tokens=True)
        if exact_round_trip:
            assert decoded == text
        assert tok.encode(decoded) == row  # decoding loses nothing the tokenizer sees
    out = tok.save_pretrained(tmp_path / "trained")
    pairs = (texts[:40], texts[1:41])
    expected = tok(*pairs, padding=True)
    assert_same(AutoTokenizer.from_pretrained(out)(*pairs, padding=True), expected)
    assert_same(transformers.AutoTokenizer.from_pretrained(out)(*pairs, padding=True), expected, KEYS[:1])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert [fast(a, b)["input_ids"] for a, b in zip(*pairs)] == [tok.encode(a, b) for a, b in zip(*pairs)]
    assert fast.decode(ids[0]) == tok.decode(ids[0])


def test_train_wordpiece(tmp_path):
    tok = train_tokenizer(iter(SYNTHETIC), kind="wordpiece", vocab_size=200, min_frequency=2)
    assert tok.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 2, 3, 4)
    assert tok.tokenize("The Quick fox") == ["the", "quick", "fox"]
    enc = tok("the fox", "a dog")
    assert enc.input_ids[0] == 2 and enc.input_ids[-1] == 3 and enc.token_type_ids[-1] == 1
    check_trained(tok, SYNTHETIC, tmp_path, exact_round_trip=False)
    assert json.loads((tmp_path / "trained" / "tokenizer_config.json").read_text())["do_lower_case"] is True


def test_train_bpe_is_byte_level_and_lossless(tmp_path):
    tok = train_tokenizer(SYNTHETIC, kind="bpe", vocab_size=400, lowercase=False)
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert tok.decode(tok.encode("Ünïcödé ✓ never seen 中文")) == "Ünïcödé ✓ never seen 中文"  # bytes: no unk
    enc, short = tok(["the fox jumps", "the"], padding=True), len(tok.encode("the"))
    padded = len(enc.input_ids[0]) - short
    assert enc.attention_mask[1] == [1] * short + [0] * padded and enc.input_ids[1][short:] == [0] * padded
    check_trained(tok, SYNTHETIC, tmp_path, exact_round_trip=True)


def test_train_cased_wordpiece_keeps_case_after_hf_reload(tmp_path):
    """HF's BertTokenizer rebuilds normalization from tokenizer_config.json, so the config must say cased."""
    tok = train_tokenizer(SYNTHETIC, vocab_size=200, lowercase=False)
    out = tok.save_pretrained(tmp_path)
    assert tok.tokenize("Sad fox") == ["Sad", "fox"]
    assert transformers.AutoTokenizer.from_pretrained(out).tokenize("Sad fox") == ["Sad", "fox"]


def test_train_rejects_unknown_kind():
    with pytest.raises(TokenizerError, match="wordpiece"):
        train_tokenizer(["a"], kind="unigram")


# ---- errors and plumbing ---------------------------------------------------------------------------------


def one_line_error(exc_info):
    message = str(exc_info.value)
    assert isinstance(exc_info.value, DeltaformerError) and "\n" not in message
    return message


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError) as err:
        AutoTokenizer.from_pretrained(tmp_path / "missing" / "dir")
    assert "does not exist" in one_line_error(err)
    with pytest.raises(TokenizerError) as err:
        AutoTokenizer.from_pretrained(tmp_path)
    assert "neither tokenizer.json nor vocab.txt" in one_line_error(err)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}')
    with pytest.raises(TokenizerError) as err:
        AutoTokenizer.from_pretrained(tmp_path)
    assert "tokenizer.json is not a valid tokenizers file" in one_line_error(err)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(TokenizerError) as err:
        AutoTokenizer.from_pretrained(tmp_path)
    assert "[UNK]" in one_line_error(err)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError) as err:
        AutoTokenizer.from_pretrained(tmp_path)
    assert "tokenizer_config.json is not valid JSON" in one_line_error(err)


def test_unknown_name_is_a_deltaformer_error():
    with pytest.raises(DeltaformerError):
        AutoTokenizer.from_pretrained("no-such-asset-or-directory-xyz")


def test_call_errors(tmp_path):
    tok = AutoTokenizer.from_pretrained(write_vocab_dir(tmp_path))
    cases = [
        (lambda: tok(["hello", "hello world"], return_tensors="pt"), "padding=True"),
        (lambda: tok("hello", padding="sideways"), "padding="),
        (lambda: tok("hello", truncation="only_middle"), "truncation="),
        (lambda: tok("hello", return_tensors="tf"), "return_tensors"),
        (lambda: tok("hello world", truncation="only_second", max_length=3), "only_second needs text pairs"),
        (lambda: tok(["a", "b"], ["c"]), "as long as text"),
        (lambda: tok("a", ["b"]), "text_pair"),
        (lambda: tok(3), "string"),
    ]
    for call, words in cases:
        with pytest.raises(TokenizerError) as err:
            call()
        assert words in one_line_error(err)
    tok.pad_token = None
    with pytest.raises(TokenizerError, match="no pad token"):
        tok(["a", "b c"], padding=True)


def test_setting_a_special_token_adds_it(tmp_path):
    tok = train_tokenizer(SYNTHETIC, kind="bpe", vocab_size=300)
    tok.pad_token = "<pad>"
    assert tok.pad_token_id == len(tok) - 1 and tok.convert_ids_to_tokens(tok.pad_token_id) == "<pad>"
    assert tok(["the", "the fox"], padding=True)["input_ids"][0][-1] == tok.pad_token_id
    assert "<pad>" in tok.all_special_tokens


def test_pickle_and_concurrent_calls(tmp_path):
    """DataLoader workers pickle the tokenizer; threads share one, each call setting its own padding."""
    tok = pickle.loads(pickle.dumps(AutoTokenizer.from_pretrained(write_vocab_dir(tmp_path))))
    expected = {n: tok(TEXTS, padding="max_length", max_length=n, truncation=True) for n in (20, 40, 60)}
    failures = []

    def work(n):
        for _ in range(30):
            if tok(TEXTS, padding="max_length", max_length=n, truncation=True) != expected[n]:
                failures.append(n)

    threads = [threading.Thread(target=work, args=(n,)) for n in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


# ---- real data: MiniLM tokenizer on real sentences -------------------------------------------------------


@pytest.fixture(scope="session")
def sentences():
    from deltaformer.data.assets import fetch

    with open(fetch("rt-polarity") / "polarity-en-pang&lee2.csv", encoding="utf-8-sig", newline="") as f:
        rows = [row[1].strip() for row in csv.reader(f)]
    assert len(rows) == 4000
    return rows[:300]


@pytest.fixture(scope="session")
def minilm(minilm_dir):
    return AutoTokenizer.from_pretrained(minilm_dir), transformers.AutoTokenizer.from_pretrained(minilm_dir)


@pytest.mark.assets
def test_minilm_matches_hf_single_pairs_batches(minilm, sentences):
    ours, hf = minilm
    for a, b in zip(sentences, sentences[1:]):
        assert_same(ours(a), hf(a))
        assert_same(ours(a, b), hf(a, b))
    assert_same(ours(sentences, padding=True), hf(sentences, padding=True))
    assert_same(
        ours(sentences[:-1], sentences[1:], padding=True, return_tensors="pt"),
        hf(sentences[:-1], sentences[1:], padding=True, return_tensors="pt"),
    )
    assert_same(ours(sentences, padding="max_length"), hf(sentences, padding="max_length"))
    assert len(ours(sentences[0])["input_ids"]) < 128  # tokenizer.json's baked "pad to 128" is not applied


@pytest.mark.assets
def test_minilm_truncation_at_16_matches_hf(minilm, sentences):
    ours, hf = minilm
    succeeded = dict.fromkeys(STRATEGIES, 0)
    for a, b in zip(sentences, sentences[1:]):
        for strategy in STRATEGIES:
            # most real pairs cannot fit by cutting only one side: HF raises, and so do we
            succeeded[strategy] += call_both(ours, hf, a, b, truncation=strategy, max_length=16)
        short = " ".join(b.split()[:3])  # beside a 3-word text, cutting only the long text always fits
        assert call_both(ours, hf, a, short, truncation="longest_first", max_length=16)
        assert call_both(ours, hf, a, short, truncation="only_first", max_length=16)
        assert call_both(ours, hf, short, a, truncation="only_second", max_length=16)
        assert call_both(ours, hf, a, truncation="longest_first", max_length=16)
        assert call_both(ours, hf, a, truncation="only_first", max_length=16)
    assert succeeded["longest_first"] == len(sentences) - 1
    assert succeeded["only_first"] > 10 and succeeded["only_second"] > 10
    assert_same(
        ours(sentences[:-1], sentences[1:], truncation=True, max_length=16, padding="max_length"),
        hf(sentences[:-1], sentences[1:], truncation=True, max_length=16, padding="max_length"),
    )


@pytest.mark.assets
def test_minilm_decode_matches_hf(minilm, sentences):
    ours, hf = minilm
    batch = ours(sentences[:-1], sentences[1:], padding=True)["input_ids"]
    for ids in batch:
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert ours.batch_decode(batch, skip_special_tokens=True) == hf.batch_decode(
        batch, skip_special_tokens=True
    )


@pytest.mark.assets
def test_minilm_vocab_txt_only_matches_hf(minilm_dir, minilm, sentences, tmp_path):
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, tmp_path / name)
    ours = AutoTokenizer.from_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    full = minilm[0]
    assert ours.get_vocab() == hf.get_vocab() == full.get_vocab()
    assert_same(ours(sentences, padding=True), hf(sentences, padding=True))
    assert_same(ours(sentences[:-1], sentences[1:]), hf(sentences[:-1], sentences[1:]))
    assert_same(ours(sentences[:-1], sentences[1:]), full(sentences[:-1], sentences[1:]))
    ids = ours(sentences)["input_ids"]
    assert ours.batch_decode(ids) == hf.batch_decode(ids) == full.batch_decode(ids)


@pytest.mark.assets
def test_minilm_save_then_hf_reload(minilm, sentences, tmp_path):
    ours, _ = minilm
    out = ours.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert hf.model_max_length == 512
    assert_same(
        hf(sentences[:-1], sentences[1:], padding=True), ours(sentences[:-1], sentences[1:], padding=True)
    )
    (tmp_path / "vocab_only").mkdir()
    shutil.copy(out / "vocab.txt", tmp_path / "vocab_only" / "vocab.txt")
    hf_vocab_only = transformers.BertTokenizerFast.from_pretrained(tmp_path / "vocab_only")
    assert hf_vocab_only(sentences)["input_ids"] == ours(sentences)["input_ids"]


@pytest.mark.assets
def test_minilm_by_asset_name(minilm, sentences):
    assert AutoTokenizer.from_pretrained("minilm")(sentences[:5]) == minilm[0](sentences[:5])


@pytest.mark.assets
@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_train_on_real_sentences(kind, sentences, tmp_path):
    tok = train_tokenizer(sentences, kind=kind, vocab_size=2000, min_frequency=2)
    assert 300 < len(tok) <= 2000
    lengths = [len(row) for row in tok(sentences)["input_ids"]]
    assert sum(lengths) < sum(len(s) for s in sentences) / 2  # it learned words, not just characters
    check_trained(tok, sentences, tmp_path, exact_round_trip=kind == "bpe")
