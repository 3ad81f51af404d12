"""The banded sliding-window kernel equals its dense reference (outputs, weights, gradients), in linear memory."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deltaformer.errors import ConfigError
from deltaformer.nn.banded import banded_attention, window_to_dense
from deltaformer.nn.patterns import ExtraKV
from deltaformer.nn.sliding import GlobalTokens, LongformerMask, LongformerSelfAttention, SlidingWindow

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _qkv(batch=2, heads=4, seq=23, dim=8, dtype=torch.float64, device="cpu"):
    return [torch.randn(batch, heads, seq, dim, dtype=dtype, device=device, requires_grad=True) for _ in range(3)]


def _padding(batch, seq, device="cpu"):
    mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
    mask[-1, seq * 2 // 3:] = False
    mask[0, 3] = False  # a hole: a masked query in the middle of real ones
    return mask


def _extra(batch, heads, dim, dtype=torch.float64, device="cpu"):
    key, value = (torch.randn(batch, heads, 3, dim, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
    mask = torch.tensor([[True, True, False], [True, False, True]], device=device)[:batch]
    return ExtraKV(key, value, mask)


CASES = [  # window, dilation, causal, block, seq
    (2, 1, False, None, 23),
    (3, 2, False, None, 23),
    (4, 1, True, None, 17),
    (5, 3, False, 4, 23),
    (7, 1, False, 3, 30),  # blocks smaller than the window
    (2, [1, 2, 1, 3], False, None, 19),  # a dilation per head
    (3, 2, True, 5, 16),
    (40, 1, False, None, 9),  # window longer than the sequence
]


@pytest.mark.parametrize("window,dilation,causal,block,seq", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_fast_path_equals_dense_reference(window, dilation, causal, block, seq, masked):
    pattern = SlidingWindow(window, dilation, causal, block)
    q, k, v = _qkv(seq=seq)
    key_mask = _padding(2, seq) if masked else None
    extra = _extra(2, 4, 8) if masked else None
    fast, _ = pattern.attend(q, k, v, key_mask=key_mask, extra=extra)
    ref, ref_weights = pattern.reference(q, k, v, key_mask=key_mask, extra=extra)
    torch.testing.assert_close(fast, ref, atol=1e-12, rtol=0)
    inputs = [q, k, v] + ([extra.key, extra.value] if extra else [])
    grads = torch.autograd.grad((fast * ref.detach().cos()).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * ref.detach().cos()).sum(), inputs)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    # weights come in window layout and land on the dense reference's weights
    out, weights = pattern.attend(q, k, v, key_mask=key_mask, extra=extra, need_weights=True)
    slots = 3 if extra else 0
    assert weights.shape == (2, 4, seq, slots + window + (0 if causal else window) + 1)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(window_to_dense(weights, window, dilation, causal, slots), ref_weights, atol=1e-12, rtol=0)


def test_reference_is_the_band():
    band = SlidingWindow(2, dilation=2).allowed(7, 7, torch.device("cpu"))
    assert band[3].nonzero().flatten().tolist() == [1, 3, 5]
    assert band[0].nonzero().flatten().tolist() == [0, 2, 4]
    causal = SlidingWindow(1, causal=True).allowed(4, 4, torch.device("cpu"))
    assert causal.long().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]


def test_padded_queries_output_zeros_and_no_nans():
    q, k, v = _qkv(seq=12)
    key_mask = torch.zeros(2, 12, dtype=torch.bool)
    key_mask[0, :5] = True  # the second sequence is all padding
    out, _ = SlidingWindow(2).attend(q, k, v, key_mask=key_mask)
    assert torch.isfinite(out).all()
    assert out[0, :, 5:].abs().max() == 0 and out[1].abs().max() == 0


def test_decoding_with_a_cache_sees_the_causal_window():
    pattern = SlidingWindow(3, causal=True)
    q, k, v = _qkv(seq=10)
    full, _ = pattern.attend(q, k, v)
    last, _ = pattern.attend(q[:, :, -1:], k, v)
    torch.testing.assert_close(last, full[:, :, -1:], atol=1e-12, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_dtypes_and_devices(device, dtype, atol):
    pattern = SlidingWindow(4, dilation=2)
    exact = [t.detach() for t in _qkv(seq=37, device=device)]
    q, k, v = (t.to(dtype).requires_grad_() for t in exact)
    extra = _extra(2, 4, 8, device=device)
    low_extra = ExtraKV(extra.key.detach().to(dtype), extra.value.detach().to(dtype), extra.mask)
    key_mask = _padding(2, 37, device)
    fast, _ = pattern.attend(q, k, v, key_mask=key_mask, extra=low_extra)
    fast.float().square().sum().backward()
    ref, _ = pattern.reference(*(t.to(dtype).double() for t in exact), key_mask=key_mask,
                               extra=ExtraKV(low_extra.key.double(), low_extra.value.double(), extra.mask))
    assert fast.dtype == dtype and fast.device.type == device
    torch.testing.assert_close(fast.double(), ref, atol=atol, rtol=0)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("dilation", [1, 3])
def test_memory_is_linear_in_the_sequence(dilation):
    """No (seq x seq) tensor, in forward or backward: the largest is a few windows' worth per position."""
    seq, heads, dim, window = 2048, 2, 4, 8
    pattern = SlidingWindow(window, dilation)
    q, k, v = _qkv(batch=1, heads=heads, seq=seq, dim=dim, dtype=torch.float32)
    extra = _extra(1, heads, dim, torch.float32)
    with _LargestTensor() as probe:
        out, _ = pattern.attend(q, k, v, key_mask=torch.ones(1, seq, dtype=torch.bool), extra=extra)
        out.sum().backward()
    assert probe.largest < seq * seq / 16
    assert probe.largest <= seq * heads * (3 * max(window, 32) + 3) * 2


