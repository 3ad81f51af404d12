"""CPU dropout with a packed mask: its rate, scale, gradient and seeding, and the attention paths that use it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltaformer.nn import dropout as dropout_module
from deltaformer.nn.dropout import MIN_PACKED, Dropout, drop_mask, dropout, packable
from deltaformer.nn.patterns import Full
from deltaformer.nn.sliding import SlidingWindow


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_rate_and_scale(p):
    torch.manual_seed(0)
    x = torch.ones(1000, 1000)
    y = dropout(x, p)
    levels = round(p * 65536)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.002  # 1e6 draws: the standard error is <= 0.0005
    assert torch.all(y[kept] == 65536 / (65536 - levels))
    assert abs(y.mean().item() - 1) < 0.01  # expectations unchanged


def test_lanes_are_independent():
    """Each 64-bit word feeds four neighbouring elements: their drops must not be correlated."""
    torch.manual_seed(1)
    drop, _ = drop_mask((250000, 4), 0.5)
    pairs = drop[:, 0].float() * 2 + drop[:, 3].float()
    counts = torch.bincount(pairs.long(), minlength=4).float() / drop.shape[0]
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.005)


def test_seeded_repeatable_and_resumable():
    x = torch.randn(300, 300)
    torch.manual_seed(3)
    first = dropout(x, 0.2)
    state = torch.get_rng_state()
    second = dropout(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.2), first)
    torch.set_rng_state(state)  # a resumed run draws the masks the uninterrupted run would have
    assert torch.equal(dropout(x, 0.2), second)
    assert not torch.equal(first, second)


def test_gradient_is_the_scaled_mask():
    torch.manual_seed(0)
    x = torch.randn(400, 400, requires_grad=True)
    y = dropout(x, 0.3)
    (grad,) = torch.autograd.grad(y.sum(), x)
    kept = y.detach() != 0
    torch.testing.assert_close(grad, kept.float() * (65536 / (65536 - round(0.3 * 65536))))


def test_falls_back_where_the_packed_mask_does_not_serve():
    small = torch.randn(10, 10)
    assert not packable(small, 0.1) and packable(torch.randn(MIN_PACKED), 0.1)
    assert not packable(torch.randn(MIN_PACKED), 1.0) and not packable(torch.randn(MIN_PACKED), 1e-9)
    torch.manual_seed(0)
    expected = F.dropout(small, 0.1, True)
    torch.manual_seed(0)
    assert torch.equal(dropout(small, 0.1), expected)
    assert dropout(small, 0.1, training=False) is small and dropout(small, 0.0) is small


def test_module_is_a_drop_in_for_nn_dropout():
    layer = Dropout(0.25)
    assert isinstance(layer, torch.nn.Dropout) and layer.state_dict() == {}
    x = torch.ones(512, 512)
    torch.manual_seed(0)
    assert (layer(x) == 0).any()
    assert torch.equal(layer.eval()(x), x)


@pytest.mark.parametrize("pattern", [Full(), SlidingWindow(5, 2), SlidingWindow(7, 1, causal=True)])
def test_attention_dropout_applies_the_mask_to_the_weights(pattern, monkeypatch):
    """With a mask that drops nothing, attention with dropout is attention without it, times the scale; with
    a mask that drops every weight, the output is zero. Both on the explicit CPU path and for any pattern."""
    q, k, v = (torch.randn(2, 4, 96, 16, dtype=torch.float64) for _ in range(3))
    key_mask = torch.ones(2, 96, dtype=torch.bool)
    key_mask[1, 80:] = False
    plain, _ = pattern.attend(q, k, v, key_mask=key_mask)
    monkeypatch.setattr(dropout_module, "MIN_PACKED", 1)
    for drop_all, scale in ((False, 3.0), (True, 3.0)):
        monkeypatch.setattr("deltaformer.nn.patterns.drop_mask",
                            lambda shape, p, d=drop_all, s=scale: (torch.full(shape, d), s))
        out, _ = pattern.attend(q, k, v, key_mask=key_mask, dropout_p=0.5)
        torch.testing.assert_close(out, torch.zeros_like(plain) if drop_all else plain * scale, atol=1e-12, rtol=0)


def test_attention_dropout_is_unbiased():
    """Averaged over many masks, attention with dropout approaches attention without it (banded path)."""
    torch.manual_seed(0)
    pattern = SlidingWindow(8)
    q, k, v = (torch.randn(1, 2, 512, 16) for _ in range(3))
    plain, _ = pattern.attend(q, k, v)
    mean = sum(pattern.attend(q, k, v, dropout_p=0.2)[0] for _ in range(200)) / 200
    assert (mean - plain).abs().mean() < 0.02 < (pattern.attend(q, k, v, dropout_p=0.2)[0] - plain).abs().mean()
