"""``deltaformer finetune`` on a decoder (last-token classification, ``--objective clm`` on raw text) and
``deltaformer info`` on one, with a tiny random HF Llama and a byte-level BPE tokenizer."""

from __future__ import annotations

import io
import json
import math
import random
from contextlib import redirect_stdout

import pytest
import torch

from deltaformer.cli.main import main
from deltaformer.models import LlamaForCausalLM
from deltaformer.tokenizer import train_tokenizer

from .test_cli_finetune import WORDS, write_csv


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("decoder_cli")
    tokenizer = train_tokenizer([" ".join(WORDS)] * 20, kind="bpe", vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    base = root / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    write_csv(root / "train.csv", 96, seed=1)
    write_csv(root / "test.csv", 24, seed=2)
    rng = random.Random(0)
    (root / "text.txt").write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(40)),
                                   encoding="utf-8")
    return root, base


def run(*argv: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(list(argv)) == 0
    return out.getvalue()


def test_finetune_decoder_classifier_with_lora_reads_the_last_token(workspace, tmp_path):
    root, base = workspace
    run("finetune", str(base), "--train", str(root / "train.csv"), "--test", str(root / "test.csv"),
        "--text-field", "review", "--label-field", "sentiment", "--method", "lora", "--epochs", "4",
        "--batch-size", "8", "--lr", "6e-3", "--warmup-ratio", "0", "--no-progress", "--out", str(tmp_path / "run"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["test"]["accuracy"] >= 0.75  # the words decide the label; chance is 0.5
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    shown = run("predict", str(tmp_path / "run"), "a really good film", "awful plot")
    assert [line.split("\t")[0] in ("pos", "neg") for line in shown.strip().splitlines()] == [True, True]


def test_finetune_clm_on_raw_text_lowers_the_loss_and_saves_a_loadable_model(workspace, tmp_path):
    root, base = workspace
    shown = run("finetune", str(base), "--objective", "clm", "--train", str(root / "text.txt"), "--method", "full",
                "--lr", "3e-3", "--epochs", "3", "--batch-size", "8", "--max-length", "32", "--no-progress",
                "--out", str(tmp_path / "clm"))
    assert "perplexity" in shown
    results = json.loads((tmp_path / "clm" / "results.json").read_text())
    assert results["validation_blocks"] >= 1 and results["block_size"] == 32
    assert results["validation"]["loss"] < math.log(300) - 1.0  # a random model sits near log(vocab)
    trained = LlamaForCausalLM.from_pretrained(tmp_path / "clm" / "model")
    assert trained.load_report.missing == []


def test_finetune_clm_refuses_what_it_cannot_train(workspace, tmp_path, capsys):
    root, base = workspace
    text = ["--train", str(root / "text.txt")]
    for extra, message in ((["--task", "rt-polarity"], "--train FILE.txt"), ([*text, "--method", "probe"], "probe"),
                           ([*text, "--max-length", "999"], "longer than the model's 128")):
        assert main(["finetune", str(base), "--objective", "clm", *extra, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err


def test_info_shows_the_decoder_architecture(workspace):
    _, base = workspace
    report = json.loads(run("info", str(base), "--json"))
    assert report["architecture"] == "LlamaForCausalLM"
    assert report["decoder"]["kv_heads"] == 2 and report["decoder"]["tied_head"] is True
    assert report["parameters"] == LlamaForCausalLM.from_pretrained(base).num_parameters()
    assert "key/value heads" in run("info", str(base))
