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
SCHEMES = ("int8", "zeropoint", "llm_int8", "nf4")


class QuantLinear(QuantizedLinear):
    """A frozen Linear stored in one of :data:`SCHEMES`; ``dequantize()`` gives the fp32 weight when asked."""

    weight_q: Tensor
    scale: Tensor
    zero: Tensor

    def __init__(self, linear: nn.Linear, scheme: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                 threshold: float = OUTLIER_THRESHOLD) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise QuantError(f"unknown quantization scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
        weight = linear.weight.detach()
        self.scheme, self.threshold = scheme, threshold
        self.out_features, self.in_features = weight.shape
        self.nf4: schemes.NF4Weight | None = None
        if scheme in ("int8", "llm_int8"):
            q, absmax = schemes.int8_absmax(weight)
            self.register_buffer("weight_q", q)
            self.register_buffer("scale", absmax)
        elif scheme == "zeropoint":
            q, scale, zero = schemes.int8_zero_point(weight)
            self.register_buffer("weight_q", q)
            self.register_buffer("scale", scale)
            self.register_buffer("zero", zero)
        else:
            nf = schemes.nf4(weight, blocksize=blocksize, double_quant=double_quant)
            self.blocksize, self.offset, self.group = nf.blocksize, nf.offset, nf.group
            self.register_buffer("weight_q", nf.packed)
            if nf.absmax is not None:
                self.register_buffer("scale", nf.absmax)
            else:
                assert nf.absmax_codes is not None and nf.absmax_scale is not None
                self.register_buffer("scale", nf.absmax_scale)
                self.register_buffer("scale_codes", nf.absmax_codes)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def _nf4(self) -> schemes.NF4Weight:
        codes = getattr(self, "scale_codes", None)
        shape = (self.out_features, self.in_features)
        if codes is None:
            return schemes.NF4Weight(self.weight_q, shape, self.blocksize, absmax=self.scale)
        return schemes.NF4Weight(self.weight_q, shape, self.blocksize, absmax_codes=codes, absmax_scale=self.scale,
                                 offset=self.offset, group=self.group)

    def row_source(self) -> RowFn:
        """A function giving fp32 weight rows ``a:b`` (block scales decoded once per call, not per block)."""
        if self.scheme == "nf4":
            nf = self._nf4()
            scales = nf.scales()
            return lambda a, b: nf.rows(a, b, scales)
        if self.scheme == "zeropoint":
            return lambda a, b: schemes.int8_zero_point_rows(self.weight_q[a:b], self.scale[a:b], self.zero[a:b])
        return lambda a, b: schemes.int8_absmax_rows(self.weight_q[a:b], self.scale[a:b])

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
             double_quant: bool = True, threshold: float = OUTLIER_THRESHOLD) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a frozen :class:`QuantLinear`.

    ``skip`` names module paths (or their last part, e.g. "classifier", "lm_head") that stay fp32: heads are
    small and sensitive. NF4 layers whose width is not a multiple of ``blocksize`` stay fp32 too.
    Returns the model; its remaining parameters are left as they were.
    """
    if scheme not in SCHEMES:
        raise QuantError(f"unknown quantization scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is not QuantLinear and isinstance(m, nn.Linear)
               and not any(name == s or name.endswith("." + s) or name.split(".")[-1] == s for s in skip)]
    for name, module in targets:
        if scheme == "nf4" and module.in_features % blocksize:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear(module, scheme, blocksize, double_quant, threshold))
    return model
