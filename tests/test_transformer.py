"""The Transformer equals ``torch.nn.Transformer`` with the same weights (masks, forward and gradients), decodes
incrementally as it runs whole, round-trips through save/load, and refuses bad masks and configs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltaformer.config import ModelConfig, TransformerConfig
from deltaformer.errors import ConfigError, InputError
from deltaformer.generation import generate
from deltaformer.models.auto import load_model
from deltaformer.models.transformer import TransformerForConditionalGeneration, TransformerModel, sinusoids

ATOL = 1e-5
VOCAB = 23
HEADS = 4


def small_config(**overrides) -> TransformerConfig:
    settings = dict(vocab_size=VOCAB, d_model=32, nhead=HEADS, num_encoder_layers=3, num_decoder_layers=2,
                    dim_feedforward=48, dropout=0.0, max_position_embeddings=40)
    settings.update(overrides)
    return TransformerConfig(**settings)


def pairs(model: TransformerForConditionalGeneration, ref: nn.Transformer) -> list[tuple[list[nn.Parameter], nn.Parameter]]:
    """(our parameters, the torch parameter that is their concatenation) for every weight of ``ref``."""
    def attention(ours, theirs):
        return [([ours.query.weight, ours.key.weight, ours.value.weight], theirs.in_proj_weight),
                ([ours.query.bias, ours.key.bias, ours.value.bias], theirs.in_proj_bias),
                ([ours.out.weight], theirs.out_proj.weight), ([ours.out.bias], theirs.out_proj.bias)]

    def same(ours, theirs):
        return [([ours.weight], theirs.weight), ([ours.bias], theirs.bias)]

    out = []
    backbone = model.backbone
    for mine, layer in zip(backbone.encoder.layers, ref.encoder.layers, strict=True):
        out += attention(mine.attn, layer.self_attn) + same(mine.mlp.up, layer.linear1)
        out += same(mine.mlp.down, layer.linear2) + same(mine.attn_norm, layer.norm1) + same(mine.mlp_norm, layer.norm2)
    for mine, layer in zip(backbone.decoder.layers, ref.decoder.layers, strict=True):
        out += attention(mine.self_attn, layer.self_attn) + attention(mine.cross_attn, layer.multihead_attn)
        out += same(mine.mlp.up, layer.linear1) + same(mine.mlp.down, layer.linear2)
        out += same(mine.self_norm, layer.norm1) + same(mine.cross_norm, layer.norm2) + same(mine.mlp_norm, layer.norm3)
    if backbone.encoder.norm is not None:
        out += same(backbone.encoder.norm, ref.encoder.norm) + same(backbone.decoder.norm, ref.decoder.norm)
    return out


def reference(model: TransformerForConditionalGeneration) -> tuple[nn.Transformer, nn.Embedding]:
    """``torch.nn.Transformer`` holding our weights, and a copy of our embedding table (embeddings, output)."""
    c = model.config
    ref = nn.Transformer(c.d_model, c.nhead, c.num_encoder_layers, c.num_decoder_layers, c.dim_feedforward,
                         dropout=0.0, batch_first=True)
    if not c.final_norm:
        ref.encoder.norm = ref.decoder.norm = None
    with torch.no_grad():
        for ours, theirs in pairs(model, ref):
            theirs.copy_(torch.cat([p.detach() for p in ours]))
    embed = nn.Embedding(c.vocab_size, c.d_model)
    embed.weight.data.copy_(model.backbone.shared.weight.detach())
    return ref, embed


def reference_logits(ref: nn.Transformer, embed: nn.Embedding, src, tgt, **masks) -> torch.Tensor:
    """Embeddings * sqrt(d) + sinusoids (written out here, not ours), torch's Transformer, the tied output."""
    d = embed.weight.shape[1]

    def positions(n):
        pos, i = torch.arange(n)[:, None].double(), torch.arange(d)[None, :]
        angle = pos / 10000 ** ((i - i % 2).double() / d)
        return torch.where(i % 2 == 0, angle.sin(), angle.cos()).float()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on mixing bool and float masks
        out = ref(embed(src) * math.sqrt(d) + positions(src.shape[1]), embed(tgt) * math.sqrt(d) + positions(tgt.shape[1]),
                  **masks)
    return out @ embed.weight.T


