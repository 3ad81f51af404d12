"""Bad input never gives a silent wrong result or a raw traceback: a one-line error, or a correct result.

One module for every such case, grouped by the part of the library that must catch it; add new cases to the
section of their area (or start a section). Each test is a case that once went wrong: it says what the user
did and what must happen instead. Everything runs on a tiny random BERT, CSV files and the CLI.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from deltaformer.cli.main import main
from deltaformer.errors import CheckpointError, ConfigError, InputError

from .conftest import make_hf_bert
from .test_cli_finetune import make_base, write_csv
from .test_train import config as train_config
from .test_train import tiny_model, toy_data


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny base model and CSV files (``review``, ``sentiment``: pos/neg) shared by the module."""
    root = tmp_path_factory.mktemp("bad_input")
    base = make_base(root / "base")
    write_csv(root / "train.csv", 40, seed=1)
    write_csv(root / "test.csv", 8, seed=2)
    return root, base


def finetune(root: Path, base: Path | str, out: Path, *extra: str, train: Path | None = None,
             test: Path | None = None) -> int:
    """``deltaformer finetune`` on the workspace files: probe, two steps (quick), unless ``extra`` says more."""
    return main(["finetune", str(base), "--train", str(train or root / "train.csv"), "--test",
                 str(test or root / "test.csv"), "--text-field", "review", "--label-field", "sentiment", "--method", "probe",
                 "--max-steps", "2", "--batch-size", "8", "--lr", "1e-3", "--no-progress", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def lora_run(workspace) -> Path:
    """A finished LoRA run (the base has no head, so training starts from a fresh one)."""
    root, base = workspace
    out = root / "lora"
    assert finetune(root, base, out, "--method", "lora", "--rank", "2") == 0
    return out


@pytest.fixture
def run_copy(lora_run, tmp_path) -> Path:
    """A private copy of the finished run, for a test to damage."""
    return Path(shutil.copytree(lora_run, tmp_path / "run"))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# --- data files and labels (data/tabular.py, train/finetune.py) ---------------------------------------------


def test_a_training_file_with_one_class_is_refused_naming_the_label(workspace, tmp_path, capsys):
    """All labels equal used to give num_labels=1, a regression head and validation accuracy 1.0."""
    root, base = workspace
    rows = (root / "train.csv").read_text().replace(",neg\n", ",pos\n")
    (tmp_path / "one.csv").write_text(rows)
    assert finetune(root, base, tmp_path / "run", train=tmp_path / "one.csv", test=tmp_path / "one.csv") == 2
    err = one_line_error(capsys)
    assert "'pos'" in err and "at least two" in err
    assert not (tmp_path / "run").exists()


def test_the_task_type_is_saved_with_the_run(lora_run):
    """The loss follows the task type, recorded in run.json and in the model's config (HF's problem_type)."""
    assert json.loads((lora_run / "run.json").read_text())["task_type"] == "classification"
    config = json.loads((lora_run / "model" / "config.json").read_text())
    assert config["problem_type"] == "single_label_classification"


def test_the_loss_follows_the_problem_type_not_the_number_of_labels(tmp_path):
    """A one-output head is regression only when the config says so (as in HF); a one-class classifier is
    refused instead of silently switching to a mean squared error."""
    import transformers

    from deltaformer.models import BertForSequenceClassification

    ids = torch.randint(1, 99, (4, 9))
    for problem, num_labels, labels in (("regression", 1, torch.randn(4)), ("regression", 3, torch.randn(4, 3)),
                                        ("multi_label_classification", 3, torch.randint(0, 2, (4, 3)).float()),
                                        ("single_label_classification", 3, torch.tensor([0, 2, 1, 2]))):
        hf, path = make_hf_bert(tmp_path / f"{problem}{num_labels}", "BertForSequenceClassification",
                                num_labels=num_labels, problem_type=problem, hidden_dropout_prob=0.0)
        ours = BertForSequenceClassification.from_pretrained(path)
        assert ours.config.problem_type == problem
        with torch.no_grad():
            torch.testing.assert_close(ours(ids, labels=labels).loss, hf(ids, labels=labels).loss, atol=1e-5, rtol=0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=37, num_labels=1)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "one")
    one = BertForSequenceClassification.from_pretrained(tmp_path / "one")
    with pytest.raises(InputError, match="at least two labels.*problem_type='regression'"):
        one(ids, labels=torch.zeros(4, dtype=torch.long))


def test_numeric_spellings_of_one_label_are_one_class(tmp_path):
    """'1' and '1.0', '0' and '0.0' (a float column in a spreadsheet) used to become four classes."""
    from deltaformer.data.tabular import LabelMap, read_table

    (tmp_path / "d.csv").write_text("text,label\na,1\nb,1.0\nc,0\nd,0.0\ne,2.50\nf,2.5\n")
    labels = LabelMap.from_examples(read_table(tmp_path / "d.csv").examples)
    assert labels.labels == ["0", "1", "2.5"]
    (tmp_path / "t.jsonl").write_text('{"text": "x", "label": 1.0}\n{"text": "y", "label": "0.00"}\n')
    assert [labels.encode(e) for e in read_table(tmp_path / "t.jsonl").examples] == [1, 0]


@pytest.mark.parametrize(("rows", "clash"), [
    ('{"text": "a", "label": true}\n{"text": "b", "label": 1}\n{"text": "c", "label": false}\n'
     '{"text": "d", "label": 0}\n', ("'1'", "'true'")),
    ('{"text": "a", "label": "pos"}\n{"text": "b", "label": "Pos"}\n{"text": "c", "label": "neg"}\n', ("'Pos'", "'pos'")),
    ('{"text": "a", "label": "01"}\n{"text": "b", "label": "1"}\n{"text": "c", "label": "2"}\n', ("'01'", "'1'")),
], ids=["json-true-and-1", "case", "leading-zero"])
def test_labels_that_look_like_spellings_of_each_other_are_refused(tmp_path, rows, clash):
    """JSON true next to 1 (or 'Pos' next to 'pos') used to add classes without a word."""
    from deltaformer.data.tabular import DataError, LabelMap, read_table

    (tmp_path / "d.jsonl").write_text(rows)
    with pytest.raises(DataError, match="look like spellings of one") as error:
        LabelMap.from_examples(read_table(tmp_path / "d.jsonl").examples)
    assert all(name in str(error.value) for name in clash) and "d.jsonl:" in str(error.value)


def test_a_csv_field_longer_than_the_csv_modules_limit_loads(tmp_path):
    """A valid 2 MB text was refused as malformed CSV (the csv module's 128 KiB field limit); JSONL took it."""
    from deltaformer.data.tabular import read_table

    text = "word " * 400_000
    (tmp_path / "long.csv").write_text(f'text,label\n"{text}",pos\nshort,neg\n')
    examples = read_table(tmp_path / "long.csv").examples
    assert [len(e.text) for e in examples] == [len(text.strip()), 5]


# --- training and resume (train/trainer.py, train/finetune.py) ----------------------------------------------


@pytest.fixture(scope="module")
def probe_run(workspace) -> Path:
    """A finished two-step probe run that resume tests try to continue with other settings."""
    root, base = workspace
    out = root / "probe"
    assert finetune(root, base, out) == 0
    return out


def test_resume_with_changed_settings_is_refused_listing_every_difference(workspace, probe_run, capsys):
    """--resume with another --lr, --seed or schedule used to keep the old schedule and rewrite run.json."""
    root, base = workspace
    before = (probe_run / "run.json").read_text()
    assert finetune(root, base, probe_run, "--resume", "--lr", "0.5", "--seed", "3", "--schedule", "cosine",
                    "--batch-size", "4") == 2
    err = one_line_error(capsys)
    for difference in ("lr=0.001 (now 0.5)", "seed=0 (now 3)", "schedule='linear' (now 'cosine')",
                       "batch_size=8 (now 4)"):
        assert difference in err, err
    assert (probe_run / "run.json").read_text() == before


def test_resume_cannot_extend_a_finished_run(workspace, probe_run, capsys):
    """--resume --max-steps 4 on a finished 2-step run used to train at learning rate 0 and change nothing."""
    root, base = workspace
    assert finetune(root, base, probe_run, "--resume", "--max-steps", "4") == 2
    err = one_line_error(capsys)
    assert "max_steps=2 (now 4)" in err and "start a new run" in err


def test_trainer_resume_refuses_a_checkpoint_made_with_other_settings(tmp_path):
    """The trainer itself checks: its checkpoint records the settings that shaped the run."""
    from deltaformer.data.collate import PadCollator
    from deltaformer.train import Trainer

    Trainer(tiny_model(), train_config(max_steps=2), toy_data(8), PadCollator(), tmp_path).train()
    with pytest.raises(ConfigError, match=r"lr=0\.003 \(now 0\.01\).*warmup_ratio=0\.06 \(now 0\.5\)"):
        Trainer(tiny_model(), train_config(max_steps=2, lr=1e-2, warmup_ratio=0.5), toy_data(8), PadCollator(),
                tmp_path).train(resume=True)
    # settings that do not shape the run (where it runs, how often it logs or saves) may change
    Trainer(tiny_model(), train_config(max_steps=2, log_every=1, save_every=1, device="cpu"), toy_data(8),
            PadCollator(), tmp_path).train(resume=True)


def test_resume_removes_temporary_files_a_killed_write_left(tmp_path):
    """A kill inside a checkpoint write leaves .checkpoint.safetensors.XXXXXXXX.tmp; resuming removes it."""
    from deltaformer.data.collate import PadCollator
    from deltaformer.train import Trainer

    Trainer(tiny_model(), train_config(max_steps=1), toy_data(8), PadCollator(), tmp_path).train()
    orphans = [tmp_path / ".checkpoint.safetensors.k2j4_5g6.tmp", tmp_path / ".best.safetensors.a1b2c3d4.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"half a checkpoint")
    (tmp_path / "notes.tmp").write_text("the user's own file")
    Trainer(tiny_model(), train_config(max_steps=1), toy_data(8), PadCollator(), tmp_path).train(resume=True)
    assert not any(orphan.exists() for orphan in orphans)
    assert (tmp_path / "notes.tmp").is_file()


# --- run directories and the command line (train/runs.py, cli/) ---------------------------------------------


def test_out_at_an_existing_run_is_refused_without_resume_or_overwrite(workspace, tmp_path, capsys):
    """--out at a finished run used to overwrite its weights and checkpoint silently."""
    root, base = workspace
    out = tmp_path / "run"
    assert finetune(root, base, out) == 0
    weights = (out / "model" / "trainable.safetensors").read_bytes()
    capsys.readouterr()
    assert finetune(root, base, out, "--seed", "1") == 2
    err = one_line_error(capsys)
    assert "finished run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "model" / "trainable.safetensors").read_bytes() == weights
    assert finetune(root, base, out, "--seed", "1", "--overwrite") == 0
    assert json.loads((out / "run.json").read_text())["train_config"]["seed"] == 1
    assert (out / "model" / "trainable.safetensors").read_bytes() != weights


def test_out_naming_an_existing_file_is_a_one_line_error(workspace, tmp_path, capsys):
    root, base = workspace
    (tmp_path / "file").write_text("not a directory")
    assert finetune(root, base, tmp_path / "file") == 2
    assert "is a file" in one_line_error(capsys)


@pytest.mark.parametrize("damage", ["corrupt run.json", "run.json is a list", "no label2id.json",
                                    "corrupt label2id.json"])
def test_a_damaged_run_directory_is_a_one_line_error(run_copy, damage, capsys):
    if damage == "corrupt run.json":
        (run_copy / "run.json").write_text('{"format": 1, "method": ')
    elif damage == "run.json is a list":
        (run_copy / "run.json").write_text("[1, 2]")
    elif damage == "no label2id.json":
        (run_copy / "label2id.json").unlink()
    else:
        (run_copy / "label2id.json").write_text("{oops")
    for verb in (["predict", str(run_copy), "a fine film"], ["evaluate", str(run_copy)]):
        assert main(verb) == 2
        err = one_line_error(capsys)
        assert ("run.json" if "run.json" in damage else "label2id.json") in err


@pytest.mark.parametrize("text", ["", "   "])
def test_predict_refuses_an_empty_text(lora_run, text, capsys):
    """An empty or whitespace-only text used to get a label silently."""
    assert main(["predict", str(lora_run), "a fine film", text]) == 2
    assert "argument 2 is empty" in one_line_error(capsys)


def test_predict_and_evaluate_do_not_claim_the_trained_head_is_fresh(lora_run, workspace, caplog, capsys):
    """Every predict and evaluate printed 'newly initialised (train them): classifier...' although the run's
    head is loaded right after; say it only when it is true (finetune's fresh head: yes)."""
    with caplog.at_level(logging.WARNING, logger="deltaformer"):
        assert main(["predict", str(lora_run), "a fine film"]) == 0
        assert main(["evaluate", str(lora_run)]) == 0
    assert "newly initialised" not in caplog.text
    from deltaformer.train.runs import load_run

    assert load_run(lora_run).model.load_report.missing == []
    caplog.clear()
    root, base = workspace
    with caplog.at_level(logging.WARNING, logger="deltaformer"):
        assert finetune(root, base, root / "fresh") == 0
    assert "newly initialised (train them): classifier.weight, classifier.bias" in caplog.text


# --- model configs and checkpoints (config.py, checkpoints/io.py, models/base.py) -----------------------


BERT = {"model_type": "bert", "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 37, "max_position_embeddings": 64}


@pytest.mark.parametrize(("change", "message"), [
    ({"num_hidden_layers": -1}, r"BertConfig\.num_hidden_layers must be at least 1, got -1"),
    ({"num_hidden_layers": 0}, r"num_hidden_layers must be at least 1, got 0"),
    ({"num_attention_heads": 0}, r"num_attention_heads must be at least 1, got 0"),
    ({"hidden_size": "32"}, r"hidden_size must be an integer, got '32'"),
    ({"vocab_size": -5}, r"vocab_size must be at least 1, got -5"),
    ({"num_hidden_layers": True}, r"num_hidden_layers must be an integer, got True"),
    ({"max_position_embeddings": 2.5}, r"max_position_embeddings must be an integer, got 2\.5"),
    ({"hidden_dropout_prob": 1.5}, r"hidden_dropout_prob must be at most 1, got 1\.5"),
    ({"layer_norm_eps": 0}, r"layer_norm_eps must be above 0, got 0"),
    ({"initializer_range": "0.02"}, r"initializer_range must be a number, got '0\.02'"),
    ({"pad_token_id": -3}, r"pad_token_id must be at least 0, got -3"),
    ({"model_type": "longformer", "attention_window": 8, "attention_dilation": [1, 0]},
     r"LongformerConfig\.attention_dilation must be at least 1, got 0 \(in \[1, 0\]\)"),
    ({"model_type": "longformer", "attention_window": [8, "8"]}, r"attention_window must be an integer or a list"),
    ({"model_type": "led", "d_model": 32, "encoder_layers": -2}, r"LEDConfig\.encoder_layers must be at least 1"),
])
def test_config_fields_are_checked_for_type_and_range(change, message):
    """-1 layers used to load a 0-layer model, 0 heads was a ZeroDivisionError, '32' a formatting error."""
    from deltaformer.config import ModelConfig

    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**BERT, **change})


def test_a_bad_config_value_on_disk_names_the_file_field_and_value(hf_bert):
    from deltaformer.models import BertModel

    _, path = hf_bert
    (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()),
                                                  "num_hidden_layers": -1}))
    with pytest.raises(ConfigError, match=r"config\.json: BertConfig\.num_hidden_layers must be at least 1, got -1"):
        BertModel.from_pretrained(path)


