"""The one projection layer. Every matmul against weights goes through `Linear`, so a quantized
or device-tuned kernel replaces it in one place.

A fused projection (q|k|v, gate|up) is one `Linear` whose rows are the concatenation of several
HF tensors ("shards"); `load` copies one shard at a time, as the checkpoint hands them over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

# Stands in for a checkpoint tensor the loader did not read: the weight of a projection that will be
# packed from the checkpoint's own codes and hold no dense copy (`zili.models.loader.load_model`'s
# `defer_packed`). `Linear.load` leaves such a weight unallocated (`Linear.weight_deferred`).
NOT_LOADED = torch.empty(0)


class QuantizedWeight(Protocol):
    """A packed low-bit copy of a weight (zili.layers.quant: Int4Weight, Int8Weight)."""

    max_rows: int  # the most input rows it serves; larger batches take the dense path
    # True when each output row is computed the same way whatever the row count (zili's kernels: one
    # loop per row, fixed reduction order), so batch-invariant mode may call it on any number of rows.
    row_invariant: bool

    def matmul(self, x: torch.Tensor) -> torch.Tensor: ...  # [T, in] -> [T, out], bias not added

    def nbytes(self) -> int: ...


class DequantizingWeight(QuantizedWeight, Protocol):
    """A packed copy that can also serve any row count by the dense matmul on its codes dequantized
    into scratch memory (zili.layers.quant on zili's kernels), so the layer needs no dense weight."""

    dequantizes: bool

    def dense_matmul(self, x: torch.Tensor) -> torch.Tensor: ...  # [T, in] -> [T, out], bias not added


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
        # A packed copy of the weight (zili.layers.quant), used up to its `max_rows` input rows; past
        # them the dense weight serves, or, where `weight` was released (`release_dense_weights`), the
        # packed copy's own dequantize-then-dense path.
        self.quant: QuantizedWeight | None = None
        # The dense weight pre-packed for the device's matmul library (zili.layers.onednn): when
        # set, it serves every row count the quantized form does not (and `weight` may be empty).
        self.packed: PrepackedWeight | None = None
        # Batch-invariant mode (EngineConfig.deterministic; `set_batch_invariant`): every call runs one
        # kernel at exactly `row_tile` rows (padded, looped), so a row's result never depends on how
        # many rows share the call. None: the fastest kernel for the row count.
        self.row_tile: int | None = None
        # True while `weight` is an empty placeholder for a dense weight that was never loaded (the
        # loader's `defer_packed`): `release_dense_weights` drops it for good, otherwise
        # `zili.models.quantize.load_deferred_weights` reads it from the checkpoint after all.
        self.weight_deferred = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_tile is not None:
            return self._forward_batch_invariant(x, self.row_tile)
        quant = self.quant
        if quant is not None and x.shape[0] <= quant.max_rows:
            y = quant.matmul(x)
            return y + self.bias if self.bias is not None else y
        if self.packed is not None:
            return self.packed.matmul(x, self.bias)
        if quant is not None and self.weight.numel() == 0:  # no dense copy held: `release_dense_weights`
            y = quant.dense_matmul(x)  # type: ignore[attr-defined]
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight, self.bias)

    def _forward_batch_invariant(self, x: torch.Tensor, tile: int) -> torch.Tensor:
        """One kernel for every row count: the packed low-bit one when the layer has it (run on all rows
        at once where it is row-invariant, else in tiles), else the dense one in tiles of `tile` rows.
        BLAS / oneDNN pick their blocking, and so their summation order, by the row count; a fixed
        tile fixes it (the batch-invariant matmul of Thinking Machines' "Defeating Nondeterminism in
        LLM Inference", 2025)."""
        quant = self.quant
        if quant is not None and getattr(quant, "row_invariant", False):
            y = quant.matmul(x)
            return y + self.bias if self.bias is not None else y
        if quant is not None:
            def kernel(rows: torch.Tensor) -> torch.Tensor:
                y = quant.matmul(rows)
                return y + self.bias if self.bias is not None else y
        elif self.packed is not None:
            packed = self.packed

            def kernel(rows: torch.Tensor) -> torch.Tensor:
                return packed.matmul(rows, self.bias)
        else:
            def kernel(rows: torch.Tensor) -> torch.Tensor:
                return F.linear(rows, self.weight, self.bias)
        return tiled_rows(kernel, x, tile)

    def load(self, param_name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        """Copy one checkpoint tensor (`weight` or `bias`, shard `shard`) into place."""
        if tensor is NOT_LOADED:
            if not (param_name == "weight" and self.weight_deferred):
                raise ValueError(f"{param_name} of this projection was not deferred but came unread")
            return
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


def tiled_rows(kernel, x: torch.Tensor, tile: int) -> torch.Tensor:
    """kernel(rows [tile, in]) -> [tile, out], applied to x [..., in] in calls of exactly `tile` rows
    (the last padded with zeros); returns [..., out]."""
    rows = x.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    padded = -(-count // tile) * tile
    if padded != count:
        rows = torch.cat([rows, rows.new_zeros(padded - count, rows.shape[1])])
    out = torch.cat([kernel(rows[i:i + tile]) for i in range(0, padded, tile)]) if padded else \
        kernel(rows.new_zeros(tile, rows.shape[1]))[:0]
    return out[:count].reshape(*x.shape[:-1], out.shape[-1])


def set_batch_invariant(model: nn.Module, tile: int | None) -> int:
    """Put every `Linear` of `model` in batch-invariant mode with row tile `tile` (None: back to the
    row-count-dependent choice); returns how many layers it set."""
    count = 0
    for module in model.modules():
        if isinstance(module, Linear):
            module.row_tile = tile
            count += 1
    return count


def dense_weight_keeper(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """A predicate (module name, module) -> whether that layer's dense weight must stay: another module
    reads it (the model's `dense_weight_readers`, by full or leaf name) or shares it (tied embeddings)."""
    keep = set(getattr(model, "dense_weight_readers", ()))
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1

    def keeps(name: str, module: nn.Module) -> bool:
        return name in keep or name.rpartition(".")[2] in keep or owners.get(id(module.weight), 0) > 1
    return keeps


def release_dense_weights(model: nn.Module) -> int:
    """Drop the dense weight of every `Linear` whose packed copy can serve every row count itself
    (`DequantizingWeight.dequantizes`): past its row limit the layer then dequantizes into scratch
    memory instead of reading a dense copy (and `onednn.pack_dense_weights` makes none). Weights
    another module reads stay: the model's `dense_weight_readers` (an LM head's fp32 refinement, MLA's
    kv_b_proj) and weights shared between modules (tied embeddings). A weight the loader deferred
    (`Linear.weight_deferred`, never allocated) counts as released here. Returns how many were released."""
    keeps = dense_weight_keeper(model)
    count = 0
    for name, module in model.named_modules():
        if type(module) is not Linear or module.packed is not None or \
                (module.weight.numel() == 0 and not module.weight_deferred):
            continue
        if not getattr(module.quant, "dequantizes", False):
            continue
        if keeps(name, module):
            continue
        module.weight.data = torch.empty(0, dtype=module.weight.dtype)
        module.weight_deferred = False
        count += 1
    return count
