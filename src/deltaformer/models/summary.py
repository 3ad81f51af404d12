"""Where a model's parameters are: counts per part, trainable counts, and the textbook estimate."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from torch import nn


def _part(name: str) -> str:
    """Group a parameter name into embeddings / attention / mlp / norms / pooler / head."""
    if ".embeddings." in f".{name}" and "norm" not in name:
        return "embeddings"
    if "norm" in name:
        return "layer norms"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "feed-forward"
    if "pooler" in name:
        return "pooler"
    return "heads"


def parameter_breakdown(model: nn.Module) -> dict[str, dict[str, int]]:
    """{part: {"total": n, "trainable": n}}, counting each shared (tied) tensor once."""
    parts: dict[str, dict[str, int]] = defaultdict(lambda: {"total": 0, "trainable": 0})
    for name, param in model.named_parameters():  # named_parameters already skips tied duplicates
        part = parts[_part(name)]
        part["total"] += param.numel()
        part["trainable"] += param.numel() if param.requires_grad else 0
    return dict(parts)


def analytic_count(config: Any) -> int:
    """V·H + L·12·H²: token embeddings plus four H×H attention and two H×4H MLP matrices per layer.

    It leaves out position and segment embeddings, every bias and LayerNorm, the pooler and the heads,
    and assumes intermediate_size == 4·H.
    """
    return config.vocab_size * config.hidden_size + config.num_hidden_layers * 12 * config.hidden_size**2


def bytes_on_disk(path: Path) -> int:
    """Total size of weight and config files in a model (or run) directory, subfolders included."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*")
               if p.is_file() and p.suffix in {".safetensors", ".bin", ".gguf", ".json"})


def decoder_details(config: Any) -> dict[str, Any] | None:
    """What a decoder LM's config adds to the encoder sizes: key/value heads, head width, positions and head
    tying; None for other models."""
    if config.model_type == "llama":
        return {"kv_heads": config.num_key_value_heads, "head_dim": config.head_dim, "positions": "rope",
                "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling,
                "tied_head": config.tie_word_embeddings, "norm": "rmsnorm", "mlp": f"gated ({config.hidden_act})"}
    if config.model_type == "gpt2":
        return {"kv_heads": config.n_head, "head_dim": config.head_dim, "positions": "learned",
                "tied_head": config.tie_word_embeddings, "norm": "layernorm", "mlp": config.activation_function}
    return None
