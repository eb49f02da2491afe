"""The one projection layer. Every matmul against weights goes through `Linear`, so a quantized
or device-tuned kernel replaces it in one place.

A fused projection (q|k|v, gate|up) is one `Linear` whose rows are the concatenation of several
HF tensors ("shards"); `load` copies one shard at a time, as the checkpoint hands them over.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class QuantizedWeight(Protocol):
    """A packed low-bit copy of a weight (zili.layers.quant: Int4Weight, Int8Weight)."""

    max_rows: int  # the most input rows it serves; larger batches take the dense path

    def matmul(self, x: torch.Tensor) -> torch.Tensor: ...  # [T, in] -> [T, out], bias not added

    def nbytes(self) -> int: ...


class PrepackedWeight(Protocol):
    """The dense weight in the device matmul library's own layout (zili.layers.onednn.PackedDense)."""

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor: ...  # [T, in] -> [T, out]

    def nbytes(self) -> int: ...


class Linear(nn.Module):
    """y = x W^T + b with W [sum(output_sizes), in_features] in HF layout."""

    def __init__(self, in_features: int, output_sizes: int | Sequence[int], bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.out_features = sum(self.output_sizes)
        # Uninitialised on purpose: every value comes from the checkpoint.
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features))
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None
        # A packed copy of the weight (zili.layers.quant), used up to its `max_rows` input rows.
        self.quant: QuantizedWeight | None = None
        # The dense weight pre-packed for the device's matmul library (zili.layers.onednn): when
        # set, it serves every row count the quantized form does not (and `weight` may be empty).
        self.packed: PrepackedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quant = self.quant
        if quant is not None and x.shape[0] <= quant.max_rows:
            y = quant.matmul(x)
            return y + self.bias if self.bias is not None else y
        if self.packed is not None:
            return self.packed.matmul(x, self.bias)
        return F.linear(x, self.weight, self.bias)

    def load(self, param_name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        """Copy one checkpoint tensor (`weight` or `bias`, shard `shard`) into place."""
        param = getattr(self, param_name)
        start = sum(self.output_sizes[:shard])
        size = self.output_sizes[shard]
        expected = (size, self.in_features) if param_name == "weight" else (size,)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"expected shape {list(expected)}, got {list(tensor.shape)}")
        with torch.no_grad():
            param[start:start + size].copy_(tensor)

    def extra_repr(self) -> str:
        quant = f", quant={type(self.quant).__name__}" if self.quant is not None else ""
        packed = ", packed" if self.packed is not None else ""
        return f"in={self.in_features}, out={self.output_sizes}, bias={self.bias is not None}{quant}{packed}"
