"""The ``tokenizer train`` and ``pretrain`` verbs end to end on a small text file, and their bad input."""

from __future__ import annotations

import json
import random

import pytest

from deltaformer.cli.main import main
from deltaformer.data.corpus import load_documents
from deltaformer.data.tabular import DataError

WORDS = "the a cat dog sat ran on under mat log big small red blue quickly slowly jumped played".split()


def _corpus(path, docs=60, seed=0):
    rng = random.Random(seed)
    blocks = ["\n".join(" ".join(rng.choices(WORDS, k=rng.randint(4, 10))) for _ in range(rng.randint(2, 6)))
              for _ in range(docs)]
    path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    return path


def test_tokenizer_train_then_pretrain_saves_a_model_transformers_loads(tmp_path, capsys):
    import torch
    import transformers

    text = _corpus(tmp_path / "corpus.txt")
    assert main(["tokenizer", "train", "--kind", "wordpiece", "--vocab-size", "200", "--min-frequency", "1",
                 "--text", str(text), "--out", str(tmp_path / "tok")]) == 0
    assert "MB/s" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["pretrain", "--size", "tiny", "--text", str(text), "--tokenizer", str(tmp_path / "tok"),
                 "--max-steps", "2", "--batch-size", "8", "--max-length", "32", "--whole-word",
                 "--no-progress", "--out", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 2 and results["pairs"] > 20
    assert {"mlm_accuracy", "nsp_accuracy", "loss"} <= set(results["validation"])
    hf = transformers.BertForPreTraining.from_pretrained(run / "model").eval()
    from deltaformer.models import BertForPreTraining

    ours = BertForPreTraining.from_pretrained(run / "model")
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).prediction_logits, atol=1e-5, rtol=1e-5)
    assert main(["pretrain", "--size", "tiny", "--text", str(text), "--out", str(run)]) == 2  # not replaced
    assert "already holds a finished run" in capsys.readouterr().err


def test_continued_pretraining_gives_a_headless_checkpoint_a_tied_mlm_head(tmp_path):
    from .conftest import make_hf_bert

    _, path = make_hf_bert(tmp_path / "bare", "BertModel", vocab_size=200)
    text = _corpus(tmp_path / "c.txt")
    assert main(["tokenizer", "train", "--vocab-size", "200", "--min-frequency", "1", "--text", str(text),
                 "--out", str(path)]) == 0
    assert main(["pretrain", "--objective", "mlm", "--from", str(path), "--text", str(text), "--max-steps", "2",
                 "--batch-size", "8", "--max-length", "32", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    from deltaformer.models import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(tmp_path / "run" / "model")
    assert model.mlm_head.word_embeddings[0].weight is model.backbone.embeddings.tokens.weight


def test_bad_input(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\nsecond line\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8"):
        load_documents([bad])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no text"):
        load_documents([empty])
    with pytest.raises(DataError, match="no text file or asset"):
        load_documents([tmp_path / "missing.txt"])
    text = _corpus(tmp_path / "c.txt")
    assert main(["pretrain", "--size", "tiny", "--text", str(text), "--max-length", "1024", "--vocab-size", "100",
                 "--out", str(tmp_path / "r")]) == 2
    assert "above the model's 512 positions" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--kind", "bpe", "--vocab-size", "300", "--min-frequency", "1", "--text",
                 str(text), "--out", str(tmp_path / "bpe")]) == 0
    assert main(["pretrain", "--size", "tiny", "--text", str(text), "--tokenizer", str(tmp_path / "bpe"),
                 "--out", str(tmp_path / "r2")]) == 2
    assert "no mask token" in capsys.readouterr().err