def test_new_configs_get_the_checks_from_their_declarations():
    """The checks come from the dataclass fields: a config added later only declares types and ranges."""
    from deltaformer.config import ModelConfig

    @dataclass
    class ToyConfig(ModelConfig):
        model_type: ClassVar[str] = ""  # not registered
        num_experts: int = field(default=4, metadata={"min": 1, "help": "experts per layer"})
        router_jitter: float | None = field(default=None, metadata={"min": 0.0, "max": 1.0})

    assert ToyConfig(num_experts=2, router_jitter=0.5).num_experts == 2
    with pytest.raises(ConfigError, match=r"ToyConfig\.num_experts must be at least 1, got 0"):
        ToyConfig(num_experts=0)
    with pytest.raises(ConfigError, match=r"ToyConfig\.router_jitter must be a number or null, got 'high'"):
        ToyConfig(router_jitter="high")  # type: ignore[arg-type]


def test_a_config_json_that_is_a_list_is_a_one_line_error(hf_bert):
    from deltaformer.config import load_config

    _, path = hf_bert
    (path / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match="holds a JSON list, not an object"):
        load_config(path)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_file_where_a_model_directory_is_expected(workspace, tmp_path, name, capsys):
    root, base = workspace
    assert finetune(root, base / name, tmp_path / "run") == 2
    err = one_line_error(capsys)
    assert "expected a model directory" in err and str(base) in err