def test_kernel_rejects_nothing_odd_and_pattern_checks_arguments():
    with pytest.raises(ConfigError, match="dilations >= 1"):
        SlidingWindow(4, dilation=0)
    q, k, v = _qkv(heads=2)
    with pytest.raises(ConfigError, match="one per head"):
        SlidingWindow(4, dilation=[1, 2, 3]).attend(q, k, v)
    out, _ = banded_attention(q, k, v, window=0)  # a window of 0: each token sees itself
    torch.testing.assert_close(out, v, atol=1e-12, rtol=0)


def test_global_tokens_from_mask():
    mask = torch.tensor([[0, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    tokens = GlobalTokens.from_mask(mask)
    assert tokens.index[0].tolist() == [1, 3]
    assert tokens.index[1, 0] == 0 and tokens.valid.tolist() == [[True, True], [True, False], [False, False]]
    assert len(set(tokens.index[1].tolist())) == 2  # spare slots point at distinct positions
    assert GlobalTokens.from_mask(torch.zeros(2, 4)) is None


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("prefix", [False, True])
def test_longformer_attention_equals_dense_reference(fold, prefix):
    """Global tokens (folded or projected), prefix slots and padding, against the dense reference pattern."""
    attn = LongformerSelfAttention(16, 4, window=2, dilation=[1, 2, 1, 2]).double().eval()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    padding = _padding(2, 11)
    tokens = GlobalTokens.from_mask(torch.tensor([[1, 0, 0, 0, 1] + [0] * 6, [0, 0, 1] + [0] * 8]).bool() & padding)
    if prefix:
        slots = _extra(2, 4, 4)
        attn.prefix = lambda batch: ExtraKV(slots.key.detach(), slots.value.detach(), slots.mask)
    if not fold:
        attn._foldable = lambda count: False
    fast, (local, global_) = attn(x, LongformerMask(padding, tokens), need_weights=True)
    assert local.shape == (2, 4, 11, (3 if prefix else 0) + 2 + 5) and global_.shape[:3] == (2, 4, 2)
    assert global_[1, :, 1].abs().max() == 0  # the second sequence has one global token: its spare slot is empty
    pattern = attn.pattern
    attn.pattern.attend = lambda *args, need_weights=False, **kwargs: pattern.reference(*args, **kwargs)
    ref, _ = attn(x, LongformerMask(padding, tokens))
    torch.testing.assert_close(fast, ref, atol=1e-12, rtol=0)
