"""Each tensor-parallel rank reads only its own slice of the checkpoint (used by the loader and by
`zili.distributed.weights.load_shard`).

`shard_specs(model)` lists, per checkpoint tensor, which slice this rank's model holds: rows of a
column-parallel projection or of the vocabulary, columns of a row-parallel one, or nothing at all
for routed experts held by another rank. With it:

  - `sharded_tensors` reads an HF safetensors checkpoint slice by slice (`safe_open(...).get_slice`),
    so a rank never materialises more than its shard; other checkpoints (GGUF, block-FP8) are
    streamed one full tensor at a time and the layers keep their slice.
  - `ShardedRawCheckpoint` hands `zili.models.quantize` this rank's slice of a GGUF tensor's
    stored blocks, so int4 weights keep the checkpoint's own codes under tensor parallelism too.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from safetensors import safe_open
from torch import nn

from zili.layers.moe import FusedExperts
from zili.layers.parallel import ColumnParallelLinear, RowParallelLinear, ShardRange, VocabParallelEmbedding

# hf name -> (dim, range) for a sliced tensor; None for a tensor this rank does not hold at all.
ShardSpecs = dict[str, "tuple[int, ShardRange] | None"]
_EXPERT_LEAVES = ("gate_proj", "up_proj", "down_proj")


def shard_specs(model: nn.Module) -> ShardSpecs:
    """Which slice of each checkpoint tensor this rank's model holds (replicated tensors are absent)."""
    fused: dict[str, tuple[str, ...]] = getattr(inspect.getmodule(type(model)), "FUSED_PROJECTIONS", {})
    specs: ShardSpecs = {}
    for name, module in model.named_modules():
        prefix, _, leaf = name.rpartition(".")
        dotted = f"{prefix}." if prefix else ""
        if isinstance(module, ColumnParallelLinear):
            for shard, hf_leaf in enumerate(fused.get(leaf, (leaf,))):
                for param in ("weight", "bias"):
                    specs[f"{dotted}{hf_leaf}.{param}"] = (0, module.ranges[shard])
        elif isinstance(module, RowParallelLinear):
            specs[f"{name}.weight"] = (1, module.cols)
        elif isinstance(module, VocabParallelEmbedding):
            specs[f"{name}.weight"] = (0, module.rows)
        elif isinstance(module, FusedExperts):
            for expert in range(module.num_experts):
                if expert not in module.expert_range:
                    for hf_leaf in _EXPERT_LEAVES:
                        specs[f"{name}.{expert}.{hf_leaf}.weight"] = None
    return specs


def sharded_tensors(checkpoint, specs: ShardSpecs, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf name, tensor) like `checkpoint.tensors(dtype)`, each tensor already cut to this rank's slice
    where the format allows it. Tensors this rank does not hold come as empty placeholders."""
    if getattr(checkpoint, "format", None) != "hf" or checkpoint.hf_config.get("quantization_config"):
        yield from checkpoint.tensors(dtype)  # streamed whole; the layers cut their slice
        return
    from zili.weights.safetensors import _KEEP_FP32_SUFFIXES, _SKIPPED_SUFFIXES

    placeholder = torch.empty(0)
    for file in checkpoint.weight_files():
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name.endswith(_SKIPPED_SUFFIXES):
                    continue
                spec = specs.get(name, ())
                if spec is None:
                    yield name, placeholder  # another rank's expert: the model skips it unread
                    continue
                if spec:
                    dim, rows = spec
                    sliced = f.get_slice(name)
                    index = (slice(rows.start, rows.stop),) if dim == 0 else (slice(None), slice(rows.start, rows.stop))
                    t = sliced[index] if len(sliced.get_shape()) > dim else sliced[:]
                else:
                    t = f.get_tensor(name)
                if t.is_floating_point() and not name.endswith(_KEEP_FP32_SUFFIXES):
                    t = t.to(dtype)
                yield name, t


class ShardedRawCheckpoint:
    """A GGUF checkpoint seen through one rank's shard specs, for `quantize_model`.

    `raw_tensor(name)` gives this rank's rows (or block-aligned columns) of the stored blocks, zero
    blocks for padding (zero bytes decode to zero in every GGUF block type). A column slice that
    cuts through a block raises KeyError, which `quantize_model` treats as "no stored blocks"."""

    def __init__(self, checkpoint, specs: ShardSpecs) -> None:
        self.checkpoint, self.specs = checkpoint, specs

    def raw_tensor(self, name: str):
        raw = self.checkpoint.raw_tensor(name)
        spec = self.specs.get(name, ())
        if not spec:
            if spec is None:
                raise KeyError(name)
            return raw
        dim, rows = spec
        if dim == 0:
            data = np.zeros((rows.size, raw.data.shape[1]), dtype=raw.data.dtype)
            data[:rows.count] = raw.data[rows.start:rows.stop]
            return replace(raw, shape=(rows.size, *raw.shape[1:]), data=data)
        block_elems, block_bytes = GGML_QUANT_SIZES[raw.qtype]
        if rows.start % block_elems or rows.size % block_elems or rows.count % block_elems:
            raise KeyError(f"{name}: columns {rows.start}:{rows.stop} cut through {block_elems}-element blocks")
        start, count, size = (v // block_elems * block_bytes for v in (rows.start, rows.count, rows.size))
        data = np.zeros((raw.data.shape[0], size), dtype=raw.data.dtype)
        data[:, :count] = raw.data[:, start:start + count]
        return replace(raw, shape=(raw.shape[0], rows.size), data=data)
