"""Gemma 3 (text): Google's decoder with interleaved sliding-window and global attention layers.

What sets it apart from the Llama family (Gemma Team, "Gemma 3 Technical Report", 2025, sec. 2;
transformers' `modeling_gemma3`, the oracle):
  - local and global layers: a sliding layer attends only to the last `sliding_window` positions
    (`ModelConfig.layer_window`), one layer in six is global (`layer_types`);
  - two rotary tables: local layers use `rope_local_base_freq` (10k) and no scaling, global ones
    `rope_theta` (1M) with the checkpoint's `rope_scaling` (linear x8 on the 4B+ models);
  - RMSNorm that scales by (1 + weight) in float32, four per layer (before and after attention,
    before and after the MLP), plus per-head QK-norm before RoPE;
  - GeGLU MLP with the tanh approximation of GELU;
  - embeddings multiplied by sqrt(hidden_size) (rounded to the model dtype, as HF does);
  - attention scaled by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5;
  - the LM head tied to the 262k-token embedding, optional tanh soft-capping of the final logits.

llama.cpp stores the norm weights as (1 + weight) (its RMSNorm multiplies by the weight alone);
`GEMMA3_GGUF_LAYOUT` subtracts the 1 back so both formats load into the same HF-named parameters.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from zili.config import ModelConfig
from zili.kernels.attention import AttentionMetadata, paged_attention
from zili.layers import fused
from zili.layers.parallel import TensorParallel, column_linear, lm_head, row_linear, split_heads, vocab_embedding
from zili.layers.rotary import RotaryEmbedding
from zili.models.base import CausalLM
from zili.models.llama import LlamaMLP
from zili.weights.errors import UnsupportedModelError
from zili.weights.gguf import LLAMA_BLOCK_NAMES, GGUFCheckpoint, GGUFLayout

FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
# Gemma 3 puts a global layer after every five local ones (llama.cpp hard-codes the same pattern).
SLIDING_WINDOW_PATTERN = 6


class GemmaRMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * (1 + weight), in float32, cast back to x's dtype at the end
    (Gemma multiplies before the cast, Llama after: the order changes bf16 results)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class Gemma3Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, tp: TensorParallel | None = None) -> None:
        super().__init__()
        heads = split_heads(config.num_attention_heads, config.num_key_value_heads, tp)
        self.num_heads, self.num_kv_heads = heads.q.size, heads.kv.size
        self.head_dim = d = config.head_dim
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        self.scale = float(config.query_pre_attn_scalar or d) ** -0.5
        self.window = config.layer_window(layer_idx)  # None on a global layer
        self.qkv_proj = column_linear(config.hidden_size, [self.q_size, self.kv_size, self.kv_size], tp,
                                      bias=config.attention_bias,
                                      ranges=[heads.q.scaled(d), heads.kv.scaled(d), heads.kv.scaled(d)])
        self.o_proj = row_linear(self.q_size, config.hidden_size, tp, bias=config.attention_bias,
                                 cols=heads.q.scaled(d))
        self.q_norm = GemmaRMSNorm(d, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(d, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.view(T, self.num_heads, self.head_dim))
        k = self.k_norm(k.view(T, self.num_kv_heads, self.head_dim))
        v = v.view(T, self.num_kv_heads, self.head_dim)
        q, k = fused.rotary_qk(q, k, cos, sin)
        out = paged_attention(q, k, v, kv_cache, meta, self.scale, window=self.window)  # [T, n_heads, d]
        return self.o_proj(out.reshape(T, self.q_size))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.is_sliding = config.layer_window(layer_idx) is not None
        self.self_attn = Gemma3Attention(config, layer_idx, tp)
        self.mlp = LlamaMLP(config, tp)  # GeGLU: the gated MLP with config.hidden_act
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.embed_tokens = vocab_embedding(config.vocab_size, config.hidden_size, tp)
        self.embed_scale = math.sqrt(config.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i, tp) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_global = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                             config.rope_theta, config.rope_scaling)
        local_theta = config.rope_local_base_freq or config.rope_theta
        self.rotary_local = RotaryEmbedding(config.head_dim, config.max_position_embeddings, local_theta, None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, H]
        # HF rounds the scale to the model dtype before multiplying (sqrt(640) -> 25.25 in bf16).
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        local = self.rotary_local(positions, x.dtype)  # (cos, sin) [T, d/2] each
        global_ = self.rotary_global(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            cos, sin = local if layer.is_sliding else global_
            x = layer(x, cos, sin, kv_cache, meta)
        return self.norm(x)


class Gemma3ForCausalLM(CausalLM):
    family = "gemma3"
    fused_projections = FUSED_PROJECTIONS

    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None) -> None:
        """`tp`: this rank's place in a tensor-parallel group (None: the whole model on one device)."""
        super().__init__()
        self.config = config
        self.model = Gemma3Model(config, tp)
        self.lm_head = lm_head(config.hidden_size, config.vocab_size, tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, vocab] float32, soft-capped as cap * tanh(logits / cap) when
        the config sets `final_logit_softcapping` (Gemma 2; Gemma 3 checkpoints leave it unset)."""
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


# --------------------------------------------------------------------------------------------
# Checkpoint formats
# --------------------------------------------------------------------------------------------


def layer_types_for(num_layers: int, pattern: int = SLIDING_WINDOW_PATTERN) -> list[str]:
    """HF's default Gemma 3 layout: every `pattern`-th layer global, the others sliding."""
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]