def inputs(batch=3, src_len=9, tgt_len=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (batch, src_len), generator=g)
    tgt = torch.randint(3, VOCAB, (batch, tgt_len), generator=g)
    src_pad = torch.zeros(batch, src_len, dtype=torch.bool)
    src_pad[1, 6:] = True
    src_pad[2, 3:] = True
    tgt_pad = torch.zeros(batch, tgt_len, dtype=torch.bool)
    tgt_pad[2, 4:] = True
    return src, tgt, src_pad, tgt_pad


def _close(a, b, msg=""):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=msg or None)


def _mask_cases(src_len, tgt_len, batch):
    g = torch.Generator().manual_seed(1)
    causal = nn.Transformer.generate_square_subsequent_mask(tgt_len)
    return {
        "padding+causal": lambda sp, tp: dict(src_key_padding_mask=sp, tgt_key_padding_mask=tp,
                                              memory_key_padding_mask=sp, tgt_mask=causal),
        "float masks": lambda sp, tp: dict(
            src_mask=torch.randn(src_len, src_len, generator=g),
            memory_mask=torch.randn(batch * HEADS, tgt_len, src_len, generator=g),
            src_key_padding_mask=sp.float().masked_fill(sp, -math.inf),
            memory_key_padding_mask=sp, tgt_key_padding_mask=tp, tgt_mask=causal),
        "bool attn masks": lambda sp, tp: dict(
            src_mask=(torch.rand(src_len, src_len, generator=g) < 0.3) & ~torch.eye(src_len, dtype=torch.bool),
            tgt_mask=torch.ones(tgt_len, tgt_len, dtype=torch.bool).triu(1), memory_key_padding_mask=sp),
    }


@pytest.mark.parametrize("final_norm", [True, False])
@pytest.mark.parametrize("case", ["padding+causal", "float masks", "bool attn masks"])
def test_equals_torch_transformer_forward_and_gradients(final_norm, case):
    torch.manual_seed(0)
    model = TransformerForConditionalGeneration(small_config(final_norm=final_norm)).train()
    ref, embed = reference(model)
    src, tgt, src_pad, tgt_pad = inputs()
    masks = _mask_cases(src.shape[1], tgt.shape[1], src.shape[0])[case](src_pad, tgt_pad)
    ours = model(src, tgt, **masks).logits
    theirs = reference_logits(ref, embed, src, tgt, **masks)
    valid = ~tgt_pad[..., None] if "tgt_key_padding_mask" in masks else torch.ones_like(tgt_pad[..., None])
    _close(ours * valid, theirs * valid, "logits")
    weights = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(2))
    (ours * weights * valid).sum().backward()
    (theirs * weights * valid).sum().backward()
    for mine, other in pairs(model, ref):
        _close(torch.cat([p.grad for p in mine]), other.grad, "gradient")
    _close(model.backbone.shared.weight.grad, embed.weight.grad, "embedding gradient")


def test_hf_attention_masks_equal_torch_key_padding_and_loss_is_label_smoothed():
    torch.manual_seed(0)
    model = TransformerForConditionalGeneration(small_config()).eval()
    src, tgt, src_pad, tgt_pad = inputs()
    torch_style = model(src, tgt, src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad,
                        memory_key_padding_mask=src_pad).logits
    hf_style = model(src, tgt, attention_mask=(~src_pad).long(), decoder_attention_mask=(~tgt_pad).long()).logits
    _close(hf_style, torch_style)
    labels = tgt.masked_fill(tgt_pad, -100)
    out = model(src, attention_mask=(~src_pad).long(), labels=labels)
    expected = F.cross_entropy(out.logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100,
                               label_smoothing=0.1)
    _close(out.loss, expected)
    shifted = torch.cat([torch.full((3, 1), model.config.decoder_start_token_id), tgt[:, :-1]], 1)
    teacher_forced = model(src, shifted, attention_mask=(~src_pad).long()).logits
    _close(out.logits[~tgt_pad], teacher_forced[~tgt_pad])  # where a label is, the inputs are the same


