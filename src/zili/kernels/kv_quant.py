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

MLA's latent cache (DeepSeek V2/V3, `zili.kernels.mla_attention`) has one row per token and layer,
[c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)], shared by every head. Quantized, the row keeps two
scales, one per part, both at its end:

    [ q(c_kv) : r bytes | q(k_pe) : d_rope bytes | scale(c_kv) : bf16 | scale(k_pe) : bf16 ]

because the parts are different quantities: c_kv comes out of an RMSNorm (its range is the norm's
weights'), k_pe is a roped projection with its own range, and one scale over both would let the
larger spend the other's precision (FlashMLA's fp8 cache also keeps the rope part apart). Two scales
cost 4 bytes on 576 (DeepSeek-V3: r 512, d_rope 64), 1.98x fewer bytes than a bf16 latent.
`quantize_latent_rows` / `dequantize_latent_rows` write and read that row; each part is quantized
exactly as `quantize_rows` quantizes a row.

Kernels that read these rows in place (zili's C++ decode kernel, the Triton kernels in
`triton_attention` / `triton_mla`) load the one-byte elements and the row scale and agree with
`dequantize_rows` on the values; the Triton write kernel stores the same bytes as `quantize_rows`.
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


# MLA's latent rows: [q(c_kv) | q(k_pe) | scale(c_kv) | scale(k_pe)] (module docstring).
LATENT_SCALE_BYTES = 2 * KV_SCALE_BYTES


def quantize_latent_rows(latent: torch.Tensor, k_rope: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MLA latent cache rows: latent [..., r] and k_rope [..., d_rope] -> [..., r + d_rope + 4] of
    `dtype` (int8 or torch.float8_e4m3fn), each part with its own bf16 scale (quantize_rows'), the
    two scales at the row's end in the parts' order."""
    r = latent.shape[-1]
    c = quantize_rows(latent, dtype).view(torch.uint8)
    pe = quantize_rows(k_rope, dtype).view(torch.uint8)
    d_rope = k_rope.shape[-1]
    return torch.cat([c[..., :r], pe[..., :d_rope], c[..., r:], pe[..., d_rope:]], dim=-1).view(dtype)


def latent_row_scales(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 scales (c_kv's, k_pe's) of packed latent rows [..., C + 4]: two [..., 1]."""
    c = rows.shape[-1] - LATENT_SCALE_BYTES
    return row_scales(rows[..., :c + KV_SCALE_BYTES]), row_scales(rows)


def dequantize_latent_rows(rows: torch.Tensor, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """Latent cache rows back to [..., r + d_rope] in `dtype`; `rank` is r (kv_lora_rank). Rows of a
    float cache are only cast."""
    if not is_quantized(rows):
        return rows.to(dtype)
    c = rows.shape[-1] - LATENT_SCALE_BYTES
    scale_c, scale_pe = latent_row_scales(rows)
    values = rows[..., :c].float()
    return torch.cat([values[..., :rank] * scale_c, values[..., rank:] * scale_pe], dim=-1).to(dtype)
