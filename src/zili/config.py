"""Configuration dataclasses. Each validates itself on construction.

ModelConfig is the one place model shapes come from: it is built once from a checkpoint's
metadata (GGUF key/values or HF config.json) and every module reads its shapes from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Architectures zili can run, by the family name used in ModelConfig.architecture.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")


@dataclass
class ModelConfig:
    architecture: str  # family: "llama", "qwen2", "qwen3"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int = 0  # 0 means hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    # HF-style rope scaling dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm on per-head q and k (Qwen3)
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    # Name of the checkpoint architecture as it was declared (e.g. "LlamaForCausalLM").
    hf_architecture: str = ""

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"ModelConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"ModelConfig.hidden_act {self.hidden_act!r} is not supported; supported: silu")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class EngineConfig:
    """Engine options. Names follow vLLM's where they exist."""

    model: str | None = None  # path to a .gguf file, an HF checkpoint directory, or an alias
    dtype: str = "auto"
    max_model_len: int | None = None  # None: the model's context length
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    # KV pool size: bytes (int), a fraction of the device's free memory (float in (0, 1]), or None.
    kv_cache_memory: int | float | None = None
    enable_prefix_caching: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"EngineConfig.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"EngineConfig.max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        mem = self.kv_cache_memory
        if mem is not None:
            if isinstance(mem, bool) or not isinstance(mem, (int, float)):
                raise ValueError(f"EngineConfig.kv_cache_memory must be bytes (int) or a fraction (float), got {mem!r}")
            if isinstance(mem, float) and not 0 < mem <= 1:
                raise ValueError(f"EngineConfig.kv_cache_memory as a fraction must be in (0, 1], got {mem}")
            if isinstance(mem, int) and mem <= 0:
                raise ValueError(f"EngineConfig.kv_cache_memory must be positive, got {mem}")
