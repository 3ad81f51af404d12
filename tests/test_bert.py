"""BERT equals Hugging Face's BERT: random configs, the real MiniLM, and the tiny MLM checkpoint."""

from __future__ import annotations

import pytest
import torch

from deltaformer.errors import CheckpointError, ConfigError, DeltaformerError, InputError
from deltaformer.models import (
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)

from .conftest import ORACLE_RTOL, make_hf_bert

ATOL = 1e-5


def _inputs(vocab: int, batch: int = 3, seq: int = 17, type_vocab: int = 2, pad_from: int | None = 11):
    ids = torch.randint(1, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_from is not None:
        mask[1, pad_from:] = 0
        mask[2, pad_from + 3:] = 0
    types = torch.randint(0, type_vocab, (batch, seq))
    return ids, mask, types


def _assert_encoder_equal(ours, theirs, mask=None):
    """Compare all four encoder outputs; padded query rows included (HF computes them the same way)."""
    torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state, atol=ATOL, rtol=0)
    if theirs.pooler_output is not None:
        torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, atol=ATOL, rtol=0)
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert len(ours.attentions) == len(theirs.attentions)
    for a, b in zip(ours.attentions, theirs.attentions):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(hidden_size=32, num_attention_heads=4, type_vocab_size=2),
        dict(hidden_size=48, num_attention_heads=3, type_vocab_size=1, num_hidden_layers=3),
        dict(hidden_size=64, num_attention_heads=8, type_vocab_size=4, hidden_act="gelu_new", intermediate_size=50),
    ],
)
def test_random_configs_match_transformers(tmp_path, overrides):
    hf, path = make_hf_bert(tmp_path, **overrides)
    ours = BertModel.from_pretrained(path)
    ids, mask, types = _inputs(99, type_vocab=overrides["type_vocab_size"])
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True, output_attentions=True)
        out = ours(ids, mask, types, output_hidden_states=True, output_attentions=True)
    _assert_encoder_equal(out, theirs)


def test_fast_path_equals_reference_path(hf_bert):
    """The SDPA path (no weights requested) equals the dense path that returns weights."""
    _, path = hf_bert
    model = BertModel.from_pretrained(path)
    ids, mask, types = _inputs(99)
    with torch.no_grad():
        fast = model(ids, mask, types)
        dense = model(ids, mask, types, output_attentions=True)
    torch.testing.assert_close(fast.last_hidden_state, dense.last_hidden_state, atol=ATOL, rtol=0)


def test_gradients_match_transformers(tmp_path):
    hf, path = make_hf_bert(tmp_path, "BertForSequenceClassification", num_labels=3, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
    ours = BertForSequenceClassification.from_pretrained(path).train()
    hf.train()
    ids, mask, types = _inputs(99)
    labels = torch.tensor([0, 2, 1])
    hf(ids, attention_mask=mask, token_type_ids=types, labels=labels).loss.backward()
    ours(ids, mask, types, labels=labels).loss.backward()
    theirs = dict(hf.named_parameters())
    for name, param in ours.named_parameters():
        hf_name = ours.name_map().to_hf(name)
        torch.testing.assert_close(param.grad, theirs[hf_name].grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "ours_cls,hf_cls",
    [
        (BertForMaskedLM, "BertForMaskedLM"),
        (BertForPreTraining, "BertForPreTraining"),
        (BertForSequenceClassification, "BertForSequenceClassification"),
        (BertForTokenClassification, "BertForTokenClassification"),
    ],
)
def test_heads_match_and_round_trip(tmp_path, ours_cls, hf_cls):
    import transformers

    hf, path = make_hf_bert(tmp_path / "hf", hf_cls)
    ours = ours_cls.from_pretrained(path)
    ids, mask, types = _inputs(99)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, token_type_ids=types).logits if hf_cls != "BertForPreTraining" else \
            hf(ids, attention_mask=mask, token_type_ids=types).prediction_logits
        got = ours(ids, mask, types).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # ours -> transformers
    ours.save_pretrained(tmp_path / "ours")
    reloaded = getattr(transformers, hf_cls).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        out = reloaded(ids, attention_mask=mask, token_type_ids=types)
        again = out.prediction_logits if hf_cls == "BertForPreTraining" else out.logits
    torch.testing.assert_close(again, got, atol=ATOL, rtol=0)


