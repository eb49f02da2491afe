"""Rotary position embedding, HF "rotate_half" convention (weights are in HF layout).

The cos/sin table is computed once in float32 for positions [0, max_position) and indexed by the
flat `positions` tensor of a step, so the per-step cost is one gather.

Supported `rope_scaling` types: None / "default", "linear", "llama3" (Llama 3.1's smoothed
low/high-frequency rescale) and "yarn" (Qwen2.5/Qwen3 long context). The dict is HF-style;
"rope_type" or the older "type" key names it. Each formula follows transformers'
modeling_rope_utils, the oracle.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from zili.layers import fused

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_type_of(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type") or scaling.get("type") or "default"


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """[head_dim/2] float32: theta^(-2i/d), computed exactly as HF does."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return 1.0 / (theta ** exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend the band between."""
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def yarn_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any],
                  max_position: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, ramp between; plus the cos/sin
    magnitude factor ("attention_factor")."""
    factor = float(scaling.get("factor") or 0.0)
    original = int(scaling.get("original_max_position_embeddings") or max_position)
    if not factor:
        factor = max_position / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None,
                  max_position: int) -> tuple[torch.Tensor, float]:
    """([head_dim/2] float32 inverse frequencies, factor applied to cos and sin)."""
    rope_type = rope_type_of(scaling)
    if rope_type == "default":
        return default_inv_freq(head_dim, theta), 1.0
    assert scaling is not None
    try:
        if rope_type == "linear":
            return default_inv_freq(head_dim, theta) / float(scaling["factor"]), 1.0
        if rope_type == "llama3":
            return llama3_inv_freq(
                default_inv_freq(head_dim, theta), float(scaling["factor"]), float(scaling["low_freq_factor"]),
                float(scaling["high_freq_factor"]),
                int(scaling.get("original_max_position_embeddings") or max_position),
            ), 1.0
        if rope_type == "yarn":
            return yarn_inv_freq(head_dim, theta, scaling, max_position)
    except KeyError as e:
        raise ValueError(f"rope scaling {rope_type!r} needs the key {e.args[0]!r}; got {scaling}") from None
    raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, n_heads, d]; cos, sin [T, d/2]. Same as HF's x*cos + rotate_half(x)*sin."""
    return fused.rotary(x, cos, sin)


class RotaryEmbedding(nn.Module):
    cos_sin: torch.Tensor  # [max_position, head_dim] float32: cos then sin of every position's angles

    def __init__(self, head_dim: int, max_position: int, theta: float = 10000.0,
                 scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.max_position = max_position
        inv_freq, magnitude = rope_inv_freq(head_dim, theta, scaling, max_position)  # [d/2] fp32
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)  # [P, d/2]
        cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        if magnitude != 1.0:
            cos_sin = cos_sin * magnitude
        # Kept in float32 whatever the model dtype; rows are cast per step, as HF casts cos/sin.
        self.register_buffer("cos_sin", cos_sin, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, d/2] in `dtype`."""
        cos_sin = self.cos_sin[positions].to(dtype)
        cos, sin = cos_sin.chunk(2, dim=-1)
        return cos, sin
