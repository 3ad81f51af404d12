"""``deltaformer plot-attention``: draw which keys each query may see, or what a model's head attends to.

Two modes, one PNG each:

* pattern: ``--length 64 --window 4 [--dilation 2] [--global 0,17] [--causal]`` draws the allowed cells of a
  sliding-window (Longformer) pattern, global rows and columns in another colour;
* model: ``--model DIR --text "..." --layer 0 --head 0`` runs a deltaformer encoder (BERT or Longformer, bare
  or with a head) on the text and draws that head's attention weights as a heatmap, next to the layer's
  allowed pattern for a Longformer. Longformer weights come in window layout; they are unrolled to (S, S).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoints.io import atomic_write
from ..errors import ConfigError, InputError
from ..nn.sliding import SlidingWindow, dense_weights, with_global

#: Longest input drawn: the plot holds a dense (length x length) matrix.
MAX_LENGTH = 8192
#: Inputs up to this many tokens get their tokens as tick labels.
MAX_LABELLED = 48


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plot-attention",
        help="draw a sliding-window attention pattern, or a model head's attention weights, as a PNG",
        description="Without --model: draw the cells a query may attend to for --length tokens with a --window "
        "(per side), --dilation and --global positions. With --model and --text: draw the attention weights "
        "of --layer/--head on that text (BERT or Longformer checkpoints, e.g. from `deltaformer convert-long`).",
    )
    p.add_argument("--out", "-o", required=True, type=Path, help="PNG file to write")
    p.add_argument("--length", type=int, help="pattern mode: sequence length in tokens")
    p.add_argument("--window", type=int, help="pattern mode: tokens seen on each side")
    p.add_argument("--dilation", type=int, default=1, help="pattern mode: gap between attended tokens (default 1)")
    p.add_argument("--causal", action="store_true", help="pattern mode: only tokens before (decoder style)")
    p.add_argument("--global", dest="global_positions", default=None,
                   help="comma-separated positions with global attention, e.g. 0,17 (model mode default: 0 for a "
                   "Longformer classifier, none otherwise)")
    p.add_argument("--model", help="model mode: model directory or asset name")
    p.add_argument("--text", help="model mode: the input text")
    p.add_argument("--layer", type=int, default=0, help="model mode: layer to draw (default 0; negative counts back)")
    p.add_argument("--head", type=int, default=0, help="model mode: head to draw (default 0)")
    p.add_argument("--max-tokens", type=int, default=256, help="model mode: truncate the text to this many tokens")


def run(args: argparse.Namespace) -> int:
    if args.model is None:
        if args.length is None or args.window is None:
            raise ConfigError("pattern mode needs --length and --window (or pass --model and --text for a heatmap)")
        positions = parse_positions(args.global_positions, args.length)
        cells = pattern_matrix(args.length, args.window, args.dilation, positions, args.causal)
        title = f"window {args.window}, dilation {args.dilation}" + (", causal" if args.causal else "")
        write_png(args.out, lambda fig: draw_pattern(fig.add_subplot(1, 1, 1), cells, positions, title))
        print(f"wrote the attention pattern ({args.length} tokens) to {args.out}")
        return 0
    if args.text is None:
        raise ConfigError("--model needs --text: the input whose attention weights are drawn")
    weights, allowed, tokens, positions, layer = model_attention(args.model, args.text, args.layer, args.head,
                                                                 args.global_positions, args.max_tokens)

    def draw(fig) -> None:
        panels = 1 if allowed is None else 2
        if allowed is not None:
            draw_pattern(fig.add_subplot(1, 2, 1), allowed, positions, f"layer {layer} pattern")
        draw_heatmap(fig.add_subplot(1, panels, panels), weights, tokens, f"layer {layer}, head {args.head}")

    write_png(args.out, draw, wide=allowed is not None)
    print(f"wrote layer {layer} head {args.head} attention over {len(tokens)} tokens to {args.out}")
    return 0


# --- what to draw -----------------------------------------------------------------------------------------


def parse_positions(text: str | None, length: int) -> list[int]:
    """``"0,17"`` -> [0, 17], each checked against ``length``."""
    if text is None or not text.strip():
        return []
    try:
        positions = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ConfigError(f"--global {text!r} is not a comma-separated list of positions, e.g. 0,17") from None
    bad = [p for p in positions if not 0 <= p < length]
    if bad:
        raise ConfigError(f"--global position {bad[0]} is outside 0..{length - 1}: pick positions inside the input")
    return positions


def pattern_matrix(length: int, window: int, dilation: int = 1, global_positions: Sequence[int] = (),
                   causal: bool = False) -> Tensor:
    """(length, length) bool cells the pattern mode draws, from the sliding pattern itself."""
    if length < 1 or length > MAX_LENGTH:
        raise ConfigError(f"--length {length} is outside 1..{MAX_LENGTH}: the plot holds a dense length x length grid")
    if window < 0 or dilation < 1:
        raise ConfigError(f"--window ({window}) must be >= 0 and --dilation ({dilation}) >= 1")
    band = SlidingWindow(window, dilation, causal).allowed(length, length, torch.device("cpu"))
    return with_global(band, global_positions)


def model_attention(model_dir: str, text: str, layer: int, head: int, global_text: str | None,
                    max_tokens: int) -> tuple[Tensor, Tensor | None, list[str], list[int], int]:
    """Run the model on ``text``: (S, S) weights of one head, the layer's allowed pattern (Longformer only,
    else None), the tokens, the global positions and the layer index (made non-negative)."""
    from ..models.auto import load_model
    from ..models.bert import BertLayer, BertModel
    from ..models.longformer import LongformerForSequenceClassification, LongformerModel
    from ..tokenizer import AutoTokenizer

    model = load_model(model_dir).eval()
    encoder = model.delta_backbone()
    if not isinstance(encoder, (BertModel, LongformerModel)):
        raise ConfigError(f"{model_dir} holds a {type(model).__name__}: plot-attention draws BERT and Longformer "
                          "encoders")
    if max_tokens < 1:
        raise ConfigError(f"--max-tokens {max_tokens} must be positive")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="pt")
    ids = encoded["input_ids"]
    if ids.shape[1] == 0:
        raise InputError("the text gives no tokens: pass some words with --text")
    blocks = [block for block in encoder.layers if isinstance(block, BertLayer)]  # Longformer's layers are too
    layers, heads = len(blocks), blocks[0].attn.n_heads
    if not -layers <= layer < layers or not 0 <= head < heads:
        raise ConfigError(f"--layer {layer} / --head {head} do not exist: the model has {layers} layers (0..{layers - 1})"
                          f" of {heads} heads (0..{heads - 1})")
    layer %= layers
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    if not isinstance(encoder, LongformerModel):
        if global_text:
            raise ConfigError("--global applies to Longformer models; this model attends to every token anyway")
        with torch.no_grad():
            out = encoder(input_ids=ids, token_type_ids=encoded.get("token_type_ids"), output_attentions=True)
        return out.attentions[layer][0, head], None, tokens, [], layer
    if global_text is not None:
        positions = parse_positions(global_text, ids.shape[1])
    else:  # what the model makes global when given no mask
        reader = model if isinstance(model, LongformerForSequenceClassification) else encoder
        default = reader.default_global_attention_mask(ids)
        positions = [] if default is None else default[0].nonzero().flatten().tolist()
    glob = torch.zeros_like(ids)
    glob[0, positions] = 1
    with torch.no_grad():
        out = encoder(input_ids=ids, global_attention_mask=glob if positions else None, output_attentions=True)
    pattern = blocks[layer].attn.pattern
    assert isinstance(pattern, SlidingWindow)
    global_ = out.global_attentions[layer][0] if positions else None
    dense = dense_weights(out.attentions[layer][0], global_, positions, pattern.window, pattern.dilation)
    allowed = with_global(pattern.allowed(ids.shape[1], ids.shape[1], torch.device("cpu")), positions)
    return dense[head], allowed if allowed.dim() == 2 else allowed[head], tokens, positions, layer


# --- drawing ---------------------------------------------------------------------------------------------


def draw_pattern(ax, allowed: Tensor, global_positions: Sequence[int], title: str) -> None:
    """Allowed cells light, global rows/columns in a second colour, the rest dark."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    colours = ["#1f1f3a", "#7fd3ff", "#ffb347"]
    codes = allowed.to(torch.int8).clone()
    index = torch.tensor(list(global_positions), dtype=torch.long)
    codes[index, :] = 2
    codes[:, index] = 2
    ax.imshow(codes.numpy(), cmap=ListedColormap(colours), vmin=0, vmax=2, interpolation="nearest")
    handles = [Patch(color=colours[1], label="window")] + ([Patch(color=colours[2], label="global")]
                                                           if len(global_positions) else [])
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    share = allowed.float().mean().item()
    ax.set_title(f"{title}\n{allowed.shape[0]} tokens, {share:.1%} of cells attended")
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")


def draw_heatmap(ax, weights: Tensor, tokens: Sequence[str], title: str) -> None:
    """Weights of one head, one row per query; token labels when the input is short enough to read them."""
    image = ax.imshow(weights.float().numpy(), cmap="viridis", interpolation="nearest", vmin=0)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    ax.set_title(title)
    if len(tokens) <= MAX_LABELLED:
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=7)
    else:
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")


def write_png(path: Path, draw, wide: bool = False) -> Path:
    """Draw with ``draw(figure)`` and write the PNG atomically (a crash never leaves half a file)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if path.suffix.lower() != ".png":
        raise ConfigError(f"--out {path} should end in .png: the plot is written as a PNG")
    fig = plt.figure(figsize=(13, 6) if wide else (7, 6.5))
    try:
        draw(fig)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return path
