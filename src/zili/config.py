"""Configuration dataclasses. Each validates itself on construction.

ModelConfig is the one place model shapes come from: it is built once from a checkpoint's
metadata (GGUF key/values or HF config.json) and every module reads its shapes from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Architectures zili can run, by the family name used in ModelConfig.architecture.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "deepseek_v2", "deepseek_v3")
ROUTER_SCORING_FUNCS = ("softmax", "sigmoid")
ROUTER_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


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
    # Multi-head Latent Attention (DeepSeek V2/V3); kv_lora_rank 0 means ordinary attention.
    q_lora_rank: int | None = None  # None: q is one projection, no low-rank factorisation
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # rotary pairs are (x0, x1), (x2, x3)... instead of halves
    # Mixture of Experts; n_routed_experts 0 means every layer is dense.
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0  # the first k layers keep a dense MLP
    moe_layer_freq: int = 1  # after those, every moe_layer_freq-th layer is MoE
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

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
        if self.n_routed_experts:
            self._validate_moe()

    def _validate_moe(self) -> None:
        checks = [
            (self.scoring_func in ROUTER_SCORING_FUNCS, f"scoring_func {self.scoring_func!r} is not supported; "
             f"supported: {', '.join(ROUTER_SCORING_FUNCS)}"),
            (self.topk_method in ROUTER_TOPK_METHODS, f"topk_method {self.topk_method!r} is not supported; "
             f"supported: {', '.join(ROUTER_TOPK_METHODS)}"),
            (0 < self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok must be in "
             f"[1, n_routed_experts={self.n_routed_experts}], got {self.num_experts_per_tok}"),
            (self.moe_intermediate_size > 0 and self.moe_layer_freq > 0,
             "moe_intermediate_size and moe_layer_freq must be positive"),
            (self.n_group > 0 and self.n_routed_experts % self.n_group == 0 and 0 < self.topk_group <= self.n_group,
             f"n_group ({self.n_group}) must divide n_routed_experts ({self.n_routed_experts}) and "
             f"topk_group ({self.topk_group}) must be in [1, n_group]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ModelConfig: {message}")

    @property
    def use_mla(self) -> bool:
        return self.kv_lora_rank > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's layer layout: dense for the first k layers, then MoE every moe_layer_freq-th."""
        return (self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Shape of one layer's paged KV cache tensor (keys and values per KV head).

        MLA stores one latent per token instead: the normalised compressed kv, then the roped key."""
        if self.use_mla:
            return (num_blocks, block_size, self.kv_lora_rank + self.qk_rope_head_dim)
        return (2, num_blocks, block_size, self.num_key_value_heads, self.head_dim)


DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATION_MODES = ("auto", "none", "int8", "int4")


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
    # Weights kept quantized in memory: "auto" follows a GGUF's own quantization; see
    # zili.models.quantize for the modes.
    quantization: str = "auto"
    threads: int | None = None  # CPU threads for the forward pass; None: the platform's default
    # Tensor parallelism: ranks (processes, one device each) the model is split across; see zili.distributed.
    tensor_parallel_size: int = 1
    distributed_timeout: float = 120.0  # seconds a collective may wait on another rank before failing
    # Attention implementation (zili.kernels.backends): "auto" = the tuned winner, else the platform's.
    attention_backend: str = "auto"
    # Read `zili tune`'s winners for this device (threads, backend, block size...) at start;
    # False keeps the defaults. Explicit settings above always win over tuned ones.
    use_tune_cache: bool = True
    # True: every step runs eagerly. False: decode-only steps run one compiled graph where the
    # set-up allows it (zili.engine.compiled_decode). None: False unless ZILI_ENFORCE_EAGER=1.
    enforce_eager: bool | None = None
    # "auto": read the checkpoint's weights. "dummy": seeded random weights on the checkpoint's
    # architecture (an HF config.json is enough), for speed runs on shapes not on the machine.
    load_format: str = "auto"
    # "mp" runs the tensor-parallel executor (process group, collectives) even at
    # tensor_parallel_size 1, to measure what that path costs; None: only when the size is above 1.
    distributed_executor_backend: str | None = None

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(f"EngineConfig.quantization must be one of {', '.join(QUANTIZATION_MODES)}, "
                             f"got {self.quantization!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"EngineConfig.threads must be a positive integer, got {self.threads!r}")
        if not isinstance(self.attention_backend, str) or not self.attention_backend:
            raise ValueError(f"EngineConfig.attention_backend must be a backend name or 'auto', "
                             f"got {self.attention_backend!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"EngineConfig.load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.distributed_executor_backend not in (None, "mp"):
            raise ValueError(f"EngineConfig.distributed_executor_backend must be None or 'mp', "
                             f"got {self.distributed_executor_backend!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"EngineConfig.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        timeout = self.distributed_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"EngineConfig.distributed_timeout must be positive seconds, got {timeout!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size"):
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
