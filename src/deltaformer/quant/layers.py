"""Frozen quantized Linear layers (:class:`quant.base.QuantizedLinear`): products dequantize a block of rows at a time.

The fp32 weight is never held whole: forward and the input gradient (which QLoRA and every other delta on a
quantized base need) loop over row blocks of :data:`ROWS_PER_BLOCK`, dequantize one, multiply, and drop it, so
the extra memory is one block, not a full fp32 copy. The packed tensors are buffers (they move with ``.to``
and are saved in ``state_dict``); the weight gets no gradient, by design (the base is frozen).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import QuantError
from . import kernels, schemes
from .base import ROWS_PER_BLOCK, QuantizedLinear, RowFn, fused_product

__all__ = ["OUTLIER_THRESHOLD", "ROWS_PER_BLOCK", "SCHEMES", "QuantEmbedding", "QuantLinear", "default_skip", "quantize",
           "tie_embeddings", "tied_embeddings"]

#: LLM.int8 outlier threshold: input features with any |x| >= this run in fp32 (Dettmers et al. 2022).
OUTLIER_THRESHOLD = 6.0
SCHEMES = ("int8", "zeropoint", "llm_int8", "w8a8", "nf4", "fp4", "int4")
FOUR_BIT = ("nf4", "fp4")
#: Schemes stored as int8 absmax rows (same buffers; they differ in the product only).
ABSMAX_INT8 = ("int8", "llm_int8", "w8a8")


class QuantLinear(QuantizedLinear):
    """A frozen Linear stored in one of :data:`SCHEMES`; ``dequantize()`` gives the fp32 weight when asked.

    int8 / zeropoint take a ``granularity`` ("tensor", "channel" or "group" of ``group_size`` inputs);
    llm_int8 and w8a8 are per channel (their int8 x int8 products rescale by row; w8a8 quantizes every input
    row to int8, llm_int8 keeps outlier features in fp32). nf4 / fp4 use blocks of ``blocksize`` with
    optional double quantization; int4 is asymmetric per group of ``blocksize`` (bf16 scale and zero), stored
    in torch's CPU int4 kernel layout (rows padded to 64). A row width that is not a multiple of
    ``blocksize`` is zero-padded to whole blocks when ``pad`` (the default here) and refused otherwise.

    Forward picks a fused kernel (:mod:`quant.kernels`) on CPU when no input gradient is needed and
    ``use_kernels`` is true: int8 per channel / per tensor -> ``_weight_int8pack_mm``, int4 ->
    ``_weight_int4pack_mm_for_cpu`` (both in bf16), w8a8 / llm_int8 -> ``torch._int_mm``; otherwise the
    blockwise fp32 product of :class:`quant.base.QuantizedLinear` (and its input gradient).
    """

    use_kernels: bool = True

    weight_q: Tensor
    scale: Tensor
    zero: Tensor
    padded_rows: int

    def __init__(self, linear: nn.Linear, scheme: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                 threshold: float = OUTLIER_THRESHOLD, granularity: str = "channel", group_size: int = 128,
                 pad: bool = True) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise QuantError(f"unknown quantization scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
        if scheme in ("llm_int8", "w8a8") and granularity != "channel":
            raise QuantError(f"{scheme} quantizes per output channel only: drop the granularity argument")
        weight = linear.weight.detach()
        self.scheme, self.threshold = scheme, threshold
        self.granularity = granularity if scheme in ("int8", "zeropoint", "llm_int8", "w8a8") else "block"
        self.group_size = group_size
        self.out_features, self.in_features = weight.shape
        if scheme == "int4":
            codes, scale, zero = schemes.int4_affine(weight, blocksize, pad=pad)
            self.blocksize, self.cols = blocksize, codes.shape[1]
            self.padded_rows = self.out_features + (-self.out_features % kernels.INT4_TILE)
            extra = self.padded_rows - self.out_features
            codes = torch.nn.functional.pad(codes, (0, 0, 0, extra), value=8)
            scale_zero = torch.stack((scale, zero), dim=-1)  # [out, groups, 2]
            scale_zero = torch.nn.functional.pad(scale_zero, (0, 0, 0, 0, 0, extra))
            self.register_buffer("weight_q", kernels.pack_int4(codes))
            self.register_buffer("scale", scale_zero.transpose(0, 1).contiguous())  # [groups, rows, 2]: the kernel's
        elif scheme in ABSMAX_INT8:
            q, absmax = schemes.int8_absmax(weight, granularity, group_size)
            self.register_buffer("weight_q", q)
            self.register_buffer("scale", absmax)
        elif scheme == "zeropoint":
            q, scale, zero = schemes.int8_zero_point(weight, granularity, group_size)
            self.register_buffer("weight_q", q)
            self.register_buffer("scale", scale)
            self.register_buffer("zero", zero)
        else:
            nf = schemes.four_bit(weight, scheme, blocksize=blocksize, double_quant=double_quant, pad=pad)
            self.blocksize, self.offset, self.group, self.cols = nf.blocksize, nf.offset, nf.group, nf.cols
            self.register_buffer("weight_q", nf.packed)
            if nf.absmax is not None:
                self.register_buffer("scale", nf.absmax)
            else:
                assert nf.absmax_codes is not None and nf.absmax_scale is not None
                self.register_buffer("scale", nf.absmax_scale)
                self.register_buffer("scale_codes", nf.absmax_codes)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def gather_rows(self, index: Tensor) -> Tensor:
        """fp32 weight rows at ``index`` (1-D), decoding only those rows: an embedding lookup on the packed table."""
        if self.scheme in ABSMAX_INT8 + ("zeropoint",) and self.granularity != "group":
            scale = self.scale if self.granularity == "tensor" else self.scale[index]
            if self.scheme == "zeropoint":
                zero = self.zero if self.granularity == "tensor" else self.zero[index]
                return schemes.int8_zero_point_rows(self.weight_q[index], scale, zero)
            return schemes.int8_absmax_rows(self.weight_q[index], scale)
        if self.scheme == "int4":
            tile, lane = index // kernels.INT4_TILE, index % kernels.INT4_TILE
            cols = torch.arange(self.cols, device=index.device)
            flat = (tile * (self.cols * kernels.INT4_TILE // 2) + lane % (kernels.INT4_TILE // 2)).unsqueeze(1) \
                + cols.unsqueeze(0) * (kernels.INT4_TILE // 2)
            byte = self.weight_q[flat]
            codes = torch.where((lane >= kernels.INT4_TILE // 2).unsqueeze(1), byte >> 4, byte & 0xF)
            w = schemes.int4_affine_rows(codes, self.scale[:, index, 0].t(), self.scale[:, index, 1].t())
            return w[:, :self.in_features]
        rows = self.row_source()
        return torch.cat([rows(i, i + 1) for i in index.tolist()]) if index.numel() else \
            torch.empty(0, self.in_features, device=index.device)

    def spec(self) -> dict[str, Any]:
        """What rebuilds this layer's buffers (shapes, dtypes) around loaded tensors: see :meth:`from_spec`."""
        out: dict[str, Any] = {"scheme": self.scheme, "in_features": self.in_features,
                               "out_features": self.out_features, "bias": self.bias is not None}
        if self.scheme in ("int8", "zeropoint", "llm_int8", "w8a8"):
            out.update(granularity=self.granularity, group_size=self.group_size)
            if self.scheme == "llm_int8":
                out["threshold"] = self.threshold
        else:
            out.update(blocksize=self.blocksize, pad=self.cols != self.in_features)
            if self.scheme in FOUR_BIT:
                out.update(double_quant=hasattr(self, "scale_codes"), offset=self.offset, group=self.group)
        return out

    @classmethod
    def from_spec(cls, spec: dict[str, Any], linear: nn.Linear) -> QuantLinear:
        """A layer shaped as ``spec`` describes (its buffers are to be overwritten by loaded tensors).

        ``linear`` gives the shape; its values only fill the buffers until the load replaces them.
        """
        try:
            scheme = str(spec["scheme"])
            if (int(spec["in_features"]), int(spec["out_features"])) != (linear.in_features, linear.out_features):
                raise QuantError(f"the metadata says {spec['in_features']} -> {spec['out_features']} features, "
                                 f"the model's layer is {linear.in_features} -> {linear.out_features}")
            if bool(spec["bias"]) != (linear.bias is not None):
                raise QuantError("the metadata and the model disagree on whether the layer has a bias")
            layer = cls(linear, scheme, blocksize=int(spec.get("blocksize", 64)),
                        double_quant=bool(spec.get("double_quant", True)),
                        threshold=float(spec.get("threshold", OUTLIER_THRESHOLD)),
                        granularity=str(spec.get("granularity", "channel")),
                        group_size=int(spec.get("group_size", 128)), pad=bool(spec.get("pad", True)))
        except QuantError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise QuantError(f"layer metadata {spec} is incomplete or malformed ({err})") from None
        if scheme in FOUR_BIT:
            layer.offset = float(spec.get("offset", 0.0))
        return layer

    def _per_row(self, t: Tensor, a: int, b: int) -> Tensor:
        """Rows ``a:b`` of a scale / zero tensor (a per-tensor one applies to every row)."""
        return t if self.granularity == "tensor" else t[a:b]

    def _nf4(self) -> schemes.NF4Weight:
        codes = getattr(self, "scale_codes", None)
        shape = (self.out_features, self.in_features)
        if codes is None:
            return schemes.NF4Weight(self.weight_q, shape, self.blocksize, absmax=self.scale, kind=self.scheme,
                                     cols=self.cols)
        return schemes.NF4Weight(self.weight_q, shape, self.blocksize, absmax_codes=codes, absmax_scale=self.scale,
                                 offset=self.offset, group=self.group, kind=self.scheme, cols=self.cols)

    def row_source(self) -> RowFn:
        """A function giving fp32 weight rows ``a:b`` (block scales decoded once per call, not per block)."""
        if self.scheme == "int4":
            return self._int4_rows
        if self.scheme in FOUR_BIT:
            nf = self._nf4()
            scales = nf.scales()
            return lambda a, b: nf.rows(a, b, scales)
        if self.scheme == "zeropoint":
            return lambda a, b: schemes.int8_zero_point_rows(self.weight_q[a:b], self._per_row(self.scale, a, b),
                                                             self._per_row(self.zero, a, b))
        return lambda a, b: schemes.int8_absmax_rows(self.weight_q[a:b], self._per_row(self.scale, a, b))

    def rows(self, start: int, stop: int) -> Tensor:
        return self.row_source()(start, stop)

    def rows_fn(self) -> RowFn:
        """Alias of :meth:`row_source` (the name code written before :mod:`quant.base` uses)."""
        return self.row_source()

    def _int4_rows(self, a: int, b: int) -> Tensor:
        codes = kernels.unpack_int4_rows(self.weight_q, self.cols, a, b)
        w = schemes.int4_affine_rows(codes, self.scale[:, a:b, 0].t(), self.scale[:, a:b, 1].t())
        return w if self.cols == self.in_features else w[:, :self.in_features]

    def _kernel(self, x: Tensor) -> Callable[[Tensor], Tensor] | None:
        """The fused product for ``x``, or None where the blockwise product runs (see the class docstring)."""
        if self.scheme == "w8a8":  # the bias goes into the rescaling pass (see forward)
            return lambda t: kernels.w8a8(t, self.weight_q, self.scale, self.bias)
        if self.scheme == "llm_int8":
            return self._llm_int8
        if not self.use_kernels or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            return None
        if self.scheme == "int8" and self.granularity in ("channel", "tensor") and kernels.has_int8_weight_only():
            return lambda t: kernels.int8_weight_only(t, self.weight_q, self._channel_scale())
        if self.scheme == "int4" and kernels.has_int4_weight_only() and self.blocksize in kernels.INT4_GROUP_SIZES:
            return self._int4_kernel
        return None

    def _channel_scale(self) -> Tensor:
        step = self.scale / 127.0
        return step.expand(self.out_features) if self.granularity == "tensor" else step

    def _int4_kernel(self, x: Tensor) -> Tensor:
        y = kernels.int4_weight_only(x, self.weight_q, self.padded_rows, self.cols, self.blocksize, self.scale)
        return y if self.padded_rows == self.out_features else y[..., :self.out_features]

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        fused = self._kernel(x)
        if fused is None:
            return super().forward(x)
        y = fused_product(x, fused, self.row_source(), self.out_features)
        return y if self.scheme == "w8a8" else self.add_bias(y)

    def _llm_int8(self, x: Tensor) -> Tensor:
        """LLM.int8: outlier input features in fp32 with their weight columns, the rest int8 x int8 -> int32.

        Inputs are quantized per row (absmax), the weight per output row; the int32 product is rescaled by
        both absmaxes / 127^2. Feature columns with any |x| >= threshold are zeroed in the int8 part and run
        as an fp32 product with the dequantized weight columns (Dettmers et al. 2022, "mixed decomposition").
        """
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).float()
        outliers = (flat.abs() >= self.threshold).any(dim=0).nonzero().flatten()
        inliers = flat.clone()
        inliers[:, outliers] = 0.0
        row_max = inliers.abs().amax(dim=1).clamp(min=1e-38)
        xq = torch.round(inliers * (127.0 / row_max).unsqueeze(1)).clamp(-127, 127)
        # int8 x int8 -> int32 (torch._int_mm where it runs, else an int32 matmul): exact either way
        acc = kernels.int8_matmul(xq.to(torch.int8), self.weight_q)
        y = acc.float() * (row_max.unsqueeze(1) * self.scale.unsqueeze(0) / (127.0 * 127.0))
        if outliers.numel():
            cols = schemes.int8_absmax_rows(self.weight_q[:, outliers], self.scale)
            y = y + flat[:, outliers] @ cols.t()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


