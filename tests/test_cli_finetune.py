"""``deltaformer finetune / evaluate / predict / merge / tasks / demo`` on a tiny random BERT and CSV files."""

from __future__ import annotations

import io
import json
import random

import pytest
import torch

from deltaformer.cli.main import main

WORDS = ["good", "great", "fine", "superb", "bad", "awful", "dull", "poor", "the", "film", "movie", "plot", "was",
         "a", "really", "acting", "story", "and"]
POSITIVE, NEGATIVE = WORDS[:4], WORDS[4:8]


def make_base(directory):
    """A random 2-layer HF BERT with a WordPiece vocabulary of the words above (HF format, loads anywhere)."""
    import transformers

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "."]
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(directory)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 64}))
    return directory


def sentence(rng: random.Random, label: str) -> str:
    words = [rng.choice(WORDS[8:]) for _ in range(rng.randint(1, 3))]
    words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
    return " ".join(words)


def write_csv(path, n: int, seed: int, extra_rows: str = "") -> None:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        rows.append(f"{sentence(rng, label)},{label}")
    path.write_text("review,sentiment\n" + "\n".join(rows) + "\n" + extra_rows, encoding="utf-8")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = make_base(root / "base")
    write_csv(root / "train.csv", 96, seed=1)
    write_csv(root / "test.csv", 24, seed=2)
    return root, base


