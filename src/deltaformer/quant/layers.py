"""Frozen quantized Linear layers (:class:`quant.base.QuantizedLinear`): products dequantize a block of rows at a time.

The fp32 weight is never held whole: forward and the input gradient (which QLoRA and every other delta on a
quantized base need) loop over row blocks of :data:`ROWS_PER_BLOCK`, dequantize one, multiply, and drop it, so
the extra memory is one block, not a full fp32 copy. The packed tensors are buffers (they move with ``.to``
and are saved in ``state_dict``); the weight gets no gradient, by design (the base is frozen).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import QuantError
from . import base, schemes
from .base import ROWS_PER_BLOCK, QuantizedLinear, RowFn, fused_product

__all__ = ["OUTLIER_THRESHOLD", "ROWS_PER_BLOCK", "SCHEMES", "QuantLinear", "quantize"]

#: LLM.int8 outlier threshold: input features with any |x| >= this run in fp32 (Dettmers et al. 2022).
OUTLIER_THRESHOLD = 6.0
SCHEMES = ("int8", "zeropoint", "llm_int8", "nf4", "fp4")
FOUR_BIT = ("nf4", "fp4")


class QuantLinear(QuantizedLinear):
    """A frozen Linear stored in one of :data:`SCHEMES`; ``dequantize()`` gives the fp32 weight when asked.

    int8 / zeropoint take a ``granularity`` ("tensor", "channel" or "group" of ``group_size`` inputs);
    llm_int8 is per channel (its int8 product rescales by row). nf4 / fp4 use blocks of ``blocksize`` with
    optional double quantization; a row width that is not a multiple of ``blocksize`` is zero-padded to whole
    blocks when ``pad`` (the default here) and refused otherwise.
    """

    weight_q: Tensor
    scale: Tensor
    zero: Tensor

    def __init__(self, linear: nn.Linear, scheme: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                 threshold: float = OUTLIER_THRESHOLD, granularity: str = "channel", group_size: int = 128,
                 pad: bool = True) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise QuantError(f"unknown quantization scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
        if scheme == "llm_int8" and granularity != "channel":
            raise QuantError("llm_int8 quantizes per output channel only: drop the granularity argument")
        weight = linear.weight.detach()
        self.scheme, self.threshold = scheme, threshold
        self.granularity = granularity if scheme in ("int8", "zeropoint", "llm_int8") else "block"
        self.group_size = group_size
        self.out_features, self.in_features = weight.shape
        if scheme in ("int8", "llm_int8"):
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

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        if self.scheme == "llm_int8":
            return self.add_bias(fused_product(x, self._llm_int8, self.row_source(), self.out_features))
        return super().forward(x)

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
        # int32 accumulation: exact integers up to 2^24 in fp32 need chunking only beyond 1040 features of 127^2;
        # the product runs on int32 tensors on CPU (torch has no int8 GEMM there), exact by construction.
        acc = torch.cat([xq.to(torch.int32) @ self.weight_q[a:a + base.ROWS_PER_BLOCK].to(torch.int32).t()
                         for a in range(0, self.out_features, base.ROWS_PER_BLOCK)], dim=1)
        y = acc.float() * (row_max.unsqueeze(1) * self.scale.unsqueeze(0) / (127.0 * 127.0))
        if outliers.numel():
            cols = schemes.int8_absmax_rows(self.weight_q[:, outliers], self.scale)
            y = y + flat[:, outliers] @ cols.t()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


def quantize(model: nn.Module, scheme: str = "nf4", skip: tuple[str, ...] = (), blocksize: int = 64,
             double_quant: bool = True, threshold: float = OUTLIER_THRESHOLD, granularity: str = "channel",
             group_size: int = 128, pad: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a frozen :class:`QuantLinear`.

    ``skip`` names module paths (or their last part, e.g. "classifier", "lm_head") that stay fp32: heads are
    small and sensitive. 4-bit layers whose width is not a multiple of ``blocksize`` are zero-padded to whole
    blocks (``pad=False`` refuses them instead). A layer that cannot be quantized as asked raises
    :class:`QuantError` naming it, before any layer of the model is replaced.
    Returns the model; its remaining parameters are left as they were.
    """
    if scheme not in SCHEMES:
        raise QuantError(f"unknown quantization scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear)
               and not any(name == s or name.endswith("." + s) or name.split(".")[-1] == s for s in skip)]
    replaced: list[tuple[str, QuantLinear]] = []
    for name, module in targets:
        try:
            replaced.append((name, QuantLinear(module, scheme, blocksize, double_quant, threshold, granularity,
                                               group_size, pad)))
        except QuantError as err:
            raise QuantError(f"layer {name}: {err}") from None
    for name, layer in replaced:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    return model
