"""A quantized paged KV cache: int8 or fp8 (e4m3) elements with one scale per token and KV head.

Row layout. Every cache row (one token's keys, or values, of one KV head) of a quantized cache holds
head_dim one-byte elements followed by KV_SCALE_BYTES bytes: the row's scale as a bfloat16, so the
cache stays one tensor per layer ([2, num_blocks, block_size, n_kv, head_dim + 2], dtype int8 or
float8_e4m3fn) and every seam that passes a layer's cache along (models, compiled decode, captured
graphs) is unchanged. The scale beside its data is llama.cpp's Q8_0 idea at row granularity; the
per-token-and-head granularity is what KIVI and vLLM's per-token KV quantization use for keys and
values alike, which keeps an outlier token from costing the others their precision.

    scale = bf16(absmax(row) / QMAX)      QMAX = 127 (int8), 448 (fp8 e4m3's largest finite value)
    q     = round(row / scale) clamped to [-127, 127]      (int8)
          = fp8_e4m3(row / scale)                          (fp8: its own rounding)
    row'  = q * scale

The scale is rounded to bf16 before dividing, so the stored scale is exactly the one used.
Relative error per element: at most half a step, absmax / 254 for int8; about 2^-4 of the element
for fp8 e4m3 (3 mantissa bits).
"""

from __future__ import annotations

import torch

from zili.config import KV_SCALE_BYTES, QUANTIZED_KV_DTYPES

_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def is_quantized(cache: torch.Tensor) -> bool:
    """True for an int8 / fp8 cache (rows carry their scale)."""
    return cache.dtype in QUANTIZED_KV_DTYPES


def head_dim(cache: torch.Tensor) -> int:
    """The elements per row a cache holds, its scale bytes not counted."""
    return cache.shape[-1] - (KV_SCALE_BYTES if is_quantized(cache) else 0)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Quantize rows x [..., d] to packed cache rows [..., d + 2] of `dtype` (int8 or
    torch.float8_e4m3fn): d elements, then the row's bf16 scale, low byte first (x86's order, so a
    kernel reads it as a bf16 in place). Rows of zeros get a zero scale and dequantize to zeros.
    The bit operations are same-width casts only, which torch.compile lowers (the compiled decode
    step quantizes inside its graph)."""
    qmax = _QMAX[dtype]
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / qmax).to(torch.bfloat16).float()  # [..., 1], exact bf16
    scaled = xf / scale.clamp_min(torch.finfo(torch.float32).tiny)
    if dtype == torch.int8:
        q = scaled.round().clamp(-127, 127).to(torch.int8).view(torch.uint8)
    else:
        q = scaled.clamp(-qmax, qmax).to(dtype).view(torch.uint8)
    bits = scale.view(torch.int32) >> 16  # the bf16 pattern; scales are >= 0, so no sign to carry
    scale_bytes = torch.cat([bits & 0xFF, bits >> 8], dim=-1).to(torch.uint8)
    return torch.cat([q, scale_bytes], dim=-1).view(dtype)


def row_scales(rows: torch.Tensor) -> torch.Tensor:
    """The float32 scale of each packed row: [..., d + 2] -> [..., 1]."""
    raw = rows.view(torch.uint8)
    d = rows.shape[-1] - KV_SCALE_BYTES
    bits = raw[..., d:d + 1].to(torch.int32) | (raw[..., d + 1:d + 2].to(torch.int32) << 8)
    return (bits << 16).view(torch.float32)


def dequantize_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows [..., d + 2] back to values [..., d] in `dtype`. Rows of a float cache are only
    cast, so a caller need not ask which kind of cache it reads."""
    if not is_quantized(rows):
        return rows.to(dtype)
    d = rows.shape[-1] - KV_SCALE_BYTES
    return (rows[..., :d].float() * row_scales(rows)).to(dtype)
