"""The same code on every available device: CPU always, CUDA when present (run on a GPU machine too).

Results on each device must equal the CPU results; nothing in the library may assume the CPU.
"""

from __future__ import annotations

import pytest
import torch

from deltaformer.models import BertForSequenceClassification, BertModel

from .conftest import make_hf_bert

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _exact_matmul():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.mark.parametrize("device", DEVICES)
def test_bert_forward_and_weights_on_device(tmp_path, device):
    hf, path = make_hf_bert(tmp_path)
    model = BertModel.from_pretrained(path)
    ids = torch.randint(1, 99, (3, 19))
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, output_attentions=True)
        got = model.to(device)(ids.to(device), mask.to(device), output_attentions=True)
        fast = model(ids.to(device), mask.to(device))
    torch.testing.assert_close(got.last_hidden_state.cpu(), expected.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.last_hidden_state.cpu(), expected.last_hidden_state, atol=1e-5, rtol=0)
    for a, b in zip(got.attentions, expected.attentions):
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_bert_training_step_on_device(tmp_path, device):
    _, path = make_hf_bert(tmp_path, "BertForSequenceClassification", num_labels=2)
    model = BertForSequenceClassification.from_pretrained(path).to(device).train()
    ids = torch.randint(1, 99, (4, 11), device=device)
    loss = model(ids, labels=torch.tensor([0, 1, 1, 0], device=device)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.device.type == device for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_bert_low_precision_autocast(tmp_path, device, dtype):
    _, path = make_hf_bert(tmp_path)
    model = BertModel.from_pretrained(path).to(device)
    ids = torch.randint(1, 99, (2, 9), device=device)
    with torch.no_grad():
        ref = model(ids).last_hidden_state.float()
        with torch.autocast(device_type=device, dtype=dtype):
            low = model(ids).last_hidden_state.float()
    assert (low - ref).abs().max() < 0.1
