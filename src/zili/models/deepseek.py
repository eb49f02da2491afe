"""DeepSeek V2 / V3: Multi-head Latent Attention over a latent paged cache, and Mixture of Experts.

The decoder is Llama-shaped (pre-norm residual blocks); attention is `zili.layers.mla.MLAttention`
and the MLP of layer i is `zili.layers.moe.DeepseekMoE` when `config.is_moe_layer(i)`, else a dense
gated MLP. Each layer's KV cache is `[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]`
(`ModelConfig.kv_cache_shape`).

Differences between the two families, all read from ModelConfig (see `deepseek_config_fields`):
V2 rotates interleaved pairs and routes with softmax (greedy / group_limited_greedy); V3 may rotate
halves (`rope_interleave`), and routes with sigmoid + noaux_tc and a score-correction bias.

Checkpoint names are HF's, with routed experts one tensor per expert
(`mlp.experts.{e}.gate_proj.weight`, ...), as DeepSeek ships them and transformers saves them.
Layers past num_hidden_layers (V3's multi-token-prediction module) are skipped.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from zili.config import ModelConfig
from zili.kernels.attention import AttentionMetadata
from zili.layers.mla import MLA_FUSED_PROJECTIONS, MLAttention
from zili.layers.moe import DeepseekMoE, FusedExperts, GatedMLP
from zili.layers.norm import RMSNorm
from zili.layers.parallel import TensorParallel, lm_head, vocab_embedding
from zili.layers.rotary import RotaryEmbedding
from zili.models.base import CausalLM, Loader

# Fused module name -> the HF projection names it concatenates, in row order.
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {"gate_up_proj": ("gate_proj", "up_proj"), **MLA_FUSED_PROJECTIONS}
_EXPERT_LEAVES = ("gate_proj", "up_proj", "down_proj")
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")

# Family defaults for fields a config.json may leave out (DeepSeek's own configs, then HF's classes).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "v2": dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                        moe_intermediate_size=1407, first_k_dense_replace=0, scoring_func="softmax",
                        topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0),
    "v3": dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
                        moe_intermediate_size=2048, first_k_dense_replace=3, scoring_func="sigmoid",
                        topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5),
}


def deepseek_v2_hf_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields a DeepSeek-V2 config.json sets beyond the Llama-shaped ones."""
    return deepseek_config_fields(cfg, "v2")


def deepseek_v3_hf_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields a DeepSeek-V3 config.json sets beyond the Llama-shaped ones."""
    return deepseek_config_fields(cfg, "v3")


def deepseek_config_fields(cfg: dict[str, Any], version: str) -> dict[str, Any]:
    """The ModelConfig fields an HF DeepSeek config.json ("v2" or "v3") sets beyond the Llama-shaped ones."""
    defaults = _DEFAULTS[version]

    def get(key: str) -> Any:
        return cfg[key] if key in cfg else defaults[key]

    fields = {key: get(key) for key in defaults}
    fields["n_routed_experts"] = fields["n_routed_experts"] or 0  # None: a dense model
    fields["n_shared_experts"] = fields["n_shared_experts"] or 0
    fields["n_group"] = int(cfg.get("n_group") or 1)
    fields["topk_group"] = int(cfg.get("topk_group") or 1)
    fields["moe_layer_freq"] = int(cfg.get("moe_layer_freq") or 1)
    # V2 always rotates interleaved pairs; V3 says which.
    fields["rope_interleave"] = True if version == "v2" else bool(cfg.get("rope_interleave", True))
    # Keys and values are per attention head, expanded from the shared latent.
    fields["num_key_value_heads"] = int(cfg["num_attention_heads"])
    fields["head_dim"] = fields["qk_nope_head_dim"] + fields["qk_rope_head_dim"]
    return fields


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.self_attn = MLAttention(config, tp)
        self.mlp = DeepseekMoE(config, tp) if config.is_moe_layer(layer_idx) else GatedMLP(
            config.hidden_size, config.intermediate_size, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.embed_tokens = vocab_embedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(config, i, tp) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Only the qk_rope_head_dim part of each head is rotated.
        self.rotary_emb = RotaryEmbedding(config.qk_rope_head_dim, config.max_position_embeddings,
                                          config.rope_theta, config.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, H]
        cos, sin = self.rotary_emb(positions, x.dtype)  # [T, d_rope/2] each
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, kv_cache, meta)
        return self.norm(x)


class DeepseekForCausalLM(CausalLM):
    family = "DeepSeek"
    # Absorbed MLA decode reshapes kv_b_proj's weight into per-head factors (zili.layers.mla).
    dense_weight_readers = ("lm_head", "kv_b_proj")
    fused_projections = FUSED_PROJECTIONS

    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None) -> None:
        """`tp`: this rank's place in a tensor-parallel group (None: the whole model on one device)."""
        super().__init__()
        if not config.use_mla:
            raise ValueError("DeepSeek models need kv_lora_rank > 0 (Multi-head Latent Attention)")
        self.config = config
        self.model = DeepseekModel(config, tp)
        self.lm_head = lm_head(config.hidden_size, config.vocab_size, tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _skipped(self, name: str) -> bool:
        layer = _LAYER_INDEX.match(name)
        if layer is not None and int(layer.group(1)) >= self.config.num_hidden_layers:
            return True  # multi-token-prediction layers, not used for decoding
        return super()._skipped(name)

    def _module_targets(self, module_name: str, module: nn.Module) -> dict[str, Loader] | None:
        if not isinstance(module, FusedExperts):
            return None
        return {f"{module_name}.{expert}.{hf_leaf}.weight": _expert_loader(module, expert, hf_leaf)
                for expert in range(module.num_experts) for hf_leaf in _EXPERT_LEAVES}


def _expert_loader(module: FusedExperts, expert: int, hf_leaf: str) -> Loader:
    # Experts outside the module's expert_range (another expert-parallel rank's) are skipped.
    return lambda t: module.load_expert(expert, hf_leaf, t)
