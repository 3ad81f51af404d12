"""P-tuning (Liu et al., 2021, v1): soft tokens produced by a prompt encoder (an LSTM or an MLP).

The encoder (peft's PromptEncoder layout) turns k embeddings into k soft tokens on every forward. They are
prepended like prompt tuning (peft's style), or, with ``placeholder_id``, replace the embeddings of that
token in the input: the j-th placeholder of a sample gets soft token j (template positions, as in the paper).
Encoders differ per delta, so each used delta's tokens are computed once per forward, stacked and gathered
per sample; no Python loop over samples. Our own file format (``DELTAFORMER_PTUNING``) keeps the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DeltaError
from .config import DeltaConfig
from .hooks import InputStore, Prompted, chain_store, drop_store_if_empty, find_store, prepend, store_holding
from .host import backbone_of
from .method import Method, check_keys, register
from .ops import check_shape
from .routing import DeltaRouter


@dataclass
class PTuningConfig(DeltaConfig):
    """``encoder``: "mlp" or "lstm" (bidirectional, ``encoder_num_layers``); ``placeholder_id``: None to
    prepend, else the token id whose embeddings the soft tokens replace."""

    method: ClassVar[str] = "ptuning"
    finetune_lr: ClassVar[float] = 3e-3
    num_virtual_tokens: int = field(default=20, metadata={
        "help": "soft tokens the prompt encoder produces", "cli": "num_virtual_tokens", "finetune": 16,
        "aliases": ("prefix_length", "length")})
    encoder: str = field(default="mlp", metadata={"help": "prompt encoder: mlp or lstm"})
    encoder_hidden_size: int | None = field(default=None, metadata={"help": "inner size of the encoder"})
    encoder_num_layers: int = field(default=2, metadata={"help": "LSTM layers"})
    encoder_dropout: float = field(default=0.0, metadata={"help": "dropout between LSTM layers"})
    placeholder_id: int | None = field(default=None, metadata={
        "help": "token id whose embeddings the soft tokens replace (None: prepend)"})
    modules_to_save: tuple[str, ...] | None = field(default=None, metadata={
        "help": "head modules trained and saved with the delta (None: the model's task head)"})

    def __post_init__(self) -> None:
        if self.encoder not in ("mlp", "lstm"):
            raise DeltaError(f"P-tuning encoder {self.encoder!r} is unknown: use 'mlp' or 'lstm'")
        if self.num_virtual_tokens < 1:
            raise DeltaError(f"num_virtual_tokens={self.num_virtual_tokens} must be at least 1")


class PromptEncoder(nn.Module):
    """peft's PromptEncoder: ``embedding`` (k, hidden) -> [bidirectional LSTM] -> MLP -> (k, hidden)."""

    def __init__(self, config: PTuningConfig, hidden: int, like: Tensor) -> None:
        super().__init__()
        kw: dict[str, Any] = {"dtype": like.dtype, "device": like.device}
        inner = config.encoder_hidden_size or hidden
        self.embedding = nn.Embedding(config.num_virtual_tokens, hidden, **kw)
        self.lstm_head: nn.LSTM | None = None
        if config.encoder == "lstm":
            self.lstm_head = nn.LSTM(hidden, inner, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True, **kw)
            self.mlp_head = nn.Sequential(nn.Linear(2 * inner, 2 * inner, **kw), nn.ReLU(), nn.Linear(2 * inner, hidden, **kw))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(hidden, inner, **kw), nn.ReLU(), nn.Linear(inner, inner, **kw), nn.ReLU(),
                                          nn.Linear(inner, hidden, **kw))

    def forward(self) -> Tensor:
        x = self.embedding.weight
        if self.lstm_head is not None:
            x = self.lstm_head(x[None])[0][0]
        return self.mlp_head(x)