def gemma3_hf_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's own ModelConfig fields from an HF config.json (transformers 4.5x and 5.x spellings).

    transformers 5 keeps per-layer-type rope settings in `rope_parameters`
    ({"sliding_attention": {...}, "full_attention": {...}}); 4.x has `rope_local_base_freq` next to
    `rope_theta` / `rope_scaling`. ValueError for attention-logit soft-capping (Gemma 2's), which no
    attention backend here applies."""
    if cfg.get("attn_logit_softcapping") is not None:
        raise ValueError("attn_logit_softcapping is not supported (Gemma 2's attention soft-capping)")
    layers = int(cfg["num_hidden_layers"])
    layer_types = cfg.get("layer_types") or layer_types_for(layers, int(cfg.get("sliding_window_pattern")
                                                                        or SLIDING_WINDOW_PATTERN))
    fields: dict[str, Any] = {
        "sliding_window": int(cfg.get("sliding_window") or 4096),
        "layer_types": list(layer_types),
        "query_pre_attn_scalar": float(cfg.get("query_pre_attn_scalar") or 256),
        "final_logit_softcapping": cfg.get("final_logit_softcapping"),
        "hidden_act": cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh",
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True)),
        # The window is applied per layer, so the whole trained context is usable.
        "max_position_embeddings": int(cfg.get("max_position_embeddings") or 131072),
        "head_dim": int(cfg.get("head_dim") or 256),
    }
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "sliding_attention" in params:
        local, full = params.get("sliding_attention") or {}, params.get("full_attention") or {}
        fields["rope_local_base_freq"] = float(local.get("rope_theta", 10000.0))
        fields["rope_theta"] = float(full.get("rope_theta", 1_000_000.0))
        kind = full.get("rope_type", "default")
        fields["rope_scaling"] = None if kind == "default" else {k: v for k, v in full.items() if k != "rope_theta"}
    else:
        fields["rope_local_base_freq"] = float(cfg.get("rope_local_base_freq", 10000.0))
        fields["rope_theta"] = float(cfg.get("rope_theta", 1_000_000.0))
        fields["rope_scaling"] = cfg.get("rope_scaling")
    return fields


def _gguf_fields(checkpoint: GGUFCheckpoint) -> dict[str, Any]:
    """llama.cpp's gemma3 metadata -> the Gemma 3 ModelConfig fields it does not share with Llama.

    The file stores the window but not the layer pattern or the local rope base, which llama.cpp
    (and transformers' GGUF loader) take as Gemma 3's fixed values. llama.cpp scales the 27B
    model's queries by (hidden / heads) ** -0.5 and every other size's by head_dim ** -0.5."""
    layers = int(checkpoint.meta("block_count"))
    heads = int(checkpoint.meta("attention.head_count"))
    hidden = int(checkpoint.meta("embedding_length"))
    head_dim = int(checkpoint.meta("attention.key_length", 256))
    if int(checkpoint.meta("attention.value_length", head_dim)) != head_dim:
        raise UnsupportedModelError(f"{checkpoint.path}: key and value head sizes differ; Gemma 3 has one head size")
    return {
        "sliding_window": int(checkpoint.meta("attention.sliding_window", 4096)),
        "layer_types": layer_types_for(layers),
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": float(hidden // heads if layers == 62 else head_dim),
        "final_logit_softcapping": checkpoint.meta("final_logit_softcapping"),
        "hidden_act": "gelu_pytorch_tanh",
    }


def _norm_from_gguf(hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
    """llama.cpp's converter stores Gemma's norm weights plus one; HF keeps the bare weight."""
    return tensor - 1.0 if hf_name.endswith("norm.weight") else tensor


GEMMA3_GGUF_LAYOUT = GGUFLayout(
    "gemma3", "gemma3", "Gemma3ForCausalLM",
    block_names={**LLAMA_BLOCK_NAMES,
                 "ffn_norm": "pre_feedforward_layernorm",
                 "post_attention_norm": "post_attention_layernorm",
                 "post_ffw_norm": "post_feedforward_layernorm"},
    config_fields=_gguf_fields,
    tensor_transform=_norm_from_gguf,
)
