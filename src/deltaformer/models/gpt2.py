"""GPT-2 (Radford et al. 2019): learned positions, pre-LayerNorm blocks, an LM head tied to the tokens.

Hugging Face stores GPT-2's projections as ``Conv1D`` (weights ``[in, out]``) with query, key and value in
one ``c_attn``. Here they are plain linears (``[out, in]``) and three projections, like every other model,
so deltas name them the same way everywhere: loading transposes and splits, saving joins and transposes
back, and the file ``transformers`` reads is what it wrote.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from ..checkpoints.names import NameMap
from ..config import GPT2Config
from ..errors import CheckpointError, ConfigError
from ..nn.attention import SelfAttention
from ..nn.dropout import Dropout
from ..nn.mlp import FeedForward
from ..nn.patterns import Causal
from .base import LoadReport
from .common import check_length
from .decoder import DecoderForCausalLM, DecoderForSequenceClassification, DecoderLayer, DecoderModel

#: HF names once ``c_attn`` is split into ``query``/``key``/``value`` (what :func:`from_hf_layout` makes).
GPT2_NAMES = NameMap([
    ("wte", "embeddings.tokens"),
    ("wpe", "embeddings.positions"),
    ("h.{i}.ln_1", "layers.{i}.attn_norm"),
    ("h.{i}.attn.query", "layers.{i}.attn.query"),
    ("h.{i}.attn.key", "layers.{i}.attn.key"),
    ("h.{i}.attn.value", "layers.{i}.attn.value"),
    ("h.{i}.attn.c_proj", "layers.{i}.attn.out"),
    ("h.{i}.ln_2", "layers.{i}.mlp_norm"),
    ("h.{i}.mlp.c_fc", "layers.{i}.mlp.up"),
    ("h.{i}.mlp.c_proj", "layers.{i}.mlp.down"),
    ("ln_f", "norm"),
])

_CONV1D = re.compile(r"(^|\.)h\.\d+\.(attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_FUSED = re.compile(r"^(?P<head>(.*\.)?h\.\d+\.attn\.)c_attn\.(?P<kind>weight|bias)$")
_BUFFERS = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers of old checkpoints
_SPLIT = re.compile(r"^(?P<head>(.*\.)?h\.\d+\.attn\.)query\.(?P<kind>weight|bias)$")


def from_hf_layout(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF GPT-2 tensors -> linear layout: Conv1D weights transposed, ``c_attn`` split in three."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if _BUFFERS.search(name):
            continue
        fused = _FUSED.match(name)
        if fused:
            head, kind = fused["head"], fused["kind"]
            if tensor.shape[-1] % 3:
                raise CheckpointError(f"{name} has shape {tuple(tensor.shape)}: c_attn must hold query, key "
                                      "and value side by side (a multiple of 3 columns)")
            parts = tensor.chunk(3, dim=-1)
            for part, proj in zip(parts, ("query", "key", "value")):
                out[f"{head}{proj}.{kind}"] = part.t().contiguous() if kind == "weight" else part.contiguous()
        elif _CONV1D.search(name):
            out[name] = tensor.t().contiguous()
        else:
            out[name] = tensor
    return out


def to_hf_layout(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`from_hf_layout`: what ``transformers`` stores."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        split = _SPLIT.match(name)
        if split:
            head, kind = split["head"], split["kind"]
            parts = [state[f"{head}{proj}.{kind}"] for proj in ("query", "key", "value")]
            fused = torch.cat(parts, dim=0)
            out[f"{head}c_attn.{kind}"] = fused.t().contiguous() if kind == "weight" else fused
        elif re.search(r"\.attn\.(key|value)\.(weight|bias)$", name):
            continue
        elif _CONV1D.search(name):
            out[name] = tensor.t().contiguous()
        else:
            out[name] = tensor
    return out


class GPT2Embeddings(nn.Module):
    """Token + learned position embeddings, then dropout."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.positions = nn.Embedding(config.n_positions, config.n_embd)
        self.dropout = Dropout(config.embd_pdrop)


class GPT2Layout:
    """Loading and saving through :func:`from_hf_layout` / :func:`to_hf_layout` (mixed into each class)."""

    def load_hf_state_dict(self, state: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
                           strict: bool = True) -> LoadReport:
        whole = state if isinstance(state, Mapping) else dict(state)  # c_attn is split: the layout needs all
        return super().load_hf_state_dict(from_hf_layout(whole), strict)  # type: ignore[misc]

    def hf_state_dict(self) -> dict[str, Tensor]:
        return to_hf_layout(super().hf_state_dict())  # type: ignore[misc]


def _check_gpt2(config: GPT2Config) -> None:
    if config.extra.get("add_cross_attention"):
        raise ConfigError("add_cross_attention=true (GPT-2 as an encoder-decoder's decoder) is not supported: "
                          "use a decoder-only GPT-2 checkpoint")


class GPT2Model(GPT2Layout, DecoderModel):
    """The GPT-2 decoder stack (HF ``GPT2Model``)."""

    config_class = GPT2Config
    hf_architecture = "GPT2Model"
    hf_backbone_prefix = "transformer."
    config: GPT2Config
    embeddings: GPT2Embeddings

    def __init__(self, config: GPT2Config) -> None:
        _check_gpt2(config)
        super().__init__(config)
        self.embeddings = GPT2Embeddings(config)
        self.layers = nn.ModuleList(self._layer(config, i) for i in range(config.n_layer))
        self.norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.init_weights()

    @staticmethod
    def _layer(config: GPT2Config, index: int) -> DecoderLayer:
        attn = SelfAttention(config.n_embd, config.n_head, dropout=config.attn_pdrop, pattern=Causal())
        scale = attn.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        attn.scale = scale / (index + 1) if config.scale_attn_by_inverse_layer_idx else scale
        return DecoderLayer(
            attn, nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            FeedForward(config.n_embd, config.intermediate_size, config.activation_function),
            nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon), dropout=config.resid_pdrop,
        )

    @classmethod
    def backbone_name_map(cls) -> NameMap:
        return GPT2_NAMES

    def embed(self, inputs_embeds: Tensor, position_ids: Tensor) -> Tensor:
        check_length(int(position_ids.max()) + 1 if position_ids.numel() else 0, self.config.n_positions)
        return self.embeddings.dropout(inputs_embeds + self.embeddings.positions(position_ids))


class GPT2LMHeadModel(GPT2Layout, DecoderForCausalLM):
    """GPT-2 with its language-model head (tied to the token embeddings unless the config says otherwise)."""

    config_class = GPT2Config
    hf_architecture = "GPT2LMHeadModel"
    hf_backbone_prefix = "transformer."
    backbone_class = GPT2Model


class GPT2ForSequenceClassification(GPT2Layout, DecoderForSequenceClassification):
    """GPT-2 with a linear ``score`` on the last real token of each sequence (HF's rule)."""

    config_class = GPT2Config
    hf_architecture = "GPT2ForSequenceClassification"
    hf_backbone_prefix = "transformer."
    backbone_class = GPT2Model
