"""Merging deltas into a quantized base, with the price shown.

A delta trained on a quantized base (QLoRA) learned against the dequantized weights ``W``. Merging folds it into
``W`` exactly (``W' = W + B A`` for LoRA, a scaling for IA3, a bias for BitFit) and quantizes ``W'`` again with
the layer's own scheme and settings; the rounding of that second quantization is the price. :func:`merge_quantized`
reports it per layer (the error relative to the merged weight, and relative to the delta's own update, which
says how much of what the delta learned survives), and :func:`measure` the change it makes to the model's
outputs on held-out inputs (logits; perplexity for a causal LM), so a user sees what the merge costs before
shipping it. Layers are merged one at a time: one fp32 weight exists at a time, never the whole model's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..delta.api import _in_part_order, deltas_to_merge, merge_and_unload
from ..delta.host import require_router
from ..delta.wrappers import DeltaLinear, DeltaQuantLinear
from ..errors import QuantError
from ..nn.linear import Linear
from .base import QuantizedLinear
from .layers import QuantLinear

Batch = Mapping[str, Tensor]


@dataclass
class LayerCost:
    """One merged layer: ``relative_error`` = ||Q(W') - W'|| / ||W'||, ``update_error`` = ||Q(W') - W'|| / ||W' - W||
    (1.0 would mean the rounding is as large as everything the delta changed in this layer)."""

    name: str
    scheme: str
    relative_error: float
    update_error: float | None  # None: the delta changed nothing in this layer


@dataclass
class OutputChange:
    """Outputs on held-out inputs before (delta attached) and after the merge (merged, quantized again)."""

    examples: int
    logits_relative_change: float  # ||after - before|| / ||before|| over all logits
    logits_max_abs_change: float
    agreement: float  # fraction of positions whose argmax is unchanged
    perplexity_before: float | None = None  # causal LMs: next-token perplexity of the held-out text
    perplexity_after: float | None = None

    @property
    def perplexity_change_percent(self) -> float | None:
        if self.perplexity_before is None or self.perplexity_after is None:
            return None
        return 100.0 * (self.perplexity_after / self.perplexity_before - 1.0)


@dataclass
class MergeReport:
    scheme: str
    deltas: list[str]
    layers: list[LayerCost] = field(default_factory=list)
    outputs: OutputChange | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.outputs is not None:
            out["outputs"]["perplexity_change_percent"] = self.outputs.perplexity_change_percent
        if self.layers:
            out["mean_relative_error"] = sum(c.relative_error for c in self.layers) / len(self.layers)
            out["max_update_error"] = max((c.update_error for c in self.layers if c.update_error is not None),
                                          default=None)
        return out

    def format(self) -> str:
        """A table for a terminal: one line per layer, then the output change."""
        width = max([len(c.name) for c in self.layers] + [5])
        lines = [f"merged {', '.join(self.deltas)} into a {self.scheme} base, quantized again:",
                 f"  {'layer':<{width}}  rel. error  error / update"]
        lines += [f"  {c.name:<{width}}  {c.relative_error:10.2e}  "
                  + (f"{c.update_error:14.3f}" if c.update_error is not None else f"{'-':>14}") for c in self.layers]
        if self.outputs is not None:
            o = self.outputs
            lines.append(f"held-out outputs ({o.examples} examples): logits change {o.logits_relative_change:.2e} "
                         f"relative (max {o.logits_max_abs_change:.3g}), argmax agreement {o.agreement:.4f}")
            change = o.perplexity_change_percent
            if change is not None:
                lines.append(f"perplexity {o.perplexity_before:.3f} -> {o.perplexity_after:.3f} ({change:+.2f}%)")
        return "\n".join(lines)


def requantize(layer: QuantizedLinear, weight: Tensor, bias: Tensor | None) -> QuantizedLinear:
    """A new packed layer holding ``weight`` (and ``bias``) in ``layer``'s scheme with ``layer``'s settings."""
    from .gguf_linear import GGUFLinear

    plain = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=weight.device)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if bias is not None:
            plain.bias.copy_(bias)
    if isinstance(layer, QuantLinear):
        return QuantLinear.from_spec(layer.spec(), plain)  # the same scheme and settings, these values
    if isinstance(layer, GGUFLinear):
        return GGUFLinear.from_linear(plain, layer.qtype)
    raise QuantError(f"cannot quantize a merged weight again as a {type(layer).__name__} ({layer.scheme}): "
                     "merge into an fp32, QuantLinear or GGUFLinear base")


def base_scheme(model: nn.Module) -> str | None:
    """The scheme of ``model``'s quantized layers (None: none is quantized); mixed schemes are refused."""
    schemes = {m.scheme for m in model.modules() if isinstance(m, QuantizedLinear | DeltaQuantLinear)}
    if len(schemes) > 1:
        raise QuantError(f"this model's layers are quantized with several schemes ({', '.join(sorted(schemes))}): "
                         "merging needs one")
    return schemes.pop() if schemes else None


