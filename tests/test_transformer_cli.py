"""``deltaformer finetune SIZE --task bbc-headlines`` trains a fresh Transformer and scores ROUGE; ``deltaformer
evaluate RUN`` scores the saved run again, with the same numbers for the same split and search."""

from __future__ import annotations

import json

import pytest
import torch

from deltaformer.cli.main import main
from deltaformer.models.auto import load_model
from deltaformer.models.transformer import TransformerForConditionalGeneration


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_finetune_and_evaluate_headlines(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    code = main(["finetune", "transformer-tiny", "--task", "bbc-headlines", "--method", "full", "--limit", "8",
                 "--max-steps", "2", "--batch-size", "4", "--max-length", "48", "--max-target-length", "8",
                 "--vocab-size", "300", "--beams", "2", "--no-progress", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "bbc-headlines/test: ROUGE-1" in printed and "(beam 2)" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2 and results["split_sizes"] == {"train": 8, "validation": 8, "test": 8}
    assert results["test"]["examples"] == 8 and 0 <= results["test"]["rouge1"] <= 1
    info = json.loads((out / "run.json").read_text())
    assert info["task_type"] == "seq2seq" and info["max_source_length"] == 48
    model = load_model(out / "model")
    assert isinstance(model, TransformerForConditionalGeneration) and model.config.vocab_size <= 300

    assert main(["evaluate", str(out), "--limit", "8", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["data"] == "bbc-headlines/test"
    assert {k: again[k] for k in ("rouge1", "rouge2", "rougeL")} == \
        {k: results["test"][k] for k in ("rouge1", "rouge2", "rougeL")}
    assert main(["evaluate", str(out), "--split", "validation", "--beams", "1", "--limit", "3"]) == 0
    assert "bbc-headlines/validation: ROUGE-1" in capsys.readouterr().out


def test_bad_seq2seq_options_are_one_line_errors(tmp_path, capsys):
    base = ["finetune", "transformer-tiny", "--task", "bbc-headlines", "--out", str(tmp_path / "r")]
    assert main(base) == 2
    assert "pass --method full" in capsys.readouterr().err
    assert main([*base, "--method", "full", "--beams", "0"]) == 2
    assert "beams must be at least 1" in capsys.readouterr().err
    assert main(["finetune", "minilm", "--task", "bbc-headlines", "--method", "full", "--out",
                 str(tmp_path / "m")]) == 2
    assert "not an encoder-decoder" in capsys.readouterr().err
