"""Attach quantized weights to a loaded model's projections (`--quantization`).

Modes:
  auto  GGUF checkpoints keep their own quantization: Q4_0/Q4_1/Q4_K projections become int4
        with their codes unchanged, Q8_0/Q5_K/Q6_K become int8; float checkpoints stay dense.
  int4  every projection int4 (GGUF 4-bit blocks exactly, anything else quantized per group of 32).
  int8  every projection int8 per output row.
  none  dense only (the previous path, kept for debugging and for the tuner).
The LM head is never made int4: requantizing it to 4 bits costs too much accuracy (top-1
agreement fell to 84% on SmolLM2); it gets int8 whenever the others are quantized.

`quantize_and_calibrate` is the one path from a loaded model to its serving weights, used by the
single-process engine's builder and by every tensor-parallel shard (zili.distributed.weights):
quantize, pre-pack the dense rest for oneDNN, then calibrate (or apply the tuned) row limit.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zili.config import QUANTIZATION_MODES
from zili.layers import onednn
from zili.layers.linear import Linear
from zili.layers.quant import (
    DEFAULT_MAX_ROWS,
    INT4_GGUF_TYPES,
    GroupQuant,
    Int4Weight,
    Int8Weight,
    concat_group_quants,
    float_group_quant,
    gguf_group_quant,
)

LM_HEAD = "lm_head"

logger = logging.getLogger(__name__)


@dataclass
class QuantizeReport:
    """What `quantize_and_calibrate` did: layers per form ("int4", "int8", "dense"), dense
    projections pre-packed for oneDNN, and the row limit up to which quantized kernels run
    (with how it was chosen: "measured", "tuned", or None when nothing was quantized)."""

    counts: dict[str, int]
    packed_dense: int = 0
    max_rows: int | None = None
    how: str | None = None


def quantize_and_calibrate(model: nn.Module, mode: str, dtype: torch.dtype, matmul_backend: str,
                           open_checkpoint: Callable[[], Any] | None = None,
                           max_rows: int | None = None) -> QuantizeReport:
    """Turn a loaded model's projections into their serving form, in place.

    `mode`: a QUANTIZATION_MODES entry; `matmul_backend`: the platform's (`Platform.matmul_backend()`;
    only "cpu-packed" has int4/int8 kernels, elsewhere the weights stay dense); `open_checkpoint`:
    opens the raw (GGUF) checkpoint whose 4-bit blocks are kept as they are, None for float
    checkpoints (a tensor-parallel rank passes its sharded view); `max_rows`: a tuned row limit,
    None to measure it here (`calibrate_max_rows`). ValueError for an unknown mode."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, got {mode!r}")
    if matmul_backend != "cpu-packed":
        if mode != "none":
            logger.info("weights: dense (no packed int4/int8 matmul on this device)")
        return QuantizeReport({})
    checkpoint = open_checkpoint() if mode != "none" and open_checkpoint is not None else None
    report = QuantizeReport(dict(quantize_model(model, mode, checkpoint)))
    # Dense weights pre-packed for oneDNN after quantizing (which reads them) and before calibrating
    # (which races the packed path against the quantized one).
    if onednn.available(dtype):
        report.packed_dense = onednn.pack_dense_weights(model)
        logger.info("weights: %d dense projections pre-packed for oneDNN (bf16)", report.packed_dense)
    if report.counts.keys() - {"dense"}:
        if max_rows is None:
            report.max_rows, report.how = calibrate_max_rows(model), "measured"
        else:
            set_quant_max_rows(model, max_rows)
            report.max_rows, report.how = max_rows, "tuned"
        logger.info("weights: %s; quantized kernels used up to %d rows per step (%s)",
                    ", ".join(f"{n} {form}" for form, n in report.counts.items()), report.max_rows, report.how)
    return report


