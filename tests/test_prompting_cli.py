"""The prompting command lines on the tiny MLM asset and rt-polarity: zero/few-shot evaluation, PET training
and evaluating its run, and bad input (one-line errors, exit status 2)."""

from __future__ import annotations

import json

import pytest

from deltaformer.cli.main import main

pytestmark = [pytest.mark.assets, pytest.mark.slow]

TEMPLATE = "{text} It was {mask}."
WORDS = '{"negative": ["terrible", "bad"], "positive": "great"}'


def evaluate(*extra: str) -> list[str]:
    return ["evaluate", "tiny-mlm", "--task", "rt-polarity", "--limit", "8", *extra]


def test_evaluate_few_shot_with_calibration(capsys):
    assert main(evaluate("--template", TEMPLATE, "--verbalizer", WORDS, "--shots", "2", "--demos", "balanced",
                         "--calibrate", "--json", "--max-length", "160")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 8 and result["shots"] == 2 and 0 <= result["calibrated"]["accuracy"] <= 1


@pytest.mark.parametrize("extra, message", [
    (["--template", "{text} It was", "--verbalizer", WORDS], "has no {mask}"),
    (["--template", TEMPLATE, "--verbalizer", '{"negative": "bad"}'], "lacks class(es) 'positive'"),
    (["--template", TEMPLATE, "--verbalizer", '{"negative": "bad", "positive": "\\u0007"}'], "tokenizes to nothing"),
    (["--template", TEMPLATE, "--verbalizer", '{"negative": "bad",'], "not valid JSON"),
    (["--template", TEMPLATE, "--verbalizer", WORDS, "--shots", "30", "--overflow", "error", "--max-length", "64"],
     "context holds 64"),
])
def test_bad_prompts_are_one_line_errors(extra, message, capsys):
    assert main(evaluate(*extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_pet_run_trains_saves_and_evaluates_the_same(tmp_path, capsys):
    out = tmp_path / "pet"
    assert main(["finetune", "tiny-mlm", "--task", "rt-polarity", "--few-shot", "8", "--template", TEMPLATE,
                 "--template", "{mask}! {text}", "--verbalizer", WORDS, "--max-steps", "2", "--batch-size", "4",
                 "--test-limit", "8", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["test"]["patterns"]) == 2 and sorted(p.name for p in (out / "deltas").iterdir()) == ["pvp0", "pvp1"]
    capsys.readouterr()
    assert main(["evaluate", str(out), "--task", "rt-polarity", "--limit", "8", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["accuracy"] == results["test"]["accuracy"]
    assert [p["accuracy"] for p in again["patterns"]] == [p["accuracy"] for p in results["test"]["patterns"]]


def test_instruction_file_with_a_broken_line_names_it(tmp_path, capsys):
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n', encoding="utf-8")
    assert main(["finetune", "tiny-mlm", "--instructions", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "data.jsonl:2: invalid JSON" in capsys.readouterr().err


def test_pet_with_full_fine_tuning_and_soft_tokens_round_trips(tmp_path, capsys):
    out = tmp_path / "full"
    assert main(["finetune", "tiny-mlm", "--task", "rt-polarity", "--few-shot", "4", "--template",
                 "{soft:2} {text} It was {mask}.", "--verbalizer", WORDS, "--method", "full", "--max-steps", "1",
                 "--batch-size", "4", "--test-limit", "4", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "model" / "model.safetensors").is_file() and (out / "deltas" / "pvp0-soft").is_dir()
    capsys.readouterr()
    assert main(["evaluate", str(out), "--task", "rt-polarity", "--limit", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == results["test"]["accuracy"]


def test_instruction_tuning_a_decoder_then_zero_shot_on_a_task(tmp_path, capsys):
    from deltaformer.tokenizer import train_tokenizer

    from .test_prompting_causal import CORPUS, tiny_gpt2

    tokenizer = train_tokenizer(CORPUS, kind="bpe", vocab_size=300, min_frequency=1, lowercase=False)
    base = tmp_path / "gpt2"
    tiny_gpt2(len(tokenizer.get_vocab())).save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = tmp_path / "data.jsonl"
    rows = [{"instruction": "Is this review positive or negative?", "input": "a good film", "output": "positive"},
            {"messages": [{"role": "user", "content": "a dull story?"}, {"role": "assistant", "content": "negative"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4), encoding="utf-8")
    out = tmp_path / "sft"
    assert main(["finetune", str(base), "--instructions", str(data), "--method", "lora", "--max-steps", "3",
                 "--batch-size", "2", "--max-length", "200", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["examples"] == 8 and results["sequences"] < 8 and (out / "delta" / "adapter_config.json").is_file()
    capsys.readouterr()
    assert main(["evaluate", str(out), "--task", "rt-polarity", "--limit", "4", "--json", "--template",
                 "Review: {text}\nSentiment:", "--verbalizer", '{"negative": "negative", "positive": "positive"}',
                 "--max-length", "128"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 4
    assert main(["finetune", "tiny-mlm", "--instructions", str(data), "--out", str(tmp_path / "mlm")]) == 2
    assert "masked LM" in capsys.readouterr().err
