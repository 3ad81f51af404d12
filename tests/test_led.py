"""LED equals Hugging Face's LED on random configs: encoder, decoder, logits, gradients, round trips, generation."""

from __future__ import annotations

import pytest
import torch

from deltaformer.errors import ConfigError
from deltaformer.generation import generate
from deltaformer.models.led import LEDForConditionalGeneration, LEDModel

from .test_longformer import _inputs as longformer_inputs

ATOL = 1e-5
VOCAB = 24


def make_hf_led(tmp_path, cls_name: str = "LEDForConditionalGeneration", **overrides):
    """Save a random-init ``transformers`` LED to ``tmp_path``; return (hf_model, directory).

    ``init_std`` is large so that a random model's greedy and beam outputs vary from step to step (a small
    one repeats one token): generation parity then checks something.
    """
    import transformers

    settings = dict(
        vocab_size=VOCAB, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_encoder_position_embeddings=64,
        max_decoder_position_embeddings=32, attention_window=[4, 8, 4], dropout=0.0, attention_dropout=0.0,
        init_std=0.3,
    )
    settings.update(overrides)
    model = getattr(transformers, cls_name)(transformers.LEDConfig(**settings)).eval()
    model.save_pretrained(tmp_path)
    return model, tmp_path


def _inputs(batch=3, seq=21, pad=1):
    """The Longformer tests' padded encoder inputs and global masks, and right-padded decoder inputs
    starting with </s>."""
    ids, mask, glob = longformer_inputs(batch, seq, VOCAB, pad)
    dec = torch.randint(3, VOCAB, (batch, 7))
    dec[:, 0] = 2
    dec_mask = torch.ones_like(dec)
    dec_mask[2, 5:] = 0
    dec[dec_mask == 0] = pad
    return ids, mask, glob, dec, dec_mask


def _close(a, b, msg=""):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=msg or None)


@pytest.mark.parametrize("with_global", [False, True])
@pytest.mark.parametrize("cls_name", ["LEDModel", "LEDForConditionalGeneration"])
def test_random_configs_match_transformers(tmp_path, cls_name, with_global):
    hf, path = make_hf_led(tmp_path, cls_name)
    ours = (LEDModel if cls_name == "LEDModel" else LEDForConditionalGeneration).from_pretrained(path).eval()
    assert ours.load_report.missing == [] and ours.load_report.unexpected == []
    ids, mask, glob, dec, dec_mask = _inputs()
    glob = glob if with_global else None
    kwargs = dict(output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, global_attention_mask=glob, decoder_input_ids=dec,
                    decoder_attention_mask=dec_mask, **kwargs)
        got = ours(ids, mask, dec, decoder_attention_mask=dec_mask, global_attention_mask=glob, **kwargs)
        fast = ours(ids, mask, dec, decoder_attention_mask=dec_mask, global_attention_mask=glob)
    _close(got.encoder_last_hidden_state, theirs.encoder_last_hidden_state)
    for name in ("encoder_hidden_states", "encoder_attentions", "decoder_hidden_states", "decoder_attentions",
                 "cross_attentions"):
        for a, b in zip(getattr(got, name), getattr(theirs, name), strict=True):
            assert a.shape == b.shape, name
            _close(a, b, name)
    if with_global:  # HF keeps its internal window padding on these; compare real global slots only
        for a, b in zip(got.encoder_global_attentions, theirs.encoder_global_attentions, strict=True):
            valid = (torch.arange(a.shape[-1])[None, :] < glob.sum(1)[:, None])[:, None, None, :]
            _close(a * valid, b[:, :, :ids.shape[1]] * valid)
    if cls_name == "LEDModel":
        _close(got.last_hidden_state, theirs.last_hidden_state)
        _close(fast.last_hidden_state, theirs.last_hidden_state)
    else:
        _close(got.logits, theirs.logits)
        _close(fast.logits, theirs.logits)


