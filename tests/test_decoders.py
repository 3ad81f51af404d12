"""GPT-2 and Llama equal Hugging Face's on random configs: logits, every hidden state, loss and gradients,
padding on either side, incremental decoding with the KV cache, and checkpoints written back."""

from __future__ import annotations

import pytest
import torch

from deltaformer.config import GPT2Config, LlamaConfig, load_config
from deltaformer.errors import ConfigError, InputError
from deltaformer.models import (
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)
from deltaformer.models.auto import load_model
from deltaformer.models.decoder import positions_from_mask
from deltaformer.models.gpt2 import to_hf_layout
from deltaformer.nn.kv_cache import KVCache

ATOL = 1e-5
VOCAB = 99

LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, bos_token_id=1,
             eos_token_id=2, pad_token_id=0)
GPT2 = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)

#: name -> (family, HF config overrides)
CONFIGS = {
    "llama": ("llama", {}),
    "llama-mha-bias-tied": ("llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True,
                                          tie_word_embeddings=True, head_dim=16)),
    "llama-llama3": ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                        low_freq_factor=1.0, high_freq_factor=4.0,
                                                        original_max_position_embeddings=8))),
    "llama-linear": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "llama-dynamic": ("llama", dict(max_position_embeddings=8,
                                    rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "gpt2": ("gpt2", {}),
    "gpt2-scaled": ("gpt2", dict(scale_attn_by_inverse_layer_idx=True, n_inner=40, activation_function="relu")),
}


def make_hf(tmp_path, family: str, head: str = "lm", **overrides):
    """A random ``transformers`` model saved to ``tmp_path``; returns (model, directory)."""
    import transformers

    if family == "llama":
        config = transformers.LlamaConfig(**{**LLAMA, **overrides})
        cls = transformers.LlamaForCausalLM if head == "lm" else transformers.LlamaForSequenceClassification
    else:
        config = transformers.GPT2Config(**{**GPT2, **overrides})
        cls = transformers.GPT2LMHeadModel if head == "lm" else transformers.GPT2ForSequenceClassification
    if head != "lm":
        config.num_labels = 3
    config._attn_implementation = "sdpa"
    model = cls(config).eval()
    model.save_pretrained(tmp_path)
    return model, tmp_path


def ours_for(family: str, head: str = "lm"):
    if family == "llama":
        return LlamaForCausalLM if head == "lm" else LlamaForSequenceClassification
    return GPT2LMHeadModel if head == "lm" else GPT2ForSequenceClassification


def padded_batch(side: str, seq: int = 9, lengths=(9, 6, 4)):
    ids = torch.randint(3, VOCAB, (len(lengths), seq))
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, seq - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def hf_grads(model) -> dict[str, torch.Tensor]:
    """Our gradients under HF names and layout."""
    name_map = model.name_map()
    grads = {name_map.to_hf(n): p.grad for n, p in model.named_parameters() if p.grad is not None}
    return to_hf_layout(grads) if isinstance(model.config, GPT2Config) else grads


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_hidden_states_loss_and_gradients_match(tmp_path, name):
    family, overrides = CONFIGS[name]
    hf, path = make_hf(tmp_path, family, **overrides)
    ours = ours_for(family).from_pretrained(path)
    assert ours.load_report.missing == [] and ours.load_report.unexpected == []
    ids = torch.randint(0, VOCAB, (2, 12))
    labels = ids.clone()
    labels[0, :3] = -100
    theirs = hf(ids, labels=labels, output_hidden_states=True)
    out = ours(ids, labels=labels, output_hidden_states=True)
    torch.testing.assert_close(out.logits, theirs.logits, atol=ATOL, rtol=0)
    assert len(out.hidden_states) == len(theirs.hidden_states) == hf.config.num_hidden_layers + 1
    for a, b in zip(out.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, theirs.loss, atol=ATOL, rtol=0)
    theirs.loss.backward()
    out.loss.backward()
    ours_grads = hf_grads(ours)
    theirs_grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    assert set(ours_grads) == set(theirs_grads)
    for key, grad in theirs_grads.items():
        torch.testing.assert_close(ours_grads[key], grad, atol=ATOL, rtol=0, msg=key)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_either_side_matches_transformers_and_solo_runs(tmp_path, family, side):
    hf, path = make_hf(tmp_path, family)
    ours = ours_for(family).from_pretrained(path)
    ids, mask = padded_batch(side)
    positions = positions_from_mask(mask, 0, ids.shape[1], ids.shape[0], ids.device)
    with torch.no_grad():
        out = ours(ids, attention_mask=mask).logits
        theirs = hf(ids, attention_mask=mask, position_ids=positions).logits
        real = mask.bool()
        torch.testing.assert_close(out[real], theirs[real], atol=ATOL, rtol=0)
        for row in range(ids.shape[0]):  # each sample as if alone, unpadded
            alone = ours(ids[row][real[row]][None]).logits[0]
            torch.testing.assert_close(out[row][real[row]], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama-llama3"])
def test_incremental_decoding_with_cache_equals_full_forward(tmp_path, name):
    family, overrides = CONFIGS[name]
    hf, path = make_hf(tmp_path, family, **overrides)
    ours = ours_for(family).from_pretrained(path)
    prompt, mask = padded_batch("left", seq=6, lengths=(6, 3, 5))
    steps = torch.randint(3, VOCAB, (3, 4))
    full_ids = torch.cat([prompt, steps], 1)
    full_mask = torch.cat([mask, torch.ones_like(steps)], 1)
    with torch.no_grad():
        full = ours(full_ids, attention_mask=full_mask).logits
        cache = ours.new_cache(3, 12)
        pieces = [ours(prompt, attention_mask=mask, cache=cache).logits]
        for t in range(steps.shape[1]):
            seen = full_mask[:, : prompt.shape[1] + t + 1]
            pieces.append(ours(steps[:, t:t + 1], attention_mask=seen, cache=cache).logits)
        assert cache.length == full_ids.shape[1]
        stepped = torch.cat(pieces, 1)
        real = full_mask.bool()
        torch.testing.assert_close(stepped[real], full[real], atol=ATOL, rtol=0)
        positions = positions_from_mask(full_mask, 0, full_ids.shape[1], 3, full_ids.device)
        theirs = hf(full_ids, attention_mask=full_mask, position_ids=positions).logits
        torch.testing.assert_close(stepped[real], theirs[real], atol=ATOL, rtol=0)
        cache.crop(-1)  # step the last token again on the cropped cache
        last = ours(steps[:, -1:], attention_mask=full_mask, cache=cache, last_only=True).logits
        torch.testing.assert_close(last[:, 0], stepped[:, -1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_classification_reads_last_real_token(tmp_path, family, side):
    hf, path = make_hf(tmp_path, family, head="cls")
    ours = ours_for(family, "cls").from_pretrained(path)
    assert ours.load_report.missing == []
    ids, mask = padded_batch(side)
    labels = torch.tensor([0, 2, 1])
    positions = positions_from_mask(mask, 0, ids.shape[1], ids.shape[0], ids.device)
    theirs = hf(ids, attention_mask=mask, position_ids=positions, labels=labels)
    out = ours(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, theirs.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, theirs.loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["llama-llama3", "llama-mha-bias-tied", "gpt2"])
def test_save_pretrained_loads_in_transformers(tmp_path, name):
    import transformers

    family, overrides = CONFIGS[name]
    hf, path = make_hf(tmp_path / "hf", family, **overrides)
    ours = ours_for(family).from_pretrained(path)
    with torch.no_grad():
        for p in ours.parameters():  # moved off the checkpoint, so a stale file could not pass
            p.add_(0.01 * torch.randn_like(p))
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back).__name__ == type(ours).__name__
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids).logits, atol=ATOL, rtol=0)
    again = load_model(tmp_path / "ours")
    assert type(again) is type(ours)
    assert load_config(tmp_path / "ours").to_dict() == ours.config.to_dict()


def test_kv_cache_reorder_crop_and_overflow():
    cache = KVCache(n_layers=2, batch=3, max_length=4, n_kv_heads=1, head_dim=2)
    k = torch.arange(3.0)[:, None, None, None].expand(3, 1, 3, 2)
    for i in range(2):
        keys, values = cache.layer(i).update(k, k + 10)
        assert keys.shape == (3, 1, 3, 2)
    assert cache.length == 3
    taken = cache.take(torch.tensor([1, 1]))  # a copy of row 1, twice; the cache itself is unchanged
    assert taken.batch == 2 and taken.length == 3 and taken.keys[0, :, 0, 0, 0].tolist() == [1.0, 1.0]
    taken.layer(0).update(torch.full((2, 1, 1, 2), 7.0), torch.full((2, 1, 1, 2), 7.0))
    assert cache.layer(0).length == 3 and cache.keys[0, :, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert taken.row_bytes == 2 * 2 * 1 * 4 * 2 * 4  # keys and values x layers x heads x length x dim x fp32
    with pytest.raises(InputError, match="outside the batch"):
        cache.take(torch.tensor([3]))
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.batch == 3 and cache.keys[0, :, 0, 0, 0].tolist() == [2.0, 2.0, 0.0]
    cache.reorder(torch.tensor([1]))
    assert cache.batch == 1
    cache.crop(-1)
    assert cache.length == 2
    new = torch.ones(1, 1, 1, 2)
    keys, _ = cache.layer(0).update(new, new)
    assert keys.shape[2] == 3 and keys[0, 0, -1, 0] == 1.0
    with pytest.raises(InputError, match="larger max_length"):
        cache.layer(1).update(torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    with pytest.raises(InputError, match="outside the batch"):
        cache.reorder(torch.tensor([5]))
    before = cache.keys[:, :, :, :3].clone()
    cache.grow(3)  # room for 3 more positions; what is stored stays
    assert cache.max_length == 7 and torch.equal(cache.keys[:, :, :, :3], before)
    cache.layer(1).update(torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    assert cache.layer(1).length == 5


def test_configs_check_their_fields():
    config = LlamaConfig.from_dict({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4,
                                    "rope_parameters": {"rope_type": "linear", "rope_theta": 1000, "factor": 2.0}})
    assert config.rope_theta == 1000.0 and config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert config.head_dim == 8 and config.num_key_value_heads == 4
    with pytest.raises(ConfigError, match="yarn"):
        LlamaConfig(hidden_size=32, num_attention_heads=4, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ConfigError, match="low_freq_factor"):
        LlamaConfig(hidden_size=32, num_attention_heads=4, rope_scaling={"rope_type": "llama3", "factor": 2.0})
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="n_layer"):
        GPT2Config(n_layer=0)
    gpt2 = GPT2Config(n_embd=32, n_head=4, n_inner=None)
    assert gpt2.hidden_size == 32 and gpt2.intermediate_size == 128 and "hidden_size" not in gpt2.to_dict()


def test_bad_decoder_inputs_are_clear_errors():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                                         num_attention_heads=2)).eval()
    ids = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(InputError, match="attention_mask has shape"):
        model(ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(InputError, match="cache holds 1 sequences"):
        model(ids, cache=model.new_cache(1, 8))
    with pytest.raises(InputError, match="outside the vocabulary"):
        model(ids + VOCAB)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=4))
    with pytest.raises(InputError, match="longer than the model's 4 positions"):
        gpt2(ids)


def test_dynamic_rope_decoding_matches_transformers_cache(tmp_path):
    """Dynamic NTK scaling changes frequencies with the length, so decoding past the context is not the full
    forward (in HF either); each step equals HF's own cached step."""
    from transformers import DynamicCache

    family, overrides = CONFIGS["llama-dynamic"]
    hf, path = make_hf(tmp_path, family, **overrides)
    ours = ours_for(family).from_pretrained(path)
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        past = DynamicCache(config=hf.config)
        theirs = [hf(ids[:, :6], past_key_values=past, use_cache=True).logits]
        cache = ours.new_cache(2, 12)
        mine = [ours(ids[:, :6], cache=cache).logits]
        for t in range(6, 12):
            theirs.append(hf(ids[:, t:t + 1], past_key_values=past, use_cache=True,
                             position_ids=torch.full((2, 1), t)).logits)
            mine.append(ours(ids[:, t:t + 1], cache=cache).logits)
        torch.testing.assert_close(torch.cat(mine, 1), torch.cat(theirs, 1), atol=ATOL, rtol=0)