def quantize_model(model: nn.Module, mode: str, checkpoint=None, max_rows: int = DEFAULT_MAX_ROWS) -> Counter:
    """Attach packed weights to every `Linear` per `mode`. Returns how many layers got each form."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, got {mode!r}")
    counts: Counter = Counter()
    if mode == "none":
        return counts
    raw_types = _raw_type_reader(checkpoint)
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        shards = _shard_names(model, name, module)
        types = [raw_types(s) for s in shards]
        form = _choose(mode, name, types)
        if form == "int4":
            module.quant = Int4Weight(_group_quant(checkpoint, shards, types, module), max_rows)
        elif form == "int8":
            module.quant = Int8Weight(module.weight.detach(), max_rows)
        counts[form] += 1
    return counts


def _choose(mode: str, name: str, types: list) -> str:
    is_head = name == LM_HEAD
    if mode == "int8" or (mode == "int4" and is_head):
        return "int8"
    if mode == "int4":
        return "int4"
    # auto: follow the checkpoint
    if not types or any(t is None for t in types):
        return "dense"
    if all(t in INT4_GGUF_TYPES for t in types) and not is_head:
        return "int4"
    return "int8" if all(getattr(t, "name", "").startswith("Q") for t in types) else "dense"


def _group_quant(checkpoint, shards: list[str], types: list, module: Linear) -> GroupQuant:
    if types and all(t in INT4_GGUF_TYPES for t in types):
        parts = []
        for hf in shards:
            raw = checkpoint.raw_tensor(hf)
            parts.append(gguf_group_quant(raw.data, raw.qtype, raw.shape))
        return concat_group_quants(parts)
    return float_group_quant(module.weight.detach())


def _raw_type_reader(checkpoint):
    """hf name -> GGUF quant type, or None for float checkpoints / unknown names."""
    if checkpoint is None or not hasattr(checkpoint, "raw_tensor"):
        return lambda name: None

    def read(name: str):
        try:
            return checkpoint.raw_tensor(name).qtype
        except KeyError:
            return None
    return read


def _shard_names(model: nn.Module, module_name: str, module: Linear) -> list[str]:
    """The checkpoint tensor names whose rows make up this projection's weight."""
    if module_name == LM_HEAD and getattr(model.config, "tie_word_embeddings", False):
        return ["model.embed_tokens.weight"]
    prefix, _, leaf = module_name.rpartition(".")
    leaves = getattr(model, "fused_projections", {}).get(leaf, (leaf,))
    return [f"{prefix}.{hf}.weight" if prefix else f"{hf}.weight" for hf in leaves]


def _linears(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]


def quantized_bytes(model: nn.Module) -> int:
    return sum(m.quant.nbytes() for _, m in _linears(model) if m.quant is not None)


def calibrate_max_rows(model: nn.Module, candidates=(1, 2, 4, 8, 16, 32, 64), repeats: int = 5) -> int:
    """Measure where the quantized kernels stop beating the dense matmul on this machine.

    CPUs differ widely: with AMX, dense bf16 is nearly flat in the row count and wins from ~8
    rows; with AVX512 alone the quantized GEMV wins up to ~16-32. Timed on the largest
    quantized projection, best of `repeats`; applied to every layer. Returns the chosen limit.
    """
    layers = [m for _, m in _linears(model) if m.quant is not None]
    if not layers:
        return 0

    def size(m) -> int:
        return m.in_features * m.out_features

    layer = max((m for m in layers if type(m.quant).__name__ == "Int4Weight"), key=size,
                default=max(layers, key=size))
    if layer.packed is not None:  # the dense path this layer really takes (zili.layers.onednn)
        dense_matmul = layer.packed.matmul
    else:
        weight = layer.weight.detach()

        def dense_matmul(x):
            return F.linear(x, weight)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    chosen = 0
    with torch.inference_mode():
        for rows in candidates:
            # the model's activation dtype: fp32 where the CPU has no native bf16
            x = torch.randn(rows, layer.in_features, dtype=layer.weight.dtype)
            if best(lambda: layer.quant.matmul(x)) >= best(lambda: dense_matmul(x)):  # noqa: B023 (called at once)
                break
            chosen = rows
    set_quant_max_rows(model, chosen)
    return chosen


def set_quant_max_rows(model: nn.Module, max_rows: int) -> None:
    for _, m in _linears(model):
        if m.quant is not None:
            m.quant.max_rows = max_rows