class PromptEncoders(InputStore):
    """The prompt encoders of every P-tuning delta; soft tokens are stacked per forward, then gathered."""

    method = "ptuning"
    slot_lists = ("lengths", "placeholders")

    def __init__(self, router: DeltaRouter) -> None:
        super().__init__(router)
        self.encoders = nn.ModuleDict()
        self.lengths: list[int] = []
        self.placeholders: list[int | None] = []

    def add(self, name: str, config: PTuningConfig, like: Tensor) -> None:
        self.encoders[name] = PromptEncoder(config, like.shape[-1], like)
        self.stack_add(name, {})
        self.lengths.append(config.num_virtual_tokens)
        self.placeholders.append(config.placeholder_id)

    def stack_remove(self, name: str) -> int:
        del self.encoders[name]
        return super().stack_remove(name)

    def tokens(self, s: int) -> Tensor:
        return self.encoders[self.slots[s]]()

    def prompt_input(self, input_ids: Tensor | None, embeds: Tensor, mask: Tensor, types: Tensor,
              positions: Tensor | None) -> Prompted:
        batch = embeds.shape[0]
        sel = self.select(batch, embeds.device)
        if sel is None:
            return embeds, mask, types, positions
        if sel.index is None:
            front = []
            for s in sel.each:
                tokens = self.tokens(s).to(embeds.dtype)
                if self.placeholders[s] is None:
                    front.append(tokens)
                else:
                    on = torch.ones(batch, dtype=torch.bool, device=embeds.device)
                    pid = torch.full((batch,), int(self.placeholders[s] or 0), device=embeds.device)
                    embeds = insert(input_ids, embeds, tokens[None].expand(batch, -1, -1), pid, on, self.lengths[s])
            if front:
                tokens = torch.cat(front)[None].expand(batch, -1, -1)
                embeds, mask, types = prepend(embeds, mask, types, tokens)
            return embeds, mask, types, positions
        k = max(self.lengths[s] for s in sel.used)
        table = torch.stack([F.pad(self.tokens(s), (0, 0, 0, k - self.lengths[s])) if s in sel.used
                             else embeds.new_zeros(k, embeds.shape[-1]) for s in range(len(self.slots))])
        tokens = table[sel.index].to(embeds.dtype)
        device = embeds.device
        kept = sel.keep > 0 if sel.keep is not None else torch.ones(batch, dtype=torch.bool, device=device)
        inserting = torch.tensor([p is not None for p in self.placeholders], device=device)[sel.index] & kept
        lengths = torch.tensor(self.lengths, device=device)[sel.index]
        if any(self.placeholders[s] is not None for s in sel.used):
            pid = torch.tensor([p if p is not None else -1 for p in self.placeholders], device=device)[sel.index]
            embeds = insert(input_ids, embeds, tokens, pid, inserting, lengths)
        if any(self.placeholders[s] is None for s in sel.used):
            embeds, mask, types = prepend(embeds, mask, types, tokens, lengths * (kept & ~inserting))
        return embeds, mask, types, positions

    def slot_numel(self, slot: int) -> int:
        return sum(p.numel() for p in self.encoders[self.slots[slot]].parameters())


def insert(input_ids: Tensor | None, embeds: Tensor, tokens: Tensor, placeholder: Tensor, on: Tensor,
           lengths: Tensor | int) -> Tensor:
    """Replace the j-th ``placeholder[b]`` token of sample b by ``tokens[b, j]`` where ``on[b]``."""
    if input_ids is None:
        raise DeltaError("P-tuning with placeholder_id needs input_ids (not inputs_embeds) to find the placeholders")
    hit = (input_ids == placeholder[:, None]) & on[:, None]
    count = hit.sum(1)
    if bool((count > lengths).any()):
        raise DeltaError("an input has more placeholder tokens than its P-tuning delta has soft tokens: "
                         "use as many placeholders as num_virtual_tokens")
    j = (hit.cumsum(1) - 1).clamp(0, tokens.shape[1] - 1)
    picked = tokens.gather(1, j[..., None].expand(-1, -1, tokens.shape[-1]))
    return torch.where(hit[..., None], picked, embeds)


class PTuning(Method[PTuningConfig]):
    name = "ptuning"
    config_class = PTuningConfig
    peft_type = "DELTAFORMER_PTUNING"
    prompt_learning = True
    merge_reason = "its soft tokens come from a prompt encoder and change the input sequence; no weight equals them"

    def attach(self, model: nn.Module, config: PTuningConfig, name: str, router: DeltaRouter) -> None:
        store = chain_store(model, "ptuning", PromptEncoders, lambda: PromptEncoders(router))
        store.add(name, config, backbone_of(model).get_input_embeddings().weight)

    def detach(self, model: nn.Module, name: str) -> None:
        store = find_store(model, "ptuning", PromptEncoders)
        if store is not None and name in store.slots:
            store.stack_remove(name)
            drop_store_if_empty(model, "ptuning")

    def _encoder(self, model: nn.Module, name: str) -> PromptEncoder:
        encoder = store_holding(model, "ptuning", name, PromptEncoders).encoders[name]
        assert isinstance(encoder, PromptEncoder)
        return encoder

    def export(self, model: nn.Module, name: str, config: PTuningConfig) -> tuple[dict[str, Any], dict[str, Tensor]]:
        state = self._encoder(model, name).state_dict()
        return ({"peft_type": self.peft_type, "deltaformer": config.to_dict()},
                {f"prompt_encoder.{k}": v.detach() for k, v in state.items()})

    def config_from_file(self, data: dict[str, Any], model: nn.Module) -> PTuningConfig:
        return self.own_config(data)

    def load_tensors(self, model: nn.Module, name: str, tensors: dict[str, Tensor]) -> None:
        state = self._encoder(model, name).state_dict()
        expected = {f"prompt_encoder.{k}": v for k, v in state.items()}
        check_keys(expected, tensors)
        for key, value in expected.items():
            check_shape(key, tensors[key], value.shape)
        self._encoder(model, name).load_state_dict({k.removeprefix("prompt_encoder."): v for k, v in tensors.items()})

    def counts(self, model: nn.Module, name: str) -> dict[str, int]:
        return {"prompt_encoder": sum(p.numel() for p in self._encoder(model, name).parameters())}


register(PTuning())
