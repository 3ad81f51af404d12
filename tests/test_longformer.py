"""Longformer equals Hugging Face's Longformer on random configs: outputs, attentions, gradients, round trips."""

from __future__ import annotations

import pytest
import torch

from deltaformer.config import LongformerConfig
from deltaformer.errors import ConfigError, InputError
from deltaformer.models.longformer import LongformerForSequenceClassification, LongformerModel

ATOL = 1e-5


def make_hf_longformer(tmp_path, cls_name: str = "LongformerModel", **overrides):
    """Save a random-init ``transformers`` Longformer to ``tmp_path``; return (hf_model, directory)."""
    import transformers

    settings = dict(
        vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=80, attention_window=[4, 8, 4], type_vocab_size=2,
    )
    settings.update(overrides)
    model = getattr(transformers, cls_name)(transformers.LongformerConfig(**settings)).eval()
    model.save_pretrained(tmp_path)
    return model, tmp_path


def _inputs(batch=3, seq=21, vocab=99, pad=1):
    ids = torch.randint(3, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 6:] = 0
    mask[2, 9:] = 0
    ids[mask == 0] = pad
    glob = torch.zeros(batch, seq, dtype=torch.long)
    glob[:, 0] = 1
    glob[0, 5] = 1
    glob[2, 3] = 1
    return ids, mask, glob


def _assert_same(ours, theirs, glob, seq):
    torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state, atol=ATOL, rtol=0)
    for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    for a, b in zip(ours.attentions, theirs.attentions, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    if glob is None:
        assert ours.global_attentions is None and theirs.global_attentions is None
        return
    valid = torch.arange(int(glob.sum(1).max()))[None, :] < glob.sum(1)[:, None]  # (B, G) real global slots
    for a, b in zip(ours.global_attentions, theirs.global_attentions, strict=True):
        assert a.shape == b[:, :, :seq].shape  # HF leaves its internal padding on these; we do not pad
        keep = valid[:, None, None, :]
        torch.testing.assert_close(a * keep, b[:, :, :seq] * keep, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(attention_window=[4, 8, 4]),
        dict(attention_window=2 * 3, num_hidden_layers=2, hidden_size=48, num_attention_heads=3),
        dict(attention_window=[16, 8], num_hidden_layers=2, hidden_act="gelu_new", type_vocab_size=1),
    ],
)
@pytest.mark.parametrize("with_global", [False, True])
def test_random_configs_match_transformers(tmp_path, overrides, with_global):
    hf, path = make_hf_longformer(tmp_path, **overrides)
    ours = LongformerModel.from_pretrained(path)
    assert ours.load_report.missing == [] and ours.load_report.unexpected == []
    ids, mask, glob = _inputs()
    glob = glob if with_global else None
    kwargs = dict(output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, global_attention_mask=glob, **kwargs)
        out = ours(ids, mask, glob, **kwargs)
        fast = ours(ids, mask, glob)
    _assert_same(out, theirs, glob, ids.shape[1])
    torch.testing.assert_close(fast.last_hidden_state, theirs.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(fast.pooler_output, theirs.pooler_output, atol=ATOL, rtol=0)


def test_inputs_embeds_and_unpadded_batch(tmp_path):
    hf, path = make_hf_longformer(tmp_path)
    ours = LongformerModel.from_pretrained(path)
    embeds = torch.randn(2, 13, 32)
    with torch.no_grad():
        expected = hf(inputs_embeds=embeds).last_hidden_state
        got = ours(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_gradients_match_transformers(tmp_path):
    hf, path = make_hf_longformer(tmp_path, "LongformerForSequenceClassification", num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ours = LongformerForSequenceClassification.from_pretrained(path).train()
    hf.train()
    ids, mask, glob = _inputs()
    labels = torch.tensor([0, 2, 1])
    for global_mask in (glob, None):  # None: the classifier makes <s> global, as HF does
        hf.zero_grad()
        ours.zero_grad()
        expected = hf(ids, attention_mask=mask, global_attention_mask=global_mask, labels=labels)
        got = ours(ids, mask, global_mask, labels=labels)
        torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
        expected.loss.backward()
        got.loss.backward()
        theirs = dict(hf.named_parameters())
        for name, param in ours.named_parameters():
            hf_param = theirs[ours.name_map().to_hf(name)]
            torch.testing.assert_close(param.grad, hf_param.grad, atol=ATOL, rtol=1e-4, msg=name)


def test_round_trip_to_transformers(tmp_path):
    import transformers

    _, path = make_hf_longformer(tmp_path / "hf", "LongformerForSequenceClassification", num_labels=2)
    ours = LongformerForSequenceClassification.from_pretrained(path)
    ours.save_pretrained(tmp_path / "ours")
    reloaded = transformers.LongformerForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    ids, mask, glob = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask, glob).logits,
                                   reloaded(ids, attention_mask=mask, global_attention_mask=glob).logits,
                                   atol=ATOL, rtol=0)


def test_dilation_and_long_inputs_run_in_one_forward():
    config = LongformerConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=20, max_position_embeddings=1100, attention_window=[8, 4],
                              attention_dilation=[2, [1, 3]])
    model = LongformerModel(config).eval()
    ids = torch.randint(3, 50, (1, 1000))
    glob = torch.zeros_like(ids)
    glob[0, 0] = 1
    with torch.no_grad():
        out = model(ids, global_attention_mask=glob, output_attentions=True)
    assert out.last_hidden_state.shape == (1, 1000, 16)
    assert out.attentions[0].shape == (1, 2, 1000, 1 + 9) and out.attentions[1].shape == (1, 2, 1000, 1 + 5)


def test_bad_configs_and_inputs():
    with pytest.raises(ConfigError, match="even"):
        LongformerConfig(attention_window=5, num_hidden_layers=1)
    with pytest.raises(ConfigError, match="one per layer"):
        LongformerConfig(attention_window=[4, 4], num_hidden_layers=3)
    model = LongformerModel(LongformerConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=8,
                                             max_position_embeddings=12, attention_window=4))
    with pytest.raises(InputError, match="longer than the model's 10 positions"):
        model(torch.randint(3, 20, (1, 11)))
