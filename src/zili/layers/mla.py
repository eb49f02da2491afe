"""Multi-head Latent Attention (DeepSeek V2/V3): projections, rotary, softmax scale.

The attention itself (paged latent cache, expanded prefill, absorbed decode) lives in
`zili.kernels.mla_attention`. This module turns hidden states into what it needs:

    q        = q_proj(x)  or  q_b_proj(q_a_layernorm(q_a_proj(x)))     [T, H, d_nope + d_rope]
    c, k_pe  = kv_a_proj_with_mqa(x)                                   [T, r], [T, d_rope]
    latent   = kv_a_layernorm(c)                                       what the cache stores
    out      = o_proj(attention(...))                                  [T, hidden]

With a q LoRA, q_a_proj and kv_a_proj_with_mqa read the same input, so they are one fused
`Linear` ("qkv_a_proj") whose two shards load from the two HF tensors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from zili.config import ModelConfig
from zili.kernels.attention import AttentionMetadata
from zili.kernels.mla_attention import mla_attention
from zili.layers.linear import Linear
from zili.layers.norm import RMSNorm
from zili.layers.parallel import TensorParallel, column_linear, row_linear, split_heads
from zili.layers.rotary import apply_rotary, rope_type_of

# Fused module name -> the HF projection names it concatenates, in row order.
MLA_FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {"qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa")}


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on pairs (x0, x1), (x2, x3), ... (DeepSeek's weight layout). x [T, n, d]; cos, sin [T, d/2].

    The rotated pairs come out de-interleaved ([rotated evens | rotated odds]); queries and keys get the
    same permutation, so their dot products, all attention ever uses, are unchanged.
    """
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def mla_softmax_scale(qk_head_dim: int, rope_scaling: dict[str, Any] | None) -> float:
    """1/sqrt(d_qk), times mscale(factor, mscale_all_dim)^2 under YaRN-style scaling (DeepSeek's rule)."""
    scale = qk_head_dim ** -0.5
    if rope_type_of(rope_scaling) != "default" and rope_scaling is not None:
        mscale_all_dim = rope_scaling.get("mscale_all_dim") or 0
        factor = float(rope_scaling.get("factor") or 1.0)
        if mscale_all_dim and factor > 1:
            m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
            scale *= m * m
    return scale


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None) -> None:
        """`tp`: heads split across ranks (q / kv_b rows, o_proj columns); the latent is replicated."""
        super().__init__()
        heads = split_heads(config.num_attention_heads, config.num_attention_heads, tp).q  # this rank's
        self.num_heads = H = heads.size
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = r = config.kv_lora_rank
        self.d_nope, self.d_rope, self.d_v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.qk_head_dim = self.d_nope + self.d_rope
        hidden, bias = config.hidden_size, config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = column_linear(hidden, H * self.qk_head_dim, tp, ranges=[heads.scaled(self.qk_head_dim)])
            self.kv_a_proj_with_mqa = Linear(hidden, r + self.d_rope, bias=bias)
        else:
            self.qkv_a_proj = Linear(hidden, [self.q_lora_rank, r + self.d_rope], bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = column_linear(self.q_lora_rank, H * self.qk_head_dim, tp,
                                          ranges=[heads.scaled(self.qk_head_dim)])
        self.kv_a_layernorm = RMSNorm(r, config.rms_norm_eps)
        self.kv_b_proj = column_linear(r, H * (self.d_nope + self.d_v), tp,
                                       ranges=[heads.scaled(self.d_nope + self.d_v)])
        self.o_proj = row_linear(H * self.d_v, hidden, tp, bias=bias, cols=heads.scaled(self.d_v))
        self.rotate = apply_rotary_interleaved if config.rope_interleave else apply_rotary
        self.scale = mla_softmax_scale(self.qk_head_dim, config.rope_scaling)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        T, H, r = x.shape[0], self.num_heads, self.kv_lora_rank
        if self.q_lora_rank is None:
            q, kv_a = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        else:
            q_a, kv_a = self.qkv_a_proj(x).split([self.q_lora_rank, r + self.d_rope], dim=-1)
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        q_nope, q_rope = q.view(T, H, self.qk_head_dim).split([self.d_nope, self.d_rope], dim=-1)
        latent = self.kv_a_layernorm(kv_a[:, :r])
        k_rope = kv_a[:, None, r:]  # [T, 1, d_rope]: one rotary key shared by every head
        q_rope, k_rope = self.rotate(q_rope, cos, sin), self.rotate(k_rope, cos, sin)
        w_kv_b = self.kv_b_proj.weight.view(H, self.d_nope + self.d_v, r)
        out = mla_attention(q_nope, q_rope, latent, k_rope[:, 0], kv_cache, meta, w_kv_b, self.scale)
        return self.o_proj(out.reshape(T, H * self.d_v))
