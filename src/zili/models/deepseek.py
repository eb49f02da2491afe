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
Layers past num_hidden_layers (V3's multi-token-prediction module, `num_nextn_predict_layers`) are
skipped by `DeepseekForCausalLM`; `DeepseekMTP` loads them on their own (speculative decoding's
"mtp" proposer).

GGUF files (llama.cpp's "deepseek2" architecture, both V2 and V3) are read through
`DEEPSEEK2_GGUF_LAYOUT`: llama.cpp's names map to HF's, two of its layouts are undone at loading
(`DeepseekForCausalLM.load_weights`): routed experts stacked in one tensor per projection
(`ffn_{gate,up,down}_exps`, [E, out, in]), and `kv_b_proj` split into a transposed key half
`attn_k_b` [H, kv_lora_rank, qk_nope_head_dim] and a value half `attn_v_b` [H, v_head_dim,
kv_lora_rank] (what its absorbed MLA wants; older files keep the merged `attn_kv_b`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any, cast

import torch
from torch import nn

from zili.config import ModelConfig
from zili.kernels.attention import AttentionMetadata
from zili.layers.linear import Linear
from zili.layers.mla import MLA_FUSED_PROJECTIONS, MLAttention
from zili.layers.moe import DeepseekMoE, FusedExperts, GatedMLP
from zili.layers.norm import RMSNorm
from zili.layers.parallel import TensorParallel, lm_head, vocab_embedding
from zili.layers.rotary import RotaryEmbedding
from zili.models.base import CausalLM, Loader
from zili.weights.errors import UnsupportedModelError
from zili.weights.gguf import GGUFCheckpoint, GGUFLayout

# Fused module name -> the HF projection names it concatenates, in row order.
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {"gate_up_proj": ("gate_proj", "up_proj"), **MLA_FUSED_PROJECTIONS}
_EXPERT_LEAVES = ("gate_proj", "up_proj", "down_proj")
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")
# Names the GGUF layout gives llama.cpp's stacked experts and split kv_b (not HF names: the model's
# load_weights turns them into HF's per-expert tensors and merged kv_b_proj).
_STACKED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.weight$")
_SPLIT_KV_B = re.compile(r"^(model\.layers\.\d+\.self_attn)\.(k_b_proj|v_b_proj)\.weight$")

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
    fields["num_nextn_predict_layers"] = int(cfg.get("num_nextn_predict_layers") or 0)
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

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """HF-named tensors in, as `CausalLM.load_weights`; llama.cpp's stacked experts and split
        kv_b (see the module docstring) are accepted too and converted on the way."""
        super().load_weights(self._hf_layout(weights))

    def _hf_layout(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Stacked experts [E, out, in] -> one tensor per expert; k_b [H, r, d_nope] + v_b [H, d_v, r]
        -> kv_b_proj [H * (d_nope + d_v), r] (per head: the key rows, then the value rows, as HF)."""
        halves: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in weights:
            stacked = _STACKED_EXPERTS.match(name)
            if stacked is not None:
                prefix, leaf = stacked.groups()
                for expert, weight in enumerate(tensor.unbind(0)):
                    yield f"{prefix}.{expert}.{leaf}.weight", weight
                continue
            split = _SPLIT_KV_B.match(name)
            if split is None:
                yield name, tensor
                continue
            prefix, leaf = split.groups()
            pair = halves.setdefault(prefix, {})
            pair[leaf] = tensor
            if len(pair) == 2:
                yield f"{prefix}.kv_b_proj.weight", merge_kv_b(pair.pop("k_b_proj"), pair.pop("v_b_proj"))
                del halves[prefix]
        if halves:
            raise ValueError(f"checkpoint has only one half of kv_b (attn_k_b / attn_v_b) in {sorted(halves)}")

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


class DeepseekMTPLayer(DeepseekDecoderLayer):
    """One multi-token-prediction module of DeepSeek-V3 (DeepSeek-AI 2024, "DeepSeek-V3 Technical
    Report", section 2.2, eqs. 21-23): from the main model's hidden state h_i at position i and the
    embedding of token t_{i+1}, a decoder block predicts t_{i+2}:

        h'_i = eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)])      (the checkpoint's order: embedding first)
        h''_i = DecoderBlock(h'_i)  (MLA over its own KV cache, at position i; MoE or dense MLP)
        logits = shared_head.head(shared_head.norm(h''_i))

    HF checkpoints store it as layer num_hidden_layers (+ k for depth k): the block's usual tensors
    plus enorm, hnorm, eh_proj and shared_head.{norm,head}. h_i is the main model's output after its
    final norm (what `DeepseekModel.forward` returns), as vLLM's and SGLang's MTP take it; the row at
    position 0 gets a zero embedding (`DeepseekMTP.forward`)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        hidden = config.hidden_size
        self.enorm = RMSNorm(hidden, config.rms_norm_eps)
        self.hnorm = RMSNorm(hidden, config.rms_norm_eps)
        self.eh_proj = Linear(2 * hidden, hidden)
        self.shared_head = _SharedHead(hidden, config)

    def predict(self, previous_hidden: torch.Tensor, embeds: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """previous_hidden, embeds [T, H] -> the block's output h'' [T, H] (before the shared head's norm)."""
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(previous_hidden)], dim=-1))
        return self.forward(x, cos, sin, kv_cache, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """h'' [T, H] -> float32 logits [T, vocab]."""
        return self.shared_head.head(self.shared_head.norm(hidden)).float()


class _SharedHead(nn.Module):
    """An MTP layer's output norm and LM head (HF names `shared_head.norm`, `shared_head.head`)."""

    def __init__(self, hidden: int, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.head = Linear(hidden, config.vocab_size)


class DeepseekMTP(CausalLM):
    """A DeepSeek-V3 checkpoint's multi-token-prediction layers (`num_nextn_predict_layers` of them),
    loaded beside the main model: `load_weights` takes the checkpoint's tensors (read only those
    `wants` accepts: layers >= num_hidden_layers) and reuses the main model's token embedding, as the report's
    shared embedding (the checkpoint's per-layer copy, `embed_tokens`, is skipped). Each layer has its
    own MLA KV cache (`ModelConfig.kv_cache_shape`, one layer's worth). ValueError when the config has
    no MTP layer."""

    family = "DeepSeek MTP"
    fused_projections = FUSED_PROJECTIONS
    dense_weight_readers = ("head", "kv_b_proj")

    def __init__(self, config: ModelConfig, embed_tokens: nn.Module, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError("num_nextn_predict_layers must be >= 1 for DeepSeek MTP (the checkpoint has none)")
        self.config = config
        self.num_layers = num_layers
        self.layers = nn.ModuleList(DeepseekMTPLayer(config, config.num_hidden_layers + k) for k in range(num_layers))
        self.rotary_emb = RotaryEmbedding(config.qk_rope_head_dim, config.max_position_embeddings,
                                          config.rope_theta, config.rope_scaling)
        self._embed = [embed_tokens]  # the main model's, not a submodule: not loaded, not counted twice

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, previous_hidden: torch.Tensor | None = None,
                depth: int = 0) -> torch.Tensor:
        """Layer `depth` on rows (h_i, t_{i+1}) at positions i: input_ids [T] are the next tokens,
        previous_hidden [T, H] the main model's final hidden states (depth 0) or the previous
        depth's outputs; kv_caches[depth] is this layer's cache. Returns h'' [T, H]."""
        assert previous_hidden is not None, "DeepseekMTP needs the main model's hidden states"
        # The row at position 0 gets no token embedding, as vLLM's and SGLang's DeepSeek MTP do for the
        # released checkpoints (the MTP module was trained on a shifted sequence that has none there).
        embeds = self._embed[0](input_ids).masked_fill((positions == 0).unsqueeze(-1), 0.0)
        cos, sin = self.rotary_emb(positions, embeds.dtype)
        return self._layer(depth).predict(previous_hidden, embeds, cos, sin, kv_caches[depth], attn_metadata)

    def compute_logits(self, hidden: torch.Tensor, depth: int = 0) -> torch.Tensor:
        return self._layer(depth).compute_logits(hidden)

    def _layer(self, depth: int) -> DeepseekMTPLayer:
        return cast(DeepseekMTPLayer, self.layers[depth])

    def wants(self, name: str) -> bool:
        """Whether checkpoint tensor `name` (HF name) belongs to these MTP layers: the filter to pass as
        the checkpoint's `tensors(keep=...)`, so that the main model's tensors are not read again."""
        layer = _LAYER_INDEX.match(name)
        first = self.config.num_hidden_layers
        return layer is not None and first <= int(layer.group(1)) < first + self.num_layers and \
            not name.startswith("embed_tokens.", layer.end())  # the main model's is shared

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Checkpoint tensors in (HF names; all of them, or only those `wants` accepts);
        `model.layers.{num_hidden_layers + k}.*` load into layer k, the rest (and the layers' copies of
        the embedding) are skipped. ValueError for a missing or mis-shaped MTP tensor."""
        first = self.config.num_hidden_layers

        def mtp_only() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in DeepseekForCausalLM._hf_layout(self, weights):  # type: ignore[arg-type]
                if not self.wants(name):
                    continue
                layer = _LAYER_INDEX.match(name)
                assert layer is not None
                yield f"layers.{int(layer.group(1)) - first}.{name[layer.end():]}", tensor

        super().load_weights(mtp_only())

    def _module_targets(self, module_name: str, module: nn.Module) -> dict[str, Loader] | None:
        return DeepseekForCausalLM._module_targets(self, module_name, module)  # type: ignore[arg-type]


def _expert_loader(module: FusedExperts, expert: int, hf_leaf: str) -> Loader:
    # Experts outside the module's expert_range (another expert-parallel rank's) are skipped.
    return lambda t: module.load_expert(expert, hf_leaf, t)


def merge_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """llama.cpp's split kv_b back into HF's kv_b_proj weight.

    k_b [H, kv_lora_rank, qk_nope_head_dim] (the key half, transposed), v_b [H, v_head_dim,
    kv_lora_rank] -> [H * (qk_nope_head_dim + v_head_dim), kv_lora_rank]. ValueError on shapes that
    do not pair up."""
    if k_b.dim() != 3 or v_b.dim() != 3 or k_b.shape[0] != v_b.shape[0] or k_b.shape[1] != v_b.shape[2]:
        raise ValueError(f"attn_k_b {list(k_b.shape)} and attn_v_b {list(v_b.shape)} are not the two halves "
                         "of one kv_b ([H, r, d_nope] and [H, d_v, r])")
    return torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(-1, k_b.shape[1]).contiguous()


# llama.cpp's tensor names for DeepSeek V2/V3 blocks (gguf-py MODEL_ARCH.DEEPSEEK2) -> HF names.
# The stacked experts and the split kv_b halves get names load_weights converts (see above).
DEEPSEEK2_BLOCK_NAMES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "attn_k_b": "self_attn.k_b_proj",
    "attn_v_b": "self_attn.v_b_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}
# llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE values (`deepseek2.expert_gating_func`); files written
# before the key existed are V2 files, which route with softmax.
_GATING_FUNCS = {1: "softmax", 2: "sigmoid"}


def deepseek2_gguf_fields(checkpoint: GGUFCheckpoint) -> dict[str, Any]:
    """ModelConfig fields of a llama.cpp "deepseek2" GGUF, over the Llama-shaped ones.

    Metadata read (keys under `deepseek2.`): attention.head_count, attention.kv_lora_rank,
    attention.q_lora_rank (absent: q is one projection), rope.dimension_count (qk_rope_head_dim),
    attention.key_length_mla / value_length_mla (qk head dim, v head dim; files written before those
    keys carry them in key_length / value_length, and head_count_kv = head_count rather than 1),
    expert_count, expert_used_count, expert_shared_count, expert_feed_forward_length,
    leading_dense_block_count, expert_gating_func, expert_weights_norm, expert_weights_scale,
    expert_group_count / expert_group_used_count, and rope.scaling.yarn_log_multiplier
    (0.1 * mscale_all_dim; llama.cpp keeps no separate mscale, so mscale = mscale_all_dim, which is
    what DeepSeek's own V2/V3 configs have). An exp_probs_b tensor means noaux_tc routing (V3)."""
    meta, tensors = checkpoint.meta, checkpoint.header.tensors
    heads = int(meta("attention.head_count"))
    rope_dim = int(meta("rope.dimension_count"))
    mla_keys = meta("attention.key_length_mla") is not None
    qk_dim = int(meta("attention.key_length_mla") if mla_keys else meta("attention.key_length"))
    v_dim = int(meta("attention.value_length_mla") if mla_keys else meta("attention.value_length"))
    kv_lora = meta("attention.kv_lora_rank")
    if kv_lora is None or qk_dim <= rope_dim:
        raise UnsupportedModelError(
            f"{checkpoint.path}: a deepseek2 file needs attention.kv_lora_rank and a key length above "
            f"rope.dimension_count (got kv_lora_rank {kv_lora}, key length {qk_dim}, rope {rope_dim}).")
    q_lora = meta("attention.q_lora_rank")
    gating = int(meta("expert_gating_func", 1))
    if gating not in _GATING_FUNCS:
        raise UnsupportedModelError(f"{checkpoint.path}: deepseek2.expert_gating_func {gating} is not supported; "
                                    f"supported: {', '.join(f'{k} ({v})' for k, v in _GATING_FUNCS.items())}.")
    bias = any(name.endswith(".exp_probs_b.bias") for name in tensors)
    n_group = int(meta("expert_group_count", 1) or 1)
    v3 = bias or gating == 2
    fields: dict[str, Any] = dict(
        num_key_value_heads=heads,  # keys and values are per head, expanded from the shared latent
        head_dim=qk_dim,
        q_lora_rank=int(q_lora) if q_lora else None,
        kv_lora_rank=int(kv_lora),
        qk_nope_head_dim=qk_dim - rope_dim,
        qk_rope_head_dim=rope_dim,
        v_head_dim=v_dim,
        rope_interleave=True,  # llama.cpp keeps DeepSeek's interleaved rotary pairs (its NORM rope)
        n_routed_experts=int(meta("expert_count", 0) or 0),
        n_shared_experts=int(meta("expert_shared_count", 0) or 0),
        num_experts_per_tok=int(meta("expert_used_count", 0) or 0),
        moe_intermediate_size=int(meta("expert_feed_forward_length", 0) or 0),
        first_k_dense_replace=int(meta("leading_dense_block_count", 0) or 0),
        scoring_func=_GATING_FUNCS[gating],
        topk_method="noaux_tc" if bias else "group_limited_greedy" if n_group > 1 else "greedy",
        n_group=n_group,
        topk_group=int(meta("expert_group_used_count", 1) or 1),
        norm_topk_prob=bool(meta("expert_weights_norm", False)),
        routed_scaling_factor=float(meta("expert_weights_scale", 1.0) or 1.0),
        attention_bias="blk.0.attn_kv_a_mqa.bias" in tensors,
        o_proj_bias="blk.0.attn_output.bias" in tensors,
        architecture="deepseek_v3" if v3 else "deepseek_v2",
        hf_architecture="DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM",
    )
    log_mul = meta("rope.scaling.yarn_log_multiplier")
    scaling = checkpoint.rope_scaling(rope_dim)
    if scaling is not None and scaling.get("rope_type") == "yarn" and log_mul:
        mscale_all_dim = float(log_mul) / 0.1
        scaling = {**scaling, "mscale": mscale_all_dim, "mscale_all_dim": mscale_all_dim}
    fields["rope_scaling"] = scaling
    return fields


DEEPSEEK2_GGUF_LAYOUT = GGUFLayout("deepseek2", "deepseek_v2", "DeepseekV2ForCausalLM",
                                   block_names=DEEPSEEK2_BLOCK_NAMES, config_fields=deepseek2_gguf_fields)
