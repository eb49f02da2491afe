"""HF config.json (a dict) -> ModelConfig, for the Llama-shaped families zili runs."""

from __future__ import annotations

from typing import Any

from zili.config import ModelConfig
from zili.layers.rotary import SUPPORTED_ROPE_TYPES

# HF architecture name -> ModelConfig.architecture family. Mistral is Llama-shaped.
HF_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
# Used when config.json leaves max_position_embeddings out (the HF config class defaults).
_DEFAULT_MAX_POSITIONS = {"LlamaForCausalLM": 2048, "MistralForCausalLM": 4096 * 32,
                          "Qwen2ForCausalLM": 32768, "Qwen3ForCausalLM": 32768,
                          "DeepseekV2ForCausalLM": 2048, "DeepseekV3ForCausalLM": 4096}


def model_config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    hf_arch = _hf_architecture(cfg)
    family = HF_ARCHITECTURES[hf_arch]
    if cfg.get("mlp_bias"):
        raise ValueError(f"{hf_arch} with mlp_bias=true is not supported")
    trained_positions = int(cfg.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[hf_arch])
    max_positions = trained_positions
    window = _sliding_window(cfg, hf_arch)
    if window is not None:
        # Sliding-window attention equals full attention over sequences no longer than the window,
        # so the model is exact up to that length.
        max_positions = min(max_positions, window)
    rope_theta, rope_scaling = _rope(cfg, trained_positions)
    eos = cfg.get("eos_token_id")
    fields = dict(
        architecture=family,
        hidden_size=_required(cfg, "hidden_size"),
        intermediate_size=_required(cfg, "intermediate_size"),
        num_hidden_layers=_required(cfg, "num_hidden_layers"),
        num_attention_heads=_required(cfg, "num_attention_heads"),
        num_key_value_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        vocab_size=_required(cfg, "vocab_size"),
        head_dim=int(cfg.get("head_dim") or 0),
        max_position_embeddings=max_positions,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v bias; Llama and Qwen3 have it (and on o_proj) when attention_bias.
        attention_bias=True if family == "qwen2" else bool(cfg.get("attention_bias", False)),
        qk_norm=family == "qwen3",
        hidden_act=_activation(cfg),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
        pad_token_id=cfg.get("pad_token_id"),
        hf_architecture=hf_arch,
    )
    if family.startswith("deepseek"):
        from zili.models.deepseek import deepseek_config_fields

        fields.update(deepseek_config_fields(cfg, family))
    return ModelConfig(**fields)


def _hf_architecture(cfg: dict[str, Any]) -> str:
    names = list(cfg.get("architectures") or [])
    if not names and cfg.get("model_type") in _MODEL_TYPES:
        names = [_MODEL_TYPES[cfg["model_type"]]]
    for name in names:
        if name in HF_ARCHITECTURES:
            return name
    asked = ", ".join(names) or f"model_type {cfg.get('model_type')!r}"
    raise ValueError(f"architecture {asked} is not supported; supported: {', '.join(HF_ARCHITECTURES)}")


def _required(cfg: dict[str, Any], key: str) -> int:
    if cfg.get(key) is None:
        raise ValueError(f"config.json lacks {key!r}")
    return int(cfg[key])


def _activation(cfg: dict[str, Any]) -> str:
    act = cfg.get("hidden_act", "silu")
    return "silu" if act == "swish" else act


def _sliding_window(cfg: dict[str, Any], hf_arch: str) -> int | None:
    """The attention window if any layer uses one, else None."""
    window = cfg.get("sliding_window")
    if window is None:
        return None
    if hf_arch == "MistralForCausalLM":
        return int(window)
    if hf_arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        layer_types = cfg.get("layer_types")
        if layer_types is not None:
            return int(window) if "sliding_attention" in layer_types else None
        if cfg.get("use_sliding_window") and cfg.get("max_window_layers", 28) < cfg.get("num_hidden_layers", 0):
            return int(window)
    return None


def _rope(cfg: dict[str, Any], max_positions: int) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, HF-style scaling dict or None) from either transformers 4's `rope_theta` +
    `rope_scaling` or transformers 5's `rope_parameters`."""
    params = dict(cfg.get("rope_parameters") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        # Per-layer-type parameters (transformers 5): fine when every layer type agrees.
        distinct = {tuple(sorted(v.items())) for v in params.values()}
        if len(distinct) != 1:
            raise ValueError(f"per-layer rope parameters are not supported: {params}")
        params = dict(next(iter(params.values())))
    merged = {**(cfg.get("rope_scaling") or {}), **params}
    theta = float(merged.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0)
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    partial = merged.pop("partial_rotary_factor", None) or cfg.get("partial_rotary_factor") or 1.0
    if float(partial) != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    if rope_type in ("llama3", "yarn"):
        merged.setdefault("original_max_position_embeddings",
                          cfg.get("original_max_position_embeddings") or max_positions)
    return theta, {"rope_type": rope_type, **merged}
