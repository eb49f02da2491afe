"""Weights kept quantized in memory, and the matmuls that consume them.

Two packed forms, both fed bf16 activations (the CPU kernels fall onto a path 10-80x slower
with fp32 input):
  int4: 4-bit codes with a (scale, zero) pair per group of 32 input features,
        w = (q - 8) * scale + zero, consumed by `aten._weight_int4pack_mm_for_cpu`.
  int8: 8-bit codes with one scale per output row, w = q * scale, consumed by `_weight_int8pack_mm`.

GGUF Q4_0, Q4_1 and Q4_K blocks map onto int4 without touching the codes: each 32-element group
has w = q * d + m, so scale = d and zero = m + 8 * d (the scales are rounded to bf16, the kernels'
scale type). Q8_0, Q5_K and Q6_K, whose codes do not fit in 4 bits, become int8 per row.
Float checkpoints can be quantized on load to either form.

Quantized kernels win at small row counts (decode); at larger ones (prefill, big batches) the
dense bf16 matmul is faster on CPUs, so a layer keeps its dense weight and switches by row count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

GROUP = 32
# Row counts up to which the quantized kernel beats dense bf16 (measured on AVX512 CPUs; the
# tuner can override it per machine).
DEFAULT_MAX_ROWS = 16


@dataclass
class GroupQuant:
    """4-bit codes [N, K] (int32, 0..15) with per-group scale and min [N, K/GROUP]: w = q*scale + min."""

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor


class Int4Weight:
    def __init__(self, gq: GroupQuant, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        self.out_features, self.in_features = gq.codes.shape
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(gq.codes.to(torch.int32), 2)
        zero = gq.minimum + 8 * gq.scale
        # [K/GROUP, N, 2] bf16, the layout the kernel reads.
        self.scales_zeros = torch.stack([gq.scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.max_rows = max_rows

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP, self.scales_zeros)
        return y.to(x.dtype)

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2


class Int8Weight:
    def __init__(self, weight: torch.Tensor, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        w = weight.float()
        self.out_features, self.in_features = w.shape
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.scales = scale.to(torch.bfloat16)
        self.max_rows = max_rows

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scales).to(x.dtype)

    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 2


# ---- GGUF blocks -> group quantization -------------------------------------------------------

INT4_GGUF_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q4_K)
INT8_GGUF_TYPES = (QT.Q8_0, QT.Q5_K, QT.Q6_K)


def _f16(block: np.ndarray, start: int) -> np.ndarray:
    return block[:, start:start + 2].copy().view(np.float16).astype(np.float32)[:, 0]


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 codes: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def gguf_group_quant(data: np.ndarray, qtype: QT, shape: tuple[int, int]) -> GroupQuant:
    """Decode Q4_0 / Q4_1 / Q4_K rows (uint8 [N, bytes_per_row]) into codes, scales and mins."""
    n, k = shape
    if qtype in (QT.Q4_0, QT.Q4_1):
        size = 18 if qtype == QT.Q4_0 else 20
        blocks = data.reshape(n * (k // 32), size)
        d = _f16(blocks, 0)
        m = -8.0 * d if qtype == QT.Q4_0 else _f16(blocks, 2)
        codes = _nibbles_32(blocks[:, size - 16:])
        scale, minimum = d, m
    elif qtype == QT.Q4_K:
        blocks = data.reshape(n * (k // 256), 144)
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, mn = _unpack_k4_scales(blocks[:, 4:16])  # [B, 8] each
        qs = blocks[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 64 elements
        codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)  # sub-block 2j: low, 2j+1: high
        scale = (d[:, None] * sc).reshape(-1)
        minimum = (-dmin[:, None] * mn).reshape(-1)
        codes = codes.reshape(-1, 32)
    else:
        raise ValueError(f"GGUF type {qtype.name} has no 4-bit group form; supported: Q4_0, Q4_1, Q4_K")
    groups = k // GROUP
    return GroupQuant(
        codes=torch.from_numpy(codes.astype(np.int32).reshape(n, k)),
        scale=torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(n, groups)),
        minimum=torch.from_numpy(np.ascontiguousarray(minimum, dtype=np.float32).reshape(n, groups)),
    )


def _unpack_k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K packs eight 6-bit scales and eight 6-bit mins into 12 bytes."""
    s = s.astype(np.uint16)
    sc = np.empty((s.shape[0], 8), dtype=np.float32)
    mn = np.empty((s.shape[0], 8), dtype=np.float32)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def float_group_quant(weight: torch.Tensor) -> GroupQuant:
    """Asymmetric 4-bit quantization per group of 32 input features (for float checkpoints)."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // GROUP, GROUP)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    codes = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return GroupQuant(codes.reshape(n, k), scale, lo)


def dequantize_group(gq: GroupQuant) -> torch.Tensor:
    n, k = gq.codes.shape
    w = gq.codes.reshape(n, k // GROUP, GROUP).float() * gq.scale[..., None] + gq.minimum[..., None]
    return w.reshape(n, k)


def concat_group_quants(parts: list[GroupQuant]) -> GroupQuant:
    return GroupQuant(*(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scale", "minimum")))
