"""GGUF's packed blocks kept packed: a frozen Linear and a token embedding that unpack rows as they need them.

A GGUF file stores each weight row as whole blocks (Q8_0, Q4_0, Q4_1, ... of 32 weights; K-quants of 256)
when the row width is a multiple of the block size, so row ``i`` of the weight is bytes
``[i * row_bytes, (i + 1) * row_bytes)`` and any run of rows unpacks on its own. :class:`GGUFLinear` keeps those
bytes as a ``(out_features, row_bytes)`` uint8 buffer and, through the :class:`~.base.QuantizedLinear`
contract, multiplies one block of rows at a time, each unpacked by :func:`~.gguf_blocks.dequantize`: the
same bits as unpacking the whole tensor. :class:`GGUFEmbedding` gathers the packed rows of the looked-up
tokens and unpacks only those. A head tied to the embedding reads the embedding's bytes (one copy, which
moves with the embedding on ``.to()``).
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
from torch import Tensor, nn

from ..errors import QuantError
from ..nn.linear import linear
from .base import ROWS_PER_BLOCK, QuantizedLinear, RowFn, fused_product
from .gguf_blocks import SUPPORTED_TYPES, as_type, dequantize


def row_bytes(qtype: GGMLQuantizationType, width: int) -> int:
    """Bytes per row of ``width`` weights of ``qtype``; a clear error when rows do not end on a block."""
    block, size = GGML_QUANT_SIZES[qtype]
    if width % block:
        raise QuantError(f"rows of {width} weights do not fill whole {qtype.name} blocks of {block}: "
                         "such a tensor cannot stay packed row by row")
    return width // block * size


def _check_packed(packed: Tensor, qtype: GGMLQuantizationType, width: int) -> None:
    if qtype not in SUPPORTED_TYPES or qtype == GGMLQuantizationType.F32:
        raise QuantError(f"GGUF type {qtype.name} cannot be kept packed (supported: "
                         f"{', '.join(sorted(t.name for t in SUPPORTED_TYPES - {GGMLQuantizationType.F32}))})")
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != row_bytes(qtype, width):
        raise QuantError(f"packed {qtype.name} rows of {width} weights must be a (rows, {row_bytes(qtype, width)}) "
                         f"uint8 tensor, got {tuple(packed.shape)} {packed.dtype}")


def pack_rows(weight: Tensor, qtype: GGMLQuantizationType | str) -> Tensor:
    """``weight`` (rows, width) packed into GGUF blocks of ``qtype`` by ``gguf.quants``: (rows, row_bytes)."""
    kind = as_type(qtype)
    packed = quants.quantize(weight.detach().float().cpu().numpy().astype(np.float32), kind)
    return torch.from_numpy(np.ascontiguousarray(packed).view(np.uint8)).reshape(weight.shape[0], -1)


def _blockwise(x: Tensor, rows: RowFn, out_features: int) -> Tensor:
    """``x @ W^T`` a block of :data:`~.base.ROWS_PER_BLOCK` unpacked rows at a time, each product on the kernel
    the model's own fp32 linears use (:func:`deltaformer.nn.linear.linear`), so packed and unpacked agree."""
    parts = [linear(x, rows(a, min(a + ROWS_PER_BLOCK, out_features)).to(x.dtype), None)
             for a in range(0, out_features, ROWS_PER_BLOCK)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class GGUFLinear(QuantizedLinear):
    """A frozen Linear whose weight stays in a GGUF file's blocks, ``(out_features, row_bytes)`` uint8."""

    def __init__(self, packed: Tensor, qtype: GGMLQuantizationType | str, in_features: int,
                 bias: Tensor | None = None, *, tied_to: nn.Module | None = None) -> None:
        super().__init__()
        self.qtype = as_type(qtype)
        self.scheme = self.qtype.name.lower()
        self.in_features, self.out_features = in_features, packed.shape[0]
        _check_packed(packed, self.qtype, in_features)
        if tied_to is None:
            self.register_buffer("packed", packed)
        else:  # the tied module owns (and saves, and moves) the bytes: keep it out of this module's children
            self.__dict__["_tied_to"] = tied_to
        if bias is not None and bias.shape != (self.out_features,):
            raise QuantError(f"bias of shape {tuple(bias.shape)} does not fit {self.out_features} output features")
        self.bias = None if bias is None else (
            bias.requires_grad_(False) if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False))

    @classmethod
    def from_linear(cls, linear: nn.Linear, qtype: GGMLQuantizationType | str = "Q8_0") -> GGUFLinear:
        """``linear`` packed in ``qtype`` (through ``gguf.quants``, as llama.cpp's converter packs it)."""
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(pack_rows(linear.weight, qtype), qtype, linear.in_features, bias)

    @classmethod
    def tied(cls, embedding: GGUFEmbedding) -> GGUFLinear:
        """An output projection that reads ``embedding``'s packed rows (a tied LM head)."""
        return cls(embedding.packed, embedding.qtype, embedding.embedding_dim, tied_to=embedding)

    @property
    def packed_rows(self) -> Tensor:
        """The packed weight, (out_features, row_bytes) uint8 (the tied embedding's, for a tied head)."""
        tied = self.__dict__.get("_tied_to")
        return cast(Tensor, tied.packed if tied is not None else self.packed)

    def rows(self, start: int, stop: int) -> Tensor:
        return dequantize(self.packed_rows[start:stop], self.qtype, (stop - start, self.in_features))

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        rows = self.row_source()
        return self.add_bias(fused_product(x, lambda v: _blockwise(v, rows, self.out_features), rows,
                                           self.out_features))

    def extra_repr(self) -> str:
        tied = ", tied to the embedding" if "_tied_to" in self.__dict__ else ""
        return super().extra_repr() + tied


class GGUFEmbedding(nn.Module):
    """A frozen token table in a GGUF file's blocks: a lookup unpacks the looked-up rows only."""

    packed: Tensor

    def __init__(self, packed: Tensor, qtype: GGMLQuantizationType | str, embedding_dim: int,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.qtype = as_type(qtype)
        self.scheme = self.qtype.name.lower()
        _check_packed(packed, self.qtype, embedding_dim)
        self.num_embeddings, self.embedding_dim, self.padding_idx = packed.shape[0], embedding_dim, padding_idx
        self.register_buffer("packed", packed)

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        rows = dequantize(self.packed.index_select(0, flat), self.qtype, (flat.numel(), self.embedding_dim))
        return rows.reshape(*ids.shape, self.embedding_dim)

    def dequantize(self) -> Tensor:
        """The whole fp32 table (for inspection and deltas that copy rows of it; lookups never call this)."""
        return dequantize(self.packed, self.qtype, (self.num_embeddings, self.embedding_dim))

    @property
    def weight(self) -> Tensor:
        """The fp32 table, materialised on demand."""
        return self.dequantize()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme}"
