"""Delta tuning on Longformer: prefix slots reach every query, LoRA/adapters apply and merge, routing is exact."""

from __future__ import annotations

import copy

import pytest
import torch

from deltaformer import delta
from deltaformer.config import LongformerConfig
from deltaformer.models.longformer import LongformerForSequenceClassification, LongformerModel
from deltaformer.nn.sliding import SlidingWindow

ATOL = 1e-5
SEQ = 40  # longer than any window, so a prefix slot is the only way to reach far keys


def _config(**overrides) -> LongformerConfig:
    settings = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                    max_position_embeddings=60, attention_window=[4, 6], attention_dilation=[1, [1, 2, 1, 2]],
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    extra={"id2label": {"0": "a", "1": "b", "2": "c"}})
    settings.update(overrides)
    return LongformerConfig(**settings)


def _inputs(batch=4):
    """Right-padded ids (pad = 1), masks and per-row global tokens."""
    ids = torch.randint(3, 60, (batch, SEQ))
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    for row, length in enumerate([SEQ, 31, 17, 26][:batch]):
        mask[row, length:] = 0
    ids[mask == 0] = 1
    glob = torch.zeros_like(ids)
    glob[:, 0] = 1
    glob[0, 20] = 1
    glob[min(2, batch - 1), 5] = 1
    return ids, mask, glob


def _dense_reference(self, q, k, v, *, key_mask=None, extra=None, need_weights=False, dropout_p=0.0, scale=None):
    """SlidingWindow.attend through the explicit (seq x seq) band mask instead of the banded kernel."""
    out, weights = self.reference(q, k, v, key_mask=key_mask, extra=extra, dropout_p=dropout_p, scale=scale)
    return out, weights if need_weights else None


def _real(x, mask):
    return x * mask[..., None]


def test_prefix_keys_are_seen_by_every_query(monkeypatch):
    model = LongformerModel(_config()).eval()
    delta.attach(model, delta.PrefixConfig(num_virtual_tokens=3), "p")
    ids, mask, glob = _inputs()
    with torch.no_grad():
        fast = model(ids, mask, glob, output_attentions=True)
        with monkeypatch.context() as m:
            m.setattr(SlidingWindow, "attend", _dense_reference)
            dense = model(ids, mask, glob)
    torch.testing.assert_close(_real(fast.last_hidden_state, mask), _real(dense.last_hidden_state, mask),
                               atol=ATOL, rtol=0)
    is_global = glob.bool() & mask.bool()
    local_query = mask.bool() & ~is_global
    for weights in fast.attentions:  # (B, H, S, 3 prefix + G global + window): prefix slots lead
        prefix = weights[..., :3]
        assert (prefix[local_query[:, None, :, None].expand_as(prefix)] > 0).all()
        rows = weights.sum(-1)
        torch.testing.assert_close(rows[local_query[:, None].expand_as(rows)], torch.ones_like(rows)[
            local_query[:, None].expand_as(rows)])
    with delta.bare(model), torch.no_grad():
        plain = model(ids, mask, glob).last_hidden_state
    assert (_real(plain - fast.last_hidden_state, mask).abs().amax(-1)[mask.bool()] > 1e-4).all()


def test_prefix_moves_positions_past_its_slots():
    """As HF does with cached tokens: real tokens' positions start at pad + 1 + k, padding keeps pad."""
    model = LongformerModel(_config()).eval()
    shifted, fixed = copy.deepcopy(model), copy.deepcopy(model)
    delta.attach(shifted, delta.PrefixConfig(num_virtual_tokens=3), "p")
    delta.attach(fixed, delta.PrefixConfig(num_virtual_tokens=3, position_offset=False), "p")
    fixed.load_state_dict(shifted.state_dict())
    ids, mask, glob = _inputs()
    positions = (torch.cumsum(mask, 1) + 3) * mask + 1
    with torch.no_grad():
        got = shifted(ids, mask, glob).last_hidden_state
        expected = fixed(ids, mask, glob, position_ids=positions).last_hidden_state
    torch.testing.assert_close(_real(got, mask), _real(expected, mask), atol=ATOL, rtol=0)
    with pytest.raises(Exception, match="positions"):
        shifted(torch.randint(3, 60, (1, 57)))