def test_gradients_match_transformers(tmp_path):
    hf, path = make_hf_led(tmp_path, init_std=0.02)
    ours = LEDForConditionalGeneration.from_pretrained(path).train()
    hf.train()
    ids, mask, glob, _, _ = _inputs()
    labels = torch.randint(3, VOCAB, (3, 6))
    labels[2, 4:] = -100
    for global_mask in (glob, None):
        hf.zero_grad()
        ours.zero_grad()
        expected = hf(ids, attention_mask=mask, global_attention_mask=global_mask, labels=labels)
        got = ours(ids, mask, labels=labels, global_attention_mask=global_mask)
        _close(got.logits, expected.logits)
        _close(got.loss, expected.loss)
        expected.loss.backward()
        got.loss.backward()
        theirs = dict(hf.named_parameters())
        for name, param in ours.named_parameters():
            hf_param = theirs[ours.name_map().to_hf(name)]
            torch.testing.assert_close(param.grad, hf_param.grad, atol=ATOL, rtol=1e-4, msg=name)


@pytest.mark.parametrize("cls_name", ["LEDModel", "LEDForConditionalGeneration"])
def test_round_trip_to_transformers(tmp_path, cls_name):
    import transformers

    _, path = make_hf_led(tmp_path / "hf", cls_name)
    ours = (LEDModel if cls_name == "LEDModel" else LEDForConditionalGeneration).from_pretrained(path).eval()
    if cls_name == "LEDForConditionalGeneration":
        ours.final_logits_bias.normal_()  # a non-zero bias must survive the trip
    ours.save_pretrained(tmp_path / "ours")
    reloaded = getattr(transformers, cls_name).from_pretrained(tmp_path / "ours").eval()
    ids, mask, glob, dec, _ = _inputs()
    with torch.no_grad():
        got = ours(ids, mask, dec, global_attention_mask=glob)
        expected = reloaded(ids, attention_mask=mask, decoder_input_ids=dec, global_attention_mask=glob)
    key = "last_hidden_state" if cls_name == "LEDModel" else "logits"
    _close(got[key], expected[key])


def _hf_generate(hf, ids, mask, glob, **settings):
    """HF ``generate`` with every logits processor that could differ switched off."""
    return hf.generate(ids, attention_mask=mask, global_attention_mask=glob, do_sample=False, min_length=0,
                       no_repeat_ngram_size=0, repetition_penalty=1.0, forced_bos_token_id=None,
                       forced_eos_token_id=None, bad_words_ids=None, suppress_tokens=None,
                       begin_suppress_tokens=None, num_return_sequences=1, **settings)


def test_greedy_and_beam_search_match_transformers(tmp_path):
    torch.manual_seed(2)  # a seed whose beams end at different steps, so every stopping rule matters
    hf, path = make_hf_led(tmp_path, vocab_size=20, encoder_layers=2, attention_window=[4, 8])
    ours = LEDForConditionalGeneration.from_pretrained(path).eval()
    ids = torch.randint(3, 20, (3, 21))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    ids[mask == 0] = 1
    glob = torch.zeros_like(ids)
    glob[:, 0] = 1
    glob[2, 4] = 1
    cases = [(None, dict(num_beams=1)), (glob, dict(num_beams=1)),
             (glob, dict(num_beams=4, early_stopping=False, length_penalty=1.0)),
             (None, dict(num_beams=4, early_stopping=True, length_penalty=2.0)),
             (None, dict(num_beams=4, early_stopping="never", length_penalty=0.5)),
             (None, dict(num_beams=3, early_stopping=False, length_penalty=-1.0))]
    for global_mask, settings in cases:
        expected = _hf_generate(hf, ids, mask, global_mask, max_new_tokens=10, **settings)
        got = generate(ours, ids, mask, global_attention_mask=global_mask, max_new_tokens=10, **settings)
        assert got.tolist() == expected.tolist(), settings


def test_generation_settings_are_checked(tmp_path):
    _, path = make_hf_led(tmp_path)
    ours = LEDForConditionalGeneration.from_pretrained(path)
    ids = torch.randint(3, VOCAB, (1, 5))
    with pytest.raises(ConfigError, match="num_beams"):
        generate(ours, ids, num_beams=0)
    with pytest.raises(ConfigError, match="early_stopping"):
        generate(ours, ids, num_beams=2, early_stopping="sometimes")
