"""HF config.json (a dict) -> ModelConfig, through the family table (zili.models.registry).

The Llama-shaped fields are read here for every family; an entry adds its fixed overrides
(`hf_overrides`) and its own fields (`hf_fields`, defined in its model file).
"""

from __future__ import annotations

from typing import Any

from zili.config import ModelConfig
from zili.layers.rotary import SUPPORTED_ROPE_TYPES
from zili.models.registry import hf_family


def model_config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """ModelConfig for a config.json dict. ValueError naming the unsupported architecture (with the
    supported HF and GGUF ones), a missing key, or an unsupported setting."""
    entry, hf_arch = hf_family(cfg)
    if cfg.get("mlp_bias"):
        raise ValueError(f"{hf_arch.name} with mlp_bias=true is not supported")
    trained_positions = int(cfg.get("max_position_embeddings") or hf_arch.default_max_positions)
    max_positions = trained_positions
    window = _sliding_window(cfg)
    rope_theta, rope_scaling = _rope(cfg, trained_positions)
    eos = cfg.get("eos_token_id")
    attention_bias = bool(cfg.get("attention_bias", False))
    fields: dict[str, Any] = dict(
        architecture=entry.name,
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
        # attention_bias (HF's LlamaAttention) puts a bias on q/k/v and on o_proj.
        attention_bias=attention_bias,
        o_proj_bias=attention_bias,
        hidden_act=_activation(cfg),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
        pad_token_id=cfg.get("pad_token_id"),
        hf_architecture=hf_arch.name,
        sliding_window=window,
        layer_types=_layer_types(cfg, window),
    )
    fields.update(entry.hf_overrides)
    if entry.hf_fields is not None:
        fields.update(entry.hf_fields(cfg))
    return ModelConfig(**fields)


def _required(cfg: dict[str, Any], key: str) -> int:
    if cfg.get(key) is None:
        raise ValueError(f"config.json lacks {key!r}")
    return int(cfg[key])


def _activation(cfg: dict[str, Any]) -> str:
    act = cfg.get("hidden_act", "silu")
    return "silu" if act == "swish" else act


def _sliding_window(cfg: dict[str, Any]) -> int | None:
    """The attention window if any layer uses one, else None.

    HF's conventions: `layer_types` lists "sliding_attention" layers (transformers 5); Qwen2/3
    configs carry `use_sliding_window` (off by default) and slide only above `max_window_layers`;
    a config with a `sliding_window` and neither (Mistral) slides every layer."""
    window = cfg.get("sliding_window")
    if window is None:
        return None
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        return int(window) if "sliding_attention" in layer_types else None
    if "use_sliding_window" in cfg or "max_window_layers" in cfg:
        if cfg.get("use_sliding_window") and cfg.get("max_window_layers", 28) < cfg.get("num_hidden_layers", 0):
            return int(window)
        return None
    return int(window)


def _layer_types(cfg: dict[str, Any], window: int | None) -> list[str]:
    """Which layers slide: config.json's `layer_types`; Qwen2/3's layers from `max_window_layers` on
    (transformers' rule); [] (every layer) for a Mistral-style config or when nothing slides."""
    if window is None:
        return []
    if cfg.get("layer_types") is not None:
        return list(cfg["layer_types"])
    if "max_window_layers" in cfg:
        first = int(cfg["max_window_layers"])
        return ["sliding_attention" if i >= first else "full_attention" for i in range(int(cfg["num_hidden_layers"]))]
    return []


def _rope(cfg: dict[str, Any], max_positions: int) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, HF-style scaling dict or None) from either transformers 4's `rope_theta` +
    `rope_scaling` or transformers 5's `rope_parameters`."""
    params = dict(cfg.get("rope_parameters") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        # Per-layer-type parameters (transformers 5): fine when every layer type agrees.
        distinct = {tuple(sorted(v.items())) for v in params.values()}
        if len(distinct) == 1:
            params = dict(next(iter(params.values())))
        elif "full_attention" in params and cfg.get("layer_types"):
            # Gemma 3: the global layers' rope here; the family's hf_fields reads the local layers'.
            params = dict(params["full_attention"])
        else:
            raise ValueError(f"per-layer rope parameters are not supported: {params}")
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