class QuantEmbedding(nn.Module):
    """A token embedding that reads its rows from a tied, quantized LM head (no fp32 table kept).

    The head (a :class:`QuantLinear` elsewhere in the model) owns the packed buffers; this module only holds a
    reference, so the state dict stores them once. Lookups decode just the rows asked for; ``weight`` (for code
    that reads it) dequantizes the whole table.
    """

    def __init__(self, head: QuantLinear, padding_idx: int | None = None) -> None:
        super().__init__()
        self._head = (head,)  # a tuple: not registered as a submodule, the head stays where it is
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.padding_idx = padding_idx

    @property
    def head(self) -> QuantLinear:
        return self._head[0]

    @property
    def weight(self) -> Tensor:
        return self.head.dequantize()

    def forward(self, ids: Tensor) -> Tensor:
        return self.head.gather_rows(ids.reshape(-1)).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tied to a {self.head.scheme} head"


def tie_embeddings(model: nn.Module, ties: dict[str, str]) -> None:
    """Replace each embedding ``name`` of ``ties`` by a :class:`QuantEmbedding` reading the quantized head."""
    for name, head_name in ties.items():
        head = model.get_submodule(head_name)
        emb = model.get_submodule(name)
        if not isinstance(head, QuantLinear) or not isinstance(emb, nn.Embedding | QuantEmbedding):
            raise QuantError(f"cannot tie embedding {name} to {head_name}: not an embedding and a quantized head")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, QuantEmbedding(head, emb.padding_idx))


