"""Prefix tuning (Li & Liang, 2021) and P-tuning v2 (Liu et al., 2022): trainable key/value slots per layer.

Every attention layer's ``prefix`` hook returns :class:`~deltaformer.nn.patterns.ExtraKV` slots that every
query sees. Stored as ``kv`` (n_deltas, k_max, layers, 2, kv_dim); in a routed batch a sample whose delta
has fewer (or no) slots gets ``mask=False`` for the rest, so it attends exactly as it would alone.
As in peft (and HF, which treats the prefix as cached past tokens), the input's position ids start after
the k slots; ``position_offset=False`` keeps them at 0.

``projection=True`` is peft's ``prefix_projection``: slots are computed by an MLP (embedding -> tanh ->
all layers) during training; files hold the computed prefix, and :func:`export_prefix` drops the MLP.
P-tuning v2 is this module without reparameterisation, the task head reading [CLS]: :class:`PTuningV2Config`.
Cannot merge: extra attention slots change every softmax; no weight equals them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DeltaError
from ..nn.attention import SelfAttention
from ..nn.patterns import ExtraKV
from .config import DeltaConfig
from .files import base_model_name, task_type
from .hooks import InputStore, Prompted, chain_store, drop_store_if_empty, find_store, store_holding
from .host import backbone_of
from .method import Method, check_keys, register
from .ops import check_shape
from .routing import DeltaRouter, Selection


@dataclass
class PrefixConfig(DeltaConfig):
    """``num_virtual_tokens``: k slots per layer; ``projection``/``encoder_hidden_size``: peft's MLP
    reparameterisation; ``init_std``: normal init of direct slots (peft's nn.Embedding default is 1)."""

    method: ClassVar[str] = "prefix"
    finetune_lr: ClassVar[float] = 3e-3
    num_virtual_tokens: int = field(default=20, metadata={
        "help": "key/value slots per layer", "cli": "prefix_length", "finetune": 16,
        "aliases": ("prefix_length", "length")})
    projection: bool = field(default=False, metadata={
        "help": "train through peft's MLP reparameterisation (folded into plain slots when saved); it wants a "
        "far lower learning rate than the slots alone", "cli": "projection"})
    encoder_hidden_size: int | None = field(default=None, metadata={"help": "inner size of the projection MLP"})
    position_offset: bool = field(default=True, metadata={"help": "input positions start after the slots"})
    init_std: float = field(default=1.0, metadata={"help": "std of the normal init of direct slots"})
    modules_to_save: tuple[str, ...] | None = field(default=None, metadata={
        "help": "head modules trained and saved with the delta (None: the model's task head)"})

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise DeltaError(f"num_virtual_tokens={self.num_virtual_tokens} must be at least 1")


@dataclass
class PTuningV2Config(PrefixConfig):
    """P-tuning v2: deep prompts on every layer, no reparameterisation; the task head reads [CLS]."""

    method: ClassVar[str] = "ptuning2"
    projection: bool = field(default=False, metadata={"help": "always False: P-tuning v2 has no reparameterisation"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.projection:
            raise DeltaError("P-tuning v2 has no reparameterisation: use PrefixConfig(projection=True) for that")


class PrefixProjection(nn.Module):
    """peft's PrefixEncoder with ``prefix_projection``: embedding (k, hidden) -> Linear, tanh, Linear."""

    def __init__(self, k: int, hidden: int, inner: int, layers: int, kv_dim: int, like: Tensor) -> None:
        super().__init__()
        kw: dict[str, Any] = {"dtype": like.dtype, "device": like.device}
        self.embedding = nn.Embedding(k, hidden, **kw)
        self.transform = nn.Sequential(nn.Linear(hidden, inner, **kw), nn.Tanh(), nn.Linear(inner, layers * 2 * kv_dim, **kw))
        self.layers, self.kv_dim = layers, kv_dim

    def layer(self, index: int) -> Tensor:
        """(k, 2, kv_dim) of one layer: only that layer's rows of the last projection are computed."""
        rows = slice(index * 2 * self.kv_dim, (index + 1) * 2 * self.kv_dim)
        first, last = self.transform[0], self.transform[2]
        assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
        hidden = torch.tanh(first(self.embedding.weight))
        return F.linear(hidden, last.weight[rows], last.bias[rows]).view(-1, 2, self.kv_dim)

    def full(self) -> Tensor:
        return self.transform(self.embedding.weight).view(-1, self.layers, 2, self.kv_dim)


class PrefixSlots(InputStore):
    """Key/value slots of every prefix delta, for all layers; also shifts position ids past them."""

    method = "prefix"
    stacked = ("kv",)
    slot_lists = ("lengths", "offsets")
    kv: Tensor  # (n_deltas, k_max, layers, 2, kv_dim), registered by stack_add
    length_vec: Tensor
    offset_vec: Tensor

    def __init__(self, router: DeltaRouter, layers: int, heads: int, head_dim: int, max_positions: int | None) -> None:
        super().__init__(router)
        self.n_layers, self.heads, self.head_dim = layers, heads, head_dim
        self.max_positions = max_positions
        self.lengths: list[int] = []
        self.offsets: list[int] = []
        self.projections = nn.ModuleDict()
        self.register_buffer("length_vec", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("offset_vec", torch.zeros(0, dtype=torch.long), persistent=False)

    def add(self, name: str, config: PrefixConfig, like: Tensor) -> None:
        k, kv_dim = config.num_virtual_tokens, self.heads * self.head_dim
        kv = like.new_zeros(k, self.n_layers, 2, kv_dim)
        if config.projection:
            hidden = like.shape[-1]
            self.projections[name] = PrefixProjection(
                k, hidden, config.encoder_hidden_size or hidden, self.n_layers, kv_dim, like)
        else:
            kv.normal_(0.0, config.init_std)
        self.stack_add(name, {"kv": kv.detach()})
        self.lengths.append(k)
        self.offsets.append(k if config.position_offset else 0)
        self.refresh()

    def stack_remove(self, name: str) -> int:
        if name in self.projections:
            del self.projections[name]
        return super().stack_remove(name)

    def refresh(self) -> None:
        device = self.kv.device
        self.length_vec = torch.tensor(self.lengths, dtype=torch.long, device=device)
        self.offset_vec = torch.tensor(self.offsets, dtype=torch.long, device=device)

    def rows(self, s: int, layer: int) -> Tensor:
        """(k_s, 2, kv_dim) slots of delta ``s`` at ``layer``."""
        name = self.slots[s]
        if name in self.projections:
            return self.projection(name).layer(layer)
        return self.kv[s, : self.lengths[s], layer]

    def projection(self, name: str) -> PrefixProjection:
        projection = self.projections[name]
        assert isinstance(projection, PrefixProjection)
        return projection

    def export(self, name: str) -> None:
        """Replace delta ``name``'s MLP reparameterisation by the prefix it computes (after training)."""
        if name in self.projections:
            s = self.slot(name)
            with torch.no_grad():
                self.kv[s, : self.lengths[s]].copy_(self.projection(name).full())
            del self.projections[name]
            self._forget_projection(name)

    def _forget_projection(self, name: str) -> None:
        """The delta's config says it has no projection any more (its slots now hold the prefix)."""
        config = self.router.deltas[name].config
        assert isinstance(config, PrefixConfig)
        self.router.replace_config(name, dataclasses.replace(config, projection=False))

    def extra(self, layer: int, batch: int) -> ExtraKV | None:
        sel = self.select(batch, self.kv.device)
        if sel is None:
            return None
        if sel.index is None:
            kv = torch.cat([self.rows(s, layer) for s in sel.each])[None].expand(batch, -1, -1, -1)
            return ExtraKV(self._heads(kv[:, :, 0]), self._heads(kv[:, :, 1]))
        k = max(self.lengths[s] for s in sel.used)
        table = self.kv[:, :k, layer]
        if any(self.slots[s] in self.projections for s in sel.used):  # computed slots join the stack
            table = torch.stack([
                F.pad(self.rows(s, layer), (0, 0, 0, 0, 0, k - self.lengths[s])) if s in sel.used
                else table[s].detach() for s in range(len(self.slots))
            ])
        kv = table[sel.index]
        lengths = self._lengths(sel)
        mask = torch.arange(k, device=kv.device)[None, :] < lengths[:, None]
        return ExtraKV(self._heads(kv[:, :, 0]), self._heads(kv[:, :, 1]), mask)

    def _lengths(self, sel: Selection) -> Tensor:
        lengths = self.length_vec[sel.index]
        return lengths * (sel.keep > 0) if sel.keep is not None else lengths

    def _heads(self, x: Tensor) -> Tensor:
        """(B, k, kv_dim) -> (B, kv_heads, k, head_dim)."""
        return x.reshape(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def prompt_input(self, input_ids: Tensor | None, embeds: Tensor, mask: Tensor, types: Tensor,
              positions: Tensor | None) -> Prompted:
        """Position ids start after the slots (peft/HF); samples without a prefix keep 0.."""
        batch, seq = embeds.shape[:2]
        sel = self.select(batch, embeds.device)
        if sel is None:
            return embeds, mask, types, positions
        base = positions if positions is not None else torch.arange(seq, device=embeds.device).expand(batch, seq)
        if sel.index is None:
            shift = sum(self.offsets[s] for s in sel.each)
            if not shift:
                return embeds, mask, types, positions
            self._check(seq + shift)
            return embeds, mask, types, base + shift
        shifts = self.offset_vec[sel.index]
        if sel.keep is not None:
            shifts = shifts * (sel.keep > 0)
        self._check(seq + max(self.offsets[s] for s in sel.used))
        return embeds, mask, types, base + shifts[:, None]

    def _check(self, needed: int) -> None:
        if self.max_positions is not None and needed > self.max_positions:
            raise DeltaError(f"input plus prefix needs {needed} positions but the model has {self.max_positions}: "
                             "shorten the input or use position_offset=False")

    def slot_numel(self, slot: int) -> int:
        name = self.slots[slot]
        if name in self.projections:
            return sum(p.numel() for p in self.projections[name].parameters())
        return self.kv[slot, : self.lengths[slot]].numel()


class PrefixHook(nn.Module):
    """An attention layer's ``prefix``: asks the shared slot store for this layer's ExtraKV."""

    def __init__(self, store: PrefixSlots, layer: int) -> None:
        super().__init__()
        self._store = [store]  # a list: the store is registered once, in the prompt chain
        self.layer = layer

    def forward(self, batch_size: int) -> ExtraKV | None:
        return self._store[0].extra(self.layer, batch_size)


def attention_layers(model: nn.Module) -> list[SelfAttention]:
    return [m for m in backbone_of(model).modules() if isinstance(m, SelfAttention)]


class PrefixTuning(Method[PrefixConfig]):
    name = "prefix"
    config_class = PrefixConfig
    peft_type = "PREFIX_TUNING"
    prompt_learning = True
    merge_reason = "its extra key/value slots change every attention softmax; no weight equals them"

    def attach(self, model: nn.Module, config: PrefixConfig, name: str, router: DeltaRouter) -> None:
        layers = attention_layers(model)
        if not layers:
            raise DeltaError(f"{type(model).__name__} has no SelfAttention layers for prefix slots")
        first = layers[0]
        bb = backbone_of(model)
        store = find_store(model, "prefix", PrefixSlots)
        if store is None:
            max_pos = bb.config.max_position_embeddings
            store = chain_store(model, "prefix", PrefixSlots, lambda: PrefixSlots(
                router, len(layers), first.n_kv_heads, first.head_dim, max_pos))
            for i, attn in enumerate(layers):
                if attn.prefix is not None:
                    raise DeltaError(f"attention layer {i} already has a prefix provider: remove it first")
                attn.prefix = PrefixHook(store, i)
        store.add(name, config, bb.get_input_embeddings().weight)

    def detach(self, model: nn.Module, name: str) -> None:
        store = find_store(model, "prefix", PrefixSlots)
        if store is None or name not in store.slots:
            return
        store.stack_remove(name)
        if not store.slots:
            for attn in attention_layers(model):
                if isinstance(attn.prefix, PrefixHook):
                    attn.prefix = None
            drop_store_if_empty(model, "prefix")

    def export(self, model: nn.Module, name: str, config: PrefixConfig) -> tuple[dict[str, Any], dict[str, Tensor]]:
        store = store_holding(model, "prefix", name, PrefixSlots)
        s = store.slot(name)
        k = store.lengths[s]
        with torch.no_grad():
            kv = store.projection(name).full() if name in store.projections else store.kv[s, :k]
        bb_config = backbone_of(model).config
        data = {
            "peft_type": self.peft_type, "task_type": task_type(model, prompt_learning=True),
            "base_model_name_or_path": base_model_name(model), "inference_mode": True,
            "num_virtual_tokens": k, "token_dim": store.heads * store.head_dim, "num_transformer_submodules": 1,
            "num_attention_heads": store.heads, "num_layers": store.n_layers,
            "encoder_hidden_size": config.encoder_hidden_size or bb_config.hidden_size, "prefix_projection": False,
            "modules_to_save": None,
        }
        return data, {"prompt_embeddings": kv.reshape(k, -1).detach()}

    def config_from_file(self, data: dict[str, Any], model: nn.Module) -> PrefixConfig:
        if data.get("num_transformer_submodules", 1) not in (1, None):
            raise DeltaError("this prefix-tuning file is for an encoder-decoder (num_transformer_submodules=2): "
                             "load it into an encoder-decoder model")
        return PrefixConfig(num_virtual_tokens=int(data["num_virtual_tokens"]),
                            modules_to_save=tuple(data["modules_to_save"]) if data.get("modules_to_save") else None)

    def load_tensors(self, model: nn.Module, name: str, tensors: dict[str, Tensor]) -> None:
        check_keys({"prompt_embeddings": None}, tensors)
        store = store_holding(model, "prefix", name, PrefixSlots)
        s = store.slot(name)
        k = store.lengths[s]
        check_shape("prompt_embeddings", tensors["prompt_embeddings"], (k, store.n_layers * 2 * store.heads * store.head_dim))
        if name in store.projections:  # a computed prefix replaces the reparameterisation
            del store.projections[name]
            store._forget_projection(name)  # and the config says so, as after export_prefix
        with torch.no_grad():
            store.kv[s, :k].copy_(tensors["prompt_embeddings"].view(k, store.n_layers, 2, -1))

    def counts(self, model: nn.Module, name: str) -> dict[str, int]:
        store = store_holding(model, "prefix", name, PrefixSlots)
        return {"prefix": store.slot_numel(store.slot(name))}


class PTuningV2(PrefixTuning):
    name = "ptuning2"
    config_class = PTuningV2Config


def export_prefix(model: nn.Module, name: str) -> None:
    """Replace delta ``name``'s MLP reparameterisation by the prefix it computes (after training)."""
    store = find_store(model, "prefix", PrefixSlots)
    if store is None or name not in store.slots:
        raise DeltaError(f"no prefix delta named {name!r} is attached")
    store.export(name)


register(PrefixTuning())
register(PTuningV2())
