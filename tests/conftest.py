"""Shared fixtures: tiny random Hugging Face BERT checkpoints and the real assets (fetched on first use)."""

from __future__ import annotations

import pytest
import torch

#: Relative tolerance on top of atol 1e-5 where our CPU output meets another library's over a long
#: reduction: our linears run on oneDNN, theirs on MKL, and the two sum each product in another order (a few
#: ulps). Six layers of LayerNorm carried that to 1.1e-5 on one hidden state of magnitude 0.54 (prompt
#: tuning against peft), and the tiny MLM's vocabulary projection to 1.9e-5 on a logit (2e-6 relative).
ORACLE_RTOL = 1e-5


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


def make_hf_bert(tmp_path, cls_name: str = "BertModel", **overrides):
    """Save a random-init ``transformers`` BERT to ``tmp_path`` and return (hf_model, directory)."""
    import transformers

    settings = dict(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, type_vocab_size=2,
    )
    settings.update(overrides)
    config = transformers.BertConfig(**settings)
    config._attn_implementation = "eager"
    model = getattr(transformers, cls_name)(config).eval()
    model.save_pretrained(tmp_path)
    return model, tmp_path


@pytest.fixture
def hf_bert(tmp_path):
    return make_hf_bert(tmp_path)


@pytest.fixture(scope="session")
def minilm_dir():
    from deltaformer.data.assets import fetch

    return fetch("minilm")


@pytest.fixture(scope="session")
def tiny_mlm_dir():
    from deltaformer.data.assets import fetch

    return fetch("tiny-mlm")