def tied_embeddings(model: nn.Module) -> dict[str, str]:
    """Embedding paths of ``model`` that read a quantized head's rows, with the head's path."""
    heads = {id(m): n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    return {n: heads[id(m.head)] for n, m in model.named_modules()
            if isinstance(m, QuantEmbedding) and id(m.head) in heads}


def default_skip(model: nn.Module, tied: bool = True) -> tuple[str, ...]:
    """The linear layers :func:`quantize` keeps in fp32 unless told otherwise: the model's output heads.

    The rule of ``transformers``' bitsandbytes integration (``get_keys_to_not_convert``; QLoRA quantizes only the
    layers inside the blocks too): a linear whose weight is tied to a token embedding (``tied``), the model's
    declared heads (a decoder's ``output_layer_path``, a task model's ``head_prefixes``: ``lm_head``,
    ``classifier``, ``score``) and the last linear layer of the model (its output, whatever it is called).
    ``tied=False`` leaves out the heads tied to a token table (they are to be quantized with it).
    """
    linears = dict((name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear))
    if not linears:
        return ()
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    declared = [getattr(model, "output_layer_path", None), *(p.rstrip(".") for p in getattr(model, "head_prefixes", ()))]
    heads = [name for name, m in linears.items() if id(m.weight) in tables]
    heads += [name for name in declared if name in linears] + [next(reversed(linears))]
    return tuple(name for name in dict.fromkeys(heads) if tied or id(linears[name].weight) not in tables)


def quantize(model: nn.Module, scheme: str = "nf4", skip: tuple[str, ...] | None = None, blocksize: int = 64,
             double_quant: bool = True, threshold: float = OUTLIER_THRESHOLD, granularity: str = "channel",
             group_size: int = 128, pad: bool = True, embeddings: bool = False) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a frozen :class:`QuantLinear`.

    ``skip`` names module paths (or their last part, e.g. "classifier", "lm_head") that stay fp32. By default
    (``None``) that is :func:`default_skip`: the output heads (a tied LM head, the task head, the last linear),
    as ``transformers`` and bitsandbytes do; ``skip=()`` quantizes every linear layer. 4-bit layers whose width
    is not a multiple of ``blocksize`` are zero-padded to whole blocks (``pad=False`` refuses them instead).
    ``embeddings``: a token embedding whose weight is tied to a quantized head becomes a :class:`QuantEmbedding`
    reading the head's packed rows (the fp32 table goes; left alone, the tie is cut and the table stays fp32);
    with the default ``skip`` it also quantizes that tied head (the point of asking). A layer that cannot be
    quantized as asked raises :class:`QuantError` naming it, before any layer of the model is replaced.
    Returns the model; its remaining parameters are left as they were.
    """
    if scheme not in SCHEMES:
        raise QuantError(f"unknown quantization scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    if skip is None:
        skip = default_skip(model, tied=not embeddings)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear)
               and not any(name == s or name.endswith("." + s) or name.split(".")[-1] == s for s in skip)]
    tables = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    ties: dict[str, str] = {}
    replaced: list[tuple[str, QuantLinear]] = []
    for name, module in targets:
        try:
            replaced.append((name, QuantLinear(module, scheme, blocksize, double_quant, threshold, granularity,
                                               group_size, pad)))
        except QuantError as err:
            raise QuantError(f"layer {name}: {err}") from None
        if embeddings and id(module.weight) in tables:
            ties[tables[id(module.weight)]] = name
    for name, layer in replaced:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    tie_embeddings(model, ties)
    return model