@pytest.mark.parametrize("outside", ["../elsewhere/model.safetensors", "/abs"])
def test_a_shard_index_naming_files_outside_the_model_directory_is_refused(tmp_path, outside):
    from deltaformer.checkpoints.io import load_state_dict

    _, other = make_hf_bert(tmp_path / "elsewhere")
    _, model = make_hf_bert(tmp_path / "model")
    shard = outside if outside.startswith("..") else str(other / "model.safetensors")
    names = list(load_state_dict(other))
    (model / "model.safetensors").unlink()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, shard)}))
    with pytest.raises(CheckpointError, match="outside the model directory"):
        load_state_dict(model)


# --- delta files (delta/files.py) ---------------------------------------------------------------------


@pytest.fixture
def saved_delta(tmp_path):
    """(fresh-model factory, saved LoRA and adapter folders) on a tiny random BERT classifier."""
    from deltaformer import delta
    from deltaformer.models import BertForSequenceClassification

    _, path = make_hf_bert(tmp_path / "base", "BertForSequenceClassification")

    def fresh():
        return BertForSequenceClassification.from_pretrained(path)

    folders = {}
    for name, config in (("lora", delta.LoraConfig(r=4, alpha=8, targets=("query", "value"))),
                         ("adapter", delta.AdapterConfig(bottleneck=8))):
        model = fresh()
        delta.attach(model, config, name)
        folders[name] = delta.save_delta(model, tmp_path / name, name)
    return fresh, folders