def merge_quantized(model: nn.Module, names: str | Sequence[str] | None = None, scheme: str | None = None) -> MergeReport:
    """Fold the named deltas (default: all attached) into ``model``'s quantized base and remove every wrapper.

    Each quantized layer carrying a delta is dequantized, the deltas are merged into that fp32 weight exactly as
    :func:`deltaformer.delta.merge` would (IA3, then BitFit, then LoRA), and the result is quantized again with
    the layer's scheme and settings; layers that are not quantized merge in place. ``scheme``: the scheme the
    deltas were trained on, when known; a base quantized otherwise is refused, since the deltas learned
    against that scheme's rounding. Nothing changes when anything is refused (all new layers are built first).
    """
    router = require_router(model)
    chosen = deltas_to_merge(router, names, QuantError, "merging")
    have = base_scheme(model)
    if have is None:
        raise QuantError("this model has no quantized layer: merge with deltaformer.delta.merge_and_unload")
    if scheme is not None and scheme != have:
        raise QuantError(f"the delta was trained on a {scheme} base, and this base is quantized with {have}: it "
                         f"learned against {scheme}'s rounding, so merging it here would not give what it learned; "
                         f"merge into a {scheme} base (or the fp32 base)")
    if router.merged:
        raise QuantError(f"delta(s) {', '.join(router.merged)} are merged in place already: unmerge them first")
    order = _in_part_order(router, chosen)
    report = MergeReport(scheme=have, deltas=order)
    replacements: list[tuple[str, QuantizedLinear]] = []
    for path, module in model.named_modules():
        if not isinstance(module, DeltaQuantLinear):
            continue
        base = module.quantized
        original = base.dequantize()
        bias = None if base.bias is None else base.bias.detach().clone().float()
        scratch = DeltaLinear(nn.Linear(base.in_features, base.out_features, bias=bias is not None, device="meta"),
                              module.router)
        scratch.weight = nn.Parameter(original.clone(), requires_grad=False)
        scratch.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        with torch.no_grad():
            for part in module.parts.values():  # PART_ORDER: the order parts apply, and so merge
                for n in order:
                    if n in part.slots:
                        part.merge_slot(scratch, part.slot(n), +1.0)
        merged = scratch.weight.detach()
        new = requantize(base, merged, None if scratch.bias is None else scratch.bias.detach())
        error = (new.dequantize() - merged).norm().item()
        update = (merged - original).norm().item()
        report.layers.append(LayerCost(path, have, error / max(merged.norm().item(), 1e-30),
                                       error / update if update > 0 else None))
        new.train(module.training)
        replacements.append((path, new))
        del original, merged, scratch
    for path, new in replacements:
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    merge_and_unload(model, chosen)  # layers left (fp32 ones) merge in place; the router and hooks go
    return report


def dequantize_base(model: nn.Module) -> nn.Module:
    """Replace every quantized linear of ``model`` (in place) by a plain fp32 ``Linear`` holding its dequantized
    weight, keeping any deltas on it attached: the model computes what it computed, up to fp32 rounding, and
    merges exactly (the fp32 model a delta trained on a quantized base learned against)."""
    for path, module in list(model.named_modules()):
        if isinstance(module, DeltaQuantLinear):
            packed, parts = module.quantized, list(module.parts.values())
        elif isinstance(module, QuantizedLinear):
            packed, parts = module, []
        else:
            continue
        weight = packed.dequantize()
        plain = Linear(packed.in_features, packed.out_features, bias=packed.bias is not None, device=weight.device)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if packed.bias is not None:
                plain.bias.copy_(packed.bias)
        plain.requires_grad_(False)
        new: nn.Module = plain
        if parts:
            assert isinstance(module, DeltaQuantLinear)
            wrapper = DeltaLinear(plain, module.router)
            for part in parts:
                wrapper.add_part(part)
            wrapper.train(module.training)
            new = wrapper
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def logits_of(model: nn.Module, batches: Iterable[Batch]) -> list[Tensor]:
    model.eval()
    with torch.no_grad():
        return [model(**dict(b)).logits.float() for b in batches]


def perplexity(logits: Sequence[Tensor], batches: Sequence[Batch]) -> float:
    """Next-token perplexity of ``batches`` (``input_ids``, optional ``attention_mask``) under ``logits``."""
    total, count = 0.0, 0
    for lg, b in zip(logits, batches):
        ids = b["input_ids"]
        lg = lg[:, -ids.shape[1]:]  # a soft prompt's positions come first
        mask = b.get("attention_mask")
        keep = torch.ones_like(ids[:, 1:], dtype=torch.bool) if mask is None else mask[:, 1:].bool()
        nll = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        total += nll[keep.reshape(-1)].sum().item()
        count += int(keep.sum())
    return math.exp(total / max(count, 1))


def compare(before: Sequence[Tensor], after: Sequence[Tensor], batches: Sequence[Batch] | None = None,
            causal: bool = False) -> OutputChange:
    """How much the logits moved (and, for a causal LM with ``batches``, its perplexity)."""
    b = torch.cat([t.reshape(-1, t.shape[-1]) for t in before])
    a = torch.cat([t.reshape(-1, t.shape[-1]) for t in after])
    change = OutputChange(
        examples=sum(t.shape[0] for t in before),
        logits_relative_change=((a - b).norm() / b.norm().clamp(min=1e-30)).item(),
        logits_max_abs_change=(a - b).abs().max().item(),
        agreement=(a.argmax(-1) == b.argmax(-1)).float().mean().item(),
    )
    if causal and batches is not None:
        change.perplexity_before = perplexity(before, batches)
        change.perplexity_after = perplexity(after, batches)
    return change


def merge_and_measure(model: nn.Module, batches: Sequence[Batch], names: str | Sequence[str] | None = None,
                      scheme: str | None = None, causal: bool | None = None) -> MergeReport:
    """:func:`merge_quantized`, with the outputs on held-out ``batches`` compared before and after it."""
    causal = hasattr(model, "output_layer_path") if causal is None else causal
    before = logits_of(model, batches)
    report = merge_quantized(model, names, scheme)
    report.outputs = compare(before, logits_of(model, batches), batches, causal)
    return report