def test_sinusoids_are_the_papers():
    table = sinusoids(50, 16)
    pos, i = 17, 5  # odd feature: cos(pos / 10000^(2*2/16))
    assert table[pos, i].item() == pytest.approx(math.cos(pos / 10000 ** (4 / 16)), abs=1e-6)
    assert table[pos, 4].item() == pytest.approx(math.sin(pos / 10000 ** (4 / 16)), abs=1e-6)


def test_generation_decodes_incrementally_as_the_full_forward():
    """Greedy and beam decoding through the generation module: the cached steps equal full forwards."""
    torch.manual_seed(0)
    model = TransformerForConditionalGeneration(small_config(tie_word_embeddings=False)).eval()
    with torch.no_grad():  # a random model writes varied tokens when its logits are large
        model.lm_head.weight.normal_(std=3.0)
    src, _, src_pad, _ = inputs()
    mask = (~src_pad).long()
    ids = generate(model, src, mask, max_new_tokens=6, eos_token_id=VOCAB + 5)  # never ends early
    assert ids.shape == (3, 7) and (ids[:, 0] == model.config.decoder_start_token_id).all()
    assert len(set(ids[0].tolist())) > 2
    with torch.no_grad():
        for t in range(1, ids.shape[1]):
            step = model(src, ids[:, :t], attention_mask=mask).logits[:, -1].argmax(-1)
            assert torch.equal(step, ids[:, t])
    beams = generate(model, src, mask, max_new_tokens=6, num_beams=3, eos_token_id=VOCAB + 5)
    assert beams.shape == ids.shape
    with torch.no_grad():  # the best beam scores at least as well as greedy under the model
        def score(seq):
            logp = model(src, seq[:, :-1], attention_mask=mask).logits.log_softmax(-1)
            return logp.gather(-1, seq[:, 1:, None]).squeeze(-1).sum(-1)
        assert (score(beams) >= score(ids) - 1e-4).all()


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    for tie in (True, False):
        model = TransformerForConditionalGeneration(small_config(tie_word_embeddings=tie)).eval()
        model.save_pretrained(tmp_path / str(tie))
        loaded = load_model(tmp_path / str(tie))
        assert isinstance(loaded, TransformerForConditionalGeneration)
        assert loaded.load_report.missing == [] and loaded.load_report.unexpected == []
        src, tgt, _, _ = inputs()
        with torch.no_grad():
            torch.testing.assert_close(loaded(src, tgt).logits, model(src, tgt).logits, atol=0, rtol=0)
    bare = TransformerModel.from_pretrained(tmp_path / "True")
    assert bare.load_report.missing == []
    config = ModelConfig.from_file(tmp_path / "True")
    assert config == model.config.replace(tie_word_embeddings=True) or config.to_dict()["d_model"] == 32


def test_bad_masks_and_configs_are_refused():
    model = TransformerForConditionalGeneration(small_config()).eval()
    src, tgt, src_pad, _ = inputs()
    with pytest.raises(InputError, match="not both"):
        model(src, tgt, attention_mask=(~src_pad).long(), src_key_padding_mask=src_pad)
    with pytest.raises(InputError, match="batch \\* heads"):
        model(src, tgt, src_mask=torch.zeros(5, 9, 9))
    with pytest.raises(InputError, match="bool"):
        model(src, tgt, src_key_padding_mask=src_pad.long())
    with pytest.raises(InputError, match="longer than the model's 40 positions"):
        model(torch.randint(3, VOCAB, (1, 41)), tgt)
    with pytest.raises(InputError, match="decoder_input_ids"):
        model(src)
    with pytest.raises(ConfigError, match="nhead|num_attention_heads"):
        small_config(d_model=30)
    with pytest.raises(ConfigError, match="label_smoothing"):
        small_config(label_smoothing=1.5)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        small_config(eos_token_id=VOCAB)
    with pytest.raises(ConfigError, match="has no key"):
        TransformerConfig.create(hidden_size=32)