@pytest.mark.parametrize(("method", "key", "value", "message"), [
    ("lora", "lora_alpha", 32, r"lora_alpha=32.*adapter_model\.safetensors.*8"),
    ("lora", "r", 8, r"r=8.*adapter_model\.safetensors.*4"),
    ("lora", "lora_dropout", 0.3, r"lora_dropout=0\.3.*0\.0"),
    ("adapter", "deltaformer.bottleneck", 16, r"deltaformer\.bottleneck=16.*adapter_model\.safetensors.*8"),
])
def test_adapter_config_that_disagrees_with_the_weights_metadata_is_refused(saved_delta, method, key, value, message):
    """Editing lora_alpha in adapter_config.json (which peft reads) changed peft's outputs but not ours: the
    metadata inside adapter_model.safetensors won. Now the disagreement is an error naming both values."""
    from deltaformer import delta

    fresh, folders = saved_delta
    path = folders[method] / "adapter_config.json"
    data = json.loads(path.read_text())
    if key.startswith("deltaformer."):
        data["deltaformer"][key.split(".", 1)[1]] = value
    else:
        data[key] = value
    path.write_text(json.dumps(data))
    model = fresh()
    with pytest.raises(delta.DeltaError, match=message):
        delta.load_delta(model, folders[method])
    assert delta.deltas(model) == {}


def test_untouched_delta_files_still_load(saved_delta):
    from deltaformer import delta

    fresh, folders = saved_delta
    for name, folder in folders.items():
        model = fresh()
        delta.load_delta(model, folder)
        assert list(delta.deltas(model)) == [name]