def test_task_model_loads_bare_checkpoint_and_reports_new_head(hf_bert, caplog):
    _, path = hf_bert
    model = BertForSequenceClassification.from_pretrained(path, num_labels=5)
    assert model.classifier.out_features == 5
    assert model.load_report.missing == ["classifier.weight", "classifier.bias"]
    assert "newly initialised" in caplog.text


@pytest.mark.assets
def test_real_minilm_matches_transformers(minilm_dir):
    import transformers

    hf = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    ours = BertModel.from_pretrained(minilm_dir)
    assert ours.load_report.missing == []
    ids, mask, types = _inputs(30522, batch=4, seq=40, pad_from=25)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True, output_attentions=True)
        out = ours(ids, mask, types, output_hidden_states=True, output_attentions=True)
    _assert_encoder_equal(out, theirs)


@pytest.mark.assets
def test_tiny_mlm_logits_match_transformers(tiny_mlm_dir):
    import transformers

    hf = transformers.BertForMaskedLM.from_pretrained(tiny_mlm_dir).eval()
    ours = BertForMaskedLM.from_pretrained(tiny_mlm_dir)
    assert ours.load_report.missing == []
    ids, mask, types = _inputs(ours.config.vocab_size, seq=12, pad_from=8)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, mask, types).logits, hf(ids, attention_mask=mask, token_type_ids=types).logits, atol=ATOL,
            rtol=ORACLE_RTOL,
        )


# --- bad input -----------------------------------------------------------------------------------------


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DeltaformerError, match="neither an existing file or folder nor a known asset"):
        BertModel.from_pretrained(tmp_path / "nope")


def test_missing_weights_file(tmp_path, hf_bert):
    _, path = hf_bert
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        BertModel.from_pretrained(path)


def test_unknown_model_type(hf_bert):
    _, path = hf_bert
    text = (path / "config.json").read_text().replace('"model_type": "bert"', '"model_type": "bort"')
    (path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="unknown model_type 'bort'"):
        BertModel.from_pretrained(path)


def test_unknown_config_key_by_hand():
    from deltaformer.config import BertConfig

    with pytest.raises(ConfigError, match="hidden_sise"):
        BertConfig.create(hidden_sise=12)


def test_shape_mismatch(hf_bert):
    _, path = hf_bert
    text = (path / "config.json").read_text().replace('"intermediate_size": 37', '"intermediate_size": 40')
    (path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"intermediate.dense.* has shape \(37.*\) but the model expects \(40"):
        BertModel.from_pretrained(path)


def test_truncated_safetensors(hf_bert):
    _, path = hf_bert
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        BertModel.from_pretrained(path)


def test_too_long_input(hf_bert):
    _, path = hf_bert
    model = BertModel.from_pretrained(path)
    with pytest.raises(InputError, match="longer than the model's 64 positions"):
        model(torch.ones(1, 65, dtype=torch.long))


def test_out_of_vocab_id(hf_bert):
    _, path = hf_bert
    model = BertModel.from_pretrained(path)
    with pytest.raises(InputError, match="token id 99 is outside the vocabulary"):
        model(torch.tensor([[1, 99]]))


def test_label_outside_label_set(tmp_path):
    _, path = make_hf_bert(tmp_path, "BertForSequenceClassification", num_labels=3)
    model = BertForSequenceClassification.from_pretrained(path)
    with pytest.raises(InputError, match="label 3 is outside the label set 0..2"):
        model(torch.tensor([[1, 2]]), labels=torch.tensor([3]))


def test_pickle_bin_that_is_not_a_state_dict(tmp_path, hf_bert):
    _, path = hf_bert
    from safetensors.torch import load_file

    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save({"model": state, "epoch": 3}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a plain state dict"):
        BertModel.from_pretrained(path)


def test_pickle_with_code_is_refused(tmp_path, hf_bert):
    _, path = hf_bert
    (path / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        BertModel.from_pretrained(path)


def test_plain_bin_state_dict_loads(tmp_path, hf_bert):
    hf, path = hf_bert
    (path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), path / "pytorch_model.bin")
    model = BertModel.from_pretrained(path)
    assert model.load_report.missing == []


def test_sharded_checkpoint_loads(tmp_path, hf_bert):
    hf, path = hf_bert
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model = BertModel.from_pretrained(tmp_path / "sharded")
    ids, mask, types = _inputs(99)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, types).last_hidden_state,
                                   hf(ids, attention_mask=mask, token_type_ids=types).last_hidden_state,
                                   atol=ATOL, rtol=0)