def test_lora_on_every_linear_applies_and_merges():
    model = LongformerForSequenceClassification(_config()).eval()
    ids, mask, glob = _inputs()
    with torch.no_grad():
        base = model(ids, mask, glob).logits
    delta.attach(model, delta.LoraConfig(r=4, targets="all-linear", init=False), "lora")
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if delta.api.is_wrapped(m)}
    assert {"query_global", "key_global", "value_global", "query", "value"} <= wrapped
    with torch.no_grad():
        tuned = model(ids, mask, glob).logits
        assert (tuned - base).abs().max() > 1e-4
        delta.merge(model, "lora")  # folded: the global projections are plain again (the folded fast path)
        torch.testing.assert_close(model(ids, mask, glob).logits, tuned, atol=ATOL, rtol=0)
        delta.unmerge(model, "lora")
        torch.testing.assert_close(model(ids, mask, glob).logits, tuned, atol=ATOL, rtol=0)
    delta.freeze_base(model)
    model.train()
    model(ids, mask, glob, labels=torch.tensor([0, 1, 2, 1])).loss.backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert trained and all("lora" in n or n.startswith("classifier") for n in trained)


def test_adapters_attach_to_longformer():
    model = LongformerForSequenceClassification(_config()).eval()
    ids, mask, glob = _inputs()
    delta.attach(model, delta.AdapterConfig(kind="houlsby", bottleneck=8), "ad")
    for part in delta.delta_parameters(model):
        torch.nn.init.normal_(part, std=0.1)  # an adapter that is not the identity
    with torch.no_grad():
        tuned = model(ids, mask, glob).logits
        with delta.bare(model):
            base = model(ids, mask, glob).logits
    assert tuned.shape == (4, 3) and (tuned - base).abs().max() > 1e-4


def test_routing_equals_running_each_sample_alone():
    model = LongformerForSequenceClassification(_config()).eval()
    delta.attach(model, delta.LoraConfig(r=4, targets="all-linear", init=False), "lora")
    delta.attach(model, delta.PrefixConfig(num_virtual_tokens=3), "prefix")
    delta.attach(model, delta.PrefixConfig(num_virtual_tokens=5, position_offset=False), "prefix5")
    delta.attach(model, delta.AdapterConfig(bottleneck=8), "adapter")
    for name, part in model.named_parameters():
        if "adapter" in name:
            torch.nn.init.normal_(part, std=0.1)
    ids, mask, glob = _inputs()
    names = ["prefix", "lora", None, "prefix5"]
    with torch.no_grad(), delta.route(model, names):
        routed = model(ids, mask, glob, output_hidden_states=True)
    with torch.no_grad(), delta.bare(model):
        plain = model(ids, mask, glob).logits
    assert ((routed.logits - plain).abs().amax(-1) > 1e-4).tolist() == [True, True, False, True]
    for row, name in enumerate(names + ["adapter"]):
        routed_row = routed if name != "adapter" else None
        if routed_row is None:  # the adapter alone, through routing too
            with torch.no_grad(), delta.route(model, ["adapter"] * 4):
                routed_row = model(ids, mask, glob, output_hidden_states=True)
            row = 1
        length = int(mask[row].sum())
        delta.set_active(model, name)
        with torch.no_grad():
            alone = model(ids[row:row + 1, :length], None, glob[row:row + 1, :length], output_hidden_states=True)
        torch.testing.assert_close(routed_row.logits[row], alone.logits[0], atol=ATOL, rtol=0, msg=str(name))
        torch.testing.assert_close(routed_row.hidden_states[-1][row, :length], alone.hidden_states[-1][0],
                                   atol=ATOL, rtol=0, msg=str(name))