def finetune(root, base, out, method="full", *extra):
    return main(["finetune", str(base), "--train", str(root / "train.csv"), "--test", str(root / "test.csv"),
                 "--text-field", "review", "--label-field", "sentiment", "--method", method, "--epochs", "10",
                 "--batch-size", "8", "--lr", "1e-3", "--warmup-ratio", "0", "--no-progress", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def full_run(workspace):
    root, base = workspace
    assert finetune(root, base, root / "full") == 0
    return root / "full"


@pytest.mark.parametrize("verb", ["tasks", "finetune", "evaluate", "predict", "merge", "demo"])
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0
    assert "usage: deltaformer" in capsys.readouterr().out


def test_full_finetune_writes_a_complete_run_that_transformers_loads(full_run, workspace, capsys):
    import transformers

    root, _ = workspace
    for name in ("run.json", "label2id.json", "metrics.jsonl", "metrics.png", "results.json",
                 "model/config.json", "model/model.safetensors", "model/vocab.txt"):
        assert (full_run / name).is_file(), name
    assert json.loads((full_run / "label2id.json").read_text())["label2id"] == {"neg": 0, "pos": 1}
    results = json.loads((full_run / "results.json").read_text())
    assert results["test"]["examples"] == 24 and results["test"]["accuracy"] >= 0.75
    assert results["split_sizes"] == {"train": 86, "validation": 10, "test": 24}
    hf = transformers.BertForSequenceClassification.from_pretrained(full_run / "model").eval()
    assert hf.config.id2label == {0: "neg", 1: "pos"}
    from deltaformer.train.runs import load_run

    ours = load_run(full_run)
    batch = ours.tokenizer(["the film was superb", "awful plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(ours.model(**batch).logits, hf(**batch).logits, atol=1e-5, rtol=0)


def test_evaluate_and_predict(full_run, workspace, capsys, monkeypatch):
    root, _ = workspace
    assert main(["evaluate", str(full_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 24 and result["data"].endswith("test.csv")
    assert result["accuracy"] == json.loads((full_run / "results.json").read_text())["test"]["accuracy"]

    assert main(["predict", str(full_run), "the film was superb", "awful and dull plot"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["pos", "neg"]
    assert lines[0].split("\t")[1].startswith("neg=0.") and "pos=0." in lines[0]

    (root / "texts.txt").write_text("really great acting\n\npoor story\n")
    assert main(["predict", str(full_run), "--file", str(root / "texts.txt"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == ["pos", "neg"]
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0)

    monkeypatch.setattr("sys.stdin", io.StringIO("a fine movie\n"))
    assert main(["predict", str(full_run), "-"]) == 0
    assert capsys.readouterr().out.startswith("pos\t")


def test_bad_rows_fail_with_file_and_line_or_are_skipped(full_run, workspace, capsys):
    root, base = workspace
    write_csv(root / "odd_test.csv", 5, seed=3, extra_rows="the plot was fine,meh\n")
    assert main(["evaluate", str(full_run), "--test", str(root / "odd_test.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "odd_test.csv:7: unknown label 'meh'" in err
    assert main(["evaluate", str(full_run), "--test", str(root / "odd_test.csv"), "--skip-bad-rows", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["skipped_rows"] == 1 and "skipped 1 bad row" in captured.err

    write_csv(root / "bad_train.csv", 40, seed=4, extra_rows=",pos\n")
    args = ["finetune", str(base), "--train", str(root / "bad_train.csv"), "--text-field", "review",
            "--label-field", "sentiment", "--method", "probe", "--max-steps", "1", "--no-progress"]
    assert main([*args, "--out", str(root / "bad")]) == 2
    assert "bad_train.csv:42: missing or empty text field 'review'" in capsys.readouterr().err
    assert main([*args, "--skip-bad-rows", "--out", str(root / "bad")]) == 0
    assert json.loads((root / "bad" / "results.json").read_text())["skipped_rows"] == 1


def test_probe_run_stores_only_the_head_and_merges_to_a_plain_checkpoint(workspace, capsys):
    root, base = workspace
    out = root / "probe"
    assert finetune(root, base, out, "probe", "--max-steps", "4") == 0
    assert "2 trainable parameters" not in capsys.readouterr().out
    from safetensors.torch import load_file

    assert set(load_file(out / "model" / "trainable.safetensors")) == {"classifier.weight", "classifier.bias"}
    assert main(["evaluate", str(out), "--json"]) == 0
    before = json.loads(capsys.readouterr().out)["accuracy"]
    assert main(["merge", str(out), "--out", str(root / "merged")]) == 0
    capsys.readouterr()
    from deltaformer.models import BertForSequenceClassification

    merged = BertForSequenceClassification.from_pretrained(root / "merged")
    assert merged.config.extra["id2label"] == {"0": "neg", "1": "pos"}
    assert (root / "merged" / "vocab.txt").is_file()
    assert 0.0 <= before <= 1.0


def test_resume_of_a_finished_run_trains_no_further(full_run, workspace, capsys):
    root, base = workspace
    before = json.loads((full_run / "results.json").read_text())
    assert finetune(root, base, full_run, "full", "--resume") == 0
    after = json.loads((full_run / "results.json").read_text())
    assert after["steps"] == before["steps"] and after["test"] == before["test"]
    assert finetune(root, base, full_run, "probe", "--resume") == 2
    assert "was trained with method='full'" in capsys.readouterr().err


def test_merge_refuses_methods_that_add_layers(full_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    info = json.loads((full_run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "method": "prefix"}))
    assert main(["merge", str(run), "--out", str(tmp_path / "m")]) == 2
    assert "cannot be merged" in capsys.readouterr().err


def test_usage_errors_are_one_line(workspace, capsys):
    root, base = workspace
    assert main(["predict", str(root)]) == 2
    assert "not a deltaformer run directory" in capsys.readouterr().err
    assert main(["finetune", str(base), "--train", str(root / "train.csv"), "--method", "full", "--rank", "4",
                 "--out", str(root / "x")]) == 2
    assert "--rank do(es) not apply to --method full" in capsys.readouterr().err
    assert main(["finetune", str(base), "--train", str(root / "train.csv"), "--method", "ptuning2",
                 "--projection", "--out", str(root / "x")]) == 2
    assert "--projection do(es) not apply to --method ptuning2" in capsys.readouterr().err


def test_prefix_projection_is_opt_in():
    """Prefix tuning trains its slots directly by default, as peft does; --projection adds the MLP."""
    import argparse

    from deltaformer.cli.finetune import add_method_args, method_from_args
    from deltaformer.train.methods import delta_config

    parser = argparse.ArgumentParser()
    add_method_args(parser)
    without = delta_config(method_from_args(parser.parse_args(["--method", "prefix"])))
    with_mlp = delta_config(method_from_args(parser.parse_args(["--method", "prefix", "--projection"])))
    assert with_mlp.projection and not without.projection


@pytest.mark.assets
@pytest.mark.slow
def test_demo_smoke_on_real_data(tmp_path, capsys):
    """The demo's whole path on MiniLM + rt-polarity, cut to a few steps (the full demo takes minutes)."""
    assert main(["demo", "--method", "lora", "--max-steps", "3", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and str(tmp_path / "demo" / "metrics.png") in out
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["split_sizes"] == {"train": 3200, "validation": 400, "test": 400} and results["steps"] == 3


def test_lora_run_stores_only_the_delta_and_head_and_merges_exactly(workspace, capsys):
    root, base = workspace
    out = root / "lora"
    assert finetune(root, base, out, "lora", "--rank", "4", "--alpha", "8", "--targets", "query,value") == 0
    capsys.readouterr()
    from safetensors.torch import load_file

    from deltaformer.train.runs import load_run

    stored = load_file(out / "model" / "trainable.safetensors")
    assert {"classifier.weight", "classifier.bias"} <= set(stored) and len(stored) > 2
    assert sum(t.numel() for t in stored.values()) < 10_000  # the delta, not the 30k-parameter base
    results = json.loads((out / "results.json").read_text())
    assert 0 < results["trainable_percent"] < 50
    assert main(["evaluate", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == results["test"]["accuracy"]

    assert main(["merge", str(out), "--out", str(root / "lora_merged")]) == 0
    capsys.readouterr()
    from deltaformer.models import BertForSequenceClassification

    merged = BertForSequenceClassification.from_pretrained(root / "lora_merged")
    run = load_run(out)
    batch = run.tokenizer(["the film was superb", "awful plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, run.model(**batch).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["bitfit", "adapter", "prefix", "ptuning2", "prompt", "ptuning", "ia3"])
def test_every_delta_method_trains_saves_and_reloads_to_the_same_scores(workspace, method, capsys):
    """Each method through the whole CLI path: train, keep the best checkpoint, reload, same test scores."""
    root, base = workspace
    out = root / method
    assert finetune(root, base, out, method, "--epochs", "2") == 0
    capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == method and 0 < results["trainable_percent"] < 100
    assert (out / "delta" / "adapter_config.json").is_file()
    assert main(["evaluate", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == results["test"]["accuracy"]
