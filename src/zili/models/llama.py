"""The Llama family: Llama 2/3 (incl. "llama3" rope scaling), SmolLM, Mistral, Qwen2/2.5, Qwen3.

One flat batch of T tokens (no batch dimension) runs through the decoder; attention reads and
writes the paged KV cache through `zili.kernels.attention.paged_attention`.

Family differences, all read from ModelConfig:
  qwen2  q/k/v bias (never o_proj: ModelConfig.o_proj_bias)
  qwen3  per-head RMSNorm on q and k before RoPE; explicit head_dim
  llama  q/k/v *and* o_proj bias when attention_bias (as HF's LlamaAttention)

q/k/v and gate/up are each fused into one projection; `load_weights` fills them shard by shard
from HF-named tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zili.config import ModelConfig
from zili.kernels.attention import AttentionMetadata, paged_attention
from zili.layers import fused
from zili.layers.activation import act_and_mul
from zili.layers.norm import RMSNorm
from zili.layers.parallel import TensorParallel, column_linear, lm_head, row_linear, split_heads, vocab_embedding
from zili.layers.rotary import RotaryEmbedding
from zili.models.base import CausalLM
from zili.weights.errors import UnsupportedModelError
from zili.weights.gguf import GGUFCheckpoint, GGUFLayout

# Fused module name -> the HF projection names it concatenates, in row order.
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


class LlamaAttention(nn.Module):
    q_norm: RMSNorm | None  # Qwen3's per-head q/k norms (config.qk_norm); None without them
    k_norm: RMSNorm | None

    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None, layer_idx: int = 0) -> None:
        super().__init__()
        self.window = config.layer_window(layer_idx)  # Mistral / Qwen sliding layers; None: full
        heads = split_heads(config.num_attention_heads, config.num_key_value_heads, tp)  # this rank's
        self.num_heads = heads.q.size
        self.num_kv_heads = heads.kv.size
        self.head_dim = d = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        o_bias = bool(config.o_proj_bias)
        self.qkv_proj = column_linear(config.hidden_size, [self.q_size, self.kv_size, self.kv_size], tp,
                                      bias=config.attention_bias,
                                      ranges=[heads.q.scaled(d), heads.kv.scaled(d), heads.kv.scaled(d)])
        self.o_proj = row_linear(self.q_size, config.hidden_size, tp, bias=o_bias, cols=heads.q.scaled(d))
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:  # set together (config.qk_norm)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = fused.rotary_qk(q, k, cos, sin)
        out = paged_attention(q, k, v, kv_cache, meta, self.scale, window=self.window)  # [T, n_heads, d]
        return self.o_proj(out.reshape(T, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = column_linear(config.hidden_size, [inter, inter], tp)
        self.down_proj = row_linear(inter, config.hidden_size, tp)
        self.act = act_and_mul(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None, layer_idx: int = 0) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, tp, layer_idx)
        self.mlp = LlamaMLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x, h = self.post_attention_layernorm.add_and_norm(
            x, self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta))
        return x + self.mlp(h)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.embed_tokens = vocab_embedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, tp, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                          config.rope_theta, config.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, H]
        cos, sin = self.rotary_emb(positions, x.dtype)  # [T, d/2] each, shared by every layer
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, kv_cache, meta)
        return self.norm(x)


class LlamaForCausalLM(CausalLM):
    family = "llama"
    fused_projections = FUSED_PROJECTIONS

    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None) -> None:
        """`tp`: this rank's place in a tensor-parallel group (None: the whole model on one device)."""
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, tp)
        self.lm_head = lm_head(config.hidden_size, config.vocab_size, tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


def _whole_head_rotary(checkpoint: GGUFCheckpoint) -> dict[str, Any]:
    """The Llama-shaped GGUF families rotate whole heads; a file that says otherwise is refused."""
    heads = int(checkpoint.meta("attention.head_count"))
    head_dim = int(checkpoint.meta("attention.key_length", int(checkpoint.meta("embedding_length")) // heads))
    rope_dim = int(checkpoint.meta("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UnsupportedModelError(
            f"{checkpoint.path}: partial rotary embeddings (rope.dimension_count {rope_dim} < head dim {head_dim}) "
            "are not supported; zili rotates the whole head."
        )
    return {}


# llama.cpp's GGUF dialects of this family. Its converter permutes Llama's q/k rows into its
# interleaved rotary order (transformers' GGUF loader undoes that for "llama" only); Qwen2/3 keep HF's.
LLAMA_GGUF_LAYOUT = GGUFLayout("llama", "llama", "LlamaForCausalLM", rotary_permuted=True,
                               config_fields=_whole_head_rotary)
QWEN2_GGUF_LAYOUT = GGUFLayout("qwen2", "qwen2", "Qwen2ForCausalLM", config_fields=_whole_head_rotary)
QWEN3_GGUF_LAYOUT = GGUFLayout("qwen3", "qwen3", "Qwen3ForCausalLM", config_fields=_whole_head_rotary)
