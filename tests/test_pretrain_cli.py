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
    assert "above the 512 positions of --size tiny" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--kind", "bpe", "--vocab-size", "300", "--min-frequency", "1", "--text",
                 str(text), "--out", str(tmp_path / "bpe")]) == 0
    assert main(["pretrain", "--size", "tiny", "--text", str(text), "--tokenizer", str(tmp_path / "bpe"),
                 "--out", str(tmp_path / "r2")]) == 2
    assert f"the tokenizer of {tmp_path / 'bpe'} has no mask token" in capsys.readouterr().err
    assert main(["pretrain", "--size", "tiny", "--text", str(empty), "--out", str(tmp_path / "r3")]) == 2
    assert f"{empty} hold(s) no text" in capsys.readouterr().err


def _clm_spec(tmp_path, text, out, **train):
    from deltaformer.train.pretrain import PretrainSpec
    from deltaformer.train.trainer import TrainConfig

    settings = dict(lr=3e-3, metric="loss", batch_size=8, max_steps=30, progress=False, eval_every=10, seed=3)
    settings.update(train)
    return PretrainSpec("clm", [str(text)], out, size="tiny", vocab_size=300, max_length=32, evaluate_first=True,
                        train=TrainConfig(**settings))


def test_clm_pretraining_packs_blocks_lowers_the_loss_and_saves_a_gpt2_transformers_loads(tmp_path):
    import torch
    import transformers

    from deltaformer.models import GPT2LMHeadModel
    from deltaformer.train.pretrain import pretrain

    text = _corpus(tmp_path / "c.txt", docs=80)
    results = pretrain(_clm_spec(tmp_path, text, tmp_path / "run"))
    assert results["objective"] == "clm" and results["documents"] == 80 and results["steps"] == 30
    # packed: every block but the last is full, and the blocks hold every token of the text plus one eos each
    assert results["tokens"] >= 32 * (results["blocks"] - 1)
    assert results["validation"]["loss"] < results["initial_validation"]["loss"] - 1.0
    ours = GPT2LMHeadModel.from_pretrained(tmp_path / "run" / "model").eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "run" / "model").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_clm_pretraining_interrupted_then_resumed_ends_with_the_same_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from deltaformer.train import trainer as trainer_module
    from deltaformer.train.pretrain import pretrain

    text = _corpus(tmp_path / "c.txt", docs=40)
    pretrain(_clm_spec(tmp_path, text, tmp_path / "ref", max_steps=6, save_every=1, eval_every=3))
    save = trainer_module.Trainer._save

    def save_then_stop(self, path, model, optimizer, scheduler, generator, progress):
        save(self, path, model, optimizer, scheduler, generator, progress)
        if progress.global_step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module.Trainer, "_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        pretrain(_clm_spec(tmp_path, text, tmp_path / "run", max_steps=6, save_every=1, eval_every=3))
    monkeypatch.setattr(trainer_module.Trainer, "_save", save)
    spec = _clm_spec(tmp_path, text, tmp_path / "run", max_steps=6, save_every=1, eval_every=3)
    spec.resume = True
    results = pretrain(spec)
    assert results["steps"] == 6
    expected = load_file(tmp_path / "ref" / "model" / "model.safetensors")
    got = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert expected.keys() == got.keys() and all(bool((expected[k] == got[k]).all()) for k in expected)


def test_clm_from_the_command_line_with_a_llama_config_and_bad_configs(tmp_path, capsys):
    text = _corpus(tmp_path / "c.txt", docs=30)
    config = tmp_path / "llama.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                  "max_position_embeddings": 64, "vocab_size": 10}))
    assert main(["pretrain", "--objective", "clm", "--config", str(config), "--text", str(text), "--vocab-size",
                 "300", "--max-steps", "2", "--batch-size", "4", "--max-length", "32", "--no-progress", "--out",
                 str(tmp_path / "run")]) == 0
    assert "blocks of up to 32 tokens" in capsys.readouterr().out
    from deltaformer.models import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert model.config.vocab_size == 300 and model.config.num_hidden_layers == 1
    assert main(["pretrain", "--objective", "clm", "--config", str(config), "--text", str(text), "--max-length",
                 "128", "--out", str(tmp_path / "r2")]) == 2
    assert f"above the 64 positions of {config}" in capsys.readouterr().err
    bert = tmp_path / "bert.json"
    bert.write_text(json.dumps({"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "intermediate_size": 64}))
    assert main(["pretrain", "--objective", "clm", "--config", str(bert), "--text", str(text), "--out",
                 str(tmp_path / "r3")]) == 2
    assert "--objective clm trains decoder LMs" in capsys.readouterr().err
