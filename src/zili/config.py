"""Configuration dataclasses. Each validates itself on construction.

ModelConfig is the one place model shapes come from: it is built once from a checkpoint's
metadata (GGUF key/values or HF config.json) and every module reads its shapes from it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from zili.choices import DTYPES, JUMP_FORWARD_MODES, KV_CACHE_DTYPES, LOAD_FORMATS, QUANTIZATION_MODES

# Reasoning parsers (zili.reasoning): how a reasoning model's thinking is delimited in its output.
REASONING_PARSERS = ("auto", "deepseek-r1", "qwen3", "none")
ROUTER_SCORING_FUNCS = ("softmax", "sigmoid")
# MLP activations: SwiGLU's silu (Llama, Qwen, DeepSeek) and GeGLU's tanh-approximated gelu (Gemma).
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")
ROUTER_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass
class ModelConfig:
    architecture: str  # the model family's name in zili.models.registry
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
    o_proj_bias: bool | None = None  # bias on the output projection; None: same as attention_bias
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
    # DeepSeek-V3's multi-token-prediction modules stored after the decoder layers (HF config.json's
    # `num_nextn_predict_layers`; 0: none). They do not decode; speculative method "deepseek_mtp" drafts with them.
    num_nextn_predict_layers: int = 0
    # Sliding-window attention (Mistral, Gemma 2/3): a sliding layer attends to the last
    # `sliding_window` positions only. `layer_types` names each layer "sliding_attention" or
    # "full_attention" (HF's field); empty: every layer slides when sliding_window is set.
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)
    rope_local_base_freq: float | None = None  # rope theta of sliding layers (Gemma 3); None: rope_theta
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (Gemma); None: head_dim
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap) when set

    def __post_init__(self) -> None:
        # Which architectures exist is the model-family table's business (zili.models.registry).
        if not isinstance(self.architecture, str) or not self.architecture:
            raise ValueError(f"ModelConfig.architecture must be a family name, got {self.architecture!r}")
        if self.o_proj_bias is None:
            self.o_proj_bias = self.attention_bias
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
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"ModelConfig.hidden_act {self.hidden_act!r} is not supported; "
                             f"supported: {', '.join(HIDDEN_ACTS)}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"ModelConfig.sliding_window must be positive, got {self.sliding_window}")
        if self.layer_types and (len(self.layer_types) != self.num_hidden_layers
                                 or set(self.layer_types) - {"sliding_attention", "full_attention"}):
            raise ValueError(f"ModelConfig.layer_types must name each of the {self.num_hidden_layers} layers "
                             f"'sliding_attention' or 'full_attention', got {self.layer_types}")
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

    def layer_window(self, layer_idx: int) -> int | None:
        """The attention window of layer `layer_idx`, None when it attends to the whole context."""
        if self.sliding_window is None:
            return None
        if self.layer_types and self.layer_types[layer_idx] != "sliding_attention":
            return None
        return self.sliding_window

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's layer layout: dense for the first k layers, then MoE every moe_layer_freq-th."""
        return (self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    def kv_cache_shape(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None,
                       row_align: int = 1) -> tuple[int, ...]:
        """Shape of one layer's paged KV cache tensor (keys and values per KV head).

        MLA stores one latent per token instead: the normalised compressed kv, then the roped key.
        A quantized `dtype` (int8, float8_e4m3fn; see KV_CACHE_DTYPES) widens each row by
        KV_SCALE_BYTES: the row's bfloat16 scale, stored behind its head_dim quantized elements; a
        latent row by two scales, one per part (zili.kernels.kv_quant).

        `row_align` > 1 gives the storage shape instead: a quantized per-head row padded to a multiple
        of that many bytes (AttentionBackend.kv_row_align: the GPU kernels load aligned 16-byte
        vectors, which 130-byte rows forbid). The runner allocates it and keeps a view of each row's
        first head_dim + KV_SCALE_BYTES bytes, so only the strides differ. Latent rows are not padded."""
        extra = KV_SCALE_BYTES if dtype in QUANTIZED_KV_DTYPES else 0
        if self.use_mla:
            return (num_blocks, block_size, self.kv_lora_rank + self.qk_rope_head_dim + 2 * extra)
        width = self.head_dim + extra
        if extra and row_align > 1:
            width = -(-width // row_align) * row_align
        return (2, num_blocks, block_size, self.num_key_value_heads, width)

    def kv_bytes_per_token(self, dtype: torch.dtype | str, row_align: int = 1) -> int:
        """Bytes of KV cache one token occupies across all layers, elements stored in `dtype` (a
        torch dtype or a name: float32, bf16, ..., or a quantized cache's int8 / fp8_e4m3).

        Standard attention keeps a key and a value per KV head (2 * kv_heads * head_dim per layer);
        MLA keeps one latent (kv_lora_rank + qk_rope_head_dim per layer, DeepSeek-V2 sec. 2.1). A
        quantized cache stores one byte per element plus a 2-byte scale per row (per token and head), rows
        padded to `row_align` bytes where a backend asks for it (kv_cache_shape)."""
        if isinstance(dtype, str):
            dtype = _QUANTIZED_KV_BY_NAME.get(dtype) or parse_dtype(dtype, "dtype")
        per_layer = math.prod(self.kv_cache_shape(1, 1, dtype, row_align))
        return per_layer * self.num_hidden_layers * torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------
# Parsers for user-given values (library, CLI and config alike). Each raises ValueError naming the
# field it was given.
# --------------------------------------------------------------------------------------------

STRUCTURED_OUTPUTS_BACKENDS = ("auto", "xgrammar", "llguidance")  # zili.structured.backend.BACKENDS
_QUANTIZED_KV_BY_NAME = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
QUANTIZED_KV_DTYPES = tuple(_QUANTIZED_KV_BY_NAME.values())
KV_SCALE_BYTES = 2


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype,
                         platform_default: torch.dtype | None = None) -> torch.dtype:
    """The element type of the KV cache tensors for an EngineConfig.kv_cache_dtype name (the one place
    that decides what "auto" means). "auto": `platform_default` where the platform chose the storage
    type (`Platform.default_kv_cache_dtype`, which zili.engine.builder.kv_cache_dtype asks when the
    model's dtype was "auto" too: bf16 rows for an fp32 model on a CPU without native bf16, such as
    AVX2), else the model's dtype. ValueError naming the field for an unknown name."""
    if kv_cache_dtype == "auto":
        return platform_default if platform_default is not None else model_dtype
    if kv_cache_dtype == "bfloat16":
        return torch.bfloat16
    if kv_cache_dtype in _QUANTIZED_KV_BY_NAME:
        return _QUANTIZED_KV_BY_NAME[kv_cache_dtype]
    raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")


# The aliases users write for the canonical dtype names (zili.choices.DTYPES).
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "float": "float32",
                  "bf16": "bfloat16",
                  "fp16": "float16", "f16": "float16", "half": "float16"}


def normalize_dtype(value: object, field: str = "dtype") -> str:
    """"auto" or a canonical dtype name (float32, bfloat16, float16) for a name, alias
    (bf16, fp16, half, fp32, float, "torch.bfloat16"...) or torch.dtype. ValueError naming `field`."""
    if isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
    elif isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        name = _DTYPE_ALIASES.get(name, name)
    else:
        name = ""
    if name in DTYPES:
        return name
    aliases = ", ".join(_DTYPE_ALIASES)
    raise ValueError(f"{field} {value!r} is not supported; supported: {', '.join(DTYPES)} (aliases: {aliases})")


def parse_dtype(value: object, field: str = "dtype") -> torch.dtype:
    """A concrete torch dtype for a name, alias or torch.dtype ("auto" is the caller's to resolve)."""
    name = normalize_dtype(value, field)
    if name == "auto":
        raise ValueError(f"{field}: 'auto' must be resolved by the platform before it becomes a torch dtype")
    return getattr(torch, name)


_MEMORY_SIZE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)$", re.IGNORECASE)


def parse_memory_size(value: object, field: str = "memory size") -> int | float:
    """A memory budget: bytes (int) or a fraction of free memory (float in (0, 1]).

    Accepts ints (bytes), floats (a fraction), and strings: "1073741824" (bytes), "0.5" (fraction),
    "512MiB" / "2GiB" / "2G" (binary units, 1024-based), "512MB" / "2GB" / "1kB" (decimal SI units).
    ValueError naming `field` for anything else, zero, negatives or fractions above 1."""
    if isinstance(value, bool):
        raise ValueError(f"{field} must be bytes or a fraction of free memory, got {value!r}")
    if isinstance(value, str):
        match = _MEMORY_SIZE.match(value.strip())
        if not match:
            raise ValueError(f"{field} must be bytes (e.g. 1073741824, 512MiB, 2GiB, 512MB) or a fraction of "
                             f"free memory (e.g. 0.5), got {value!r}")
        number, unit, binary, suffix = match.groups()
        if not (unit or binary or suffix):
            value = float(number) if "." in number else int(number)
        else:
            if binary and not (unit and suffix):
                raise ValueError(f"{field}: the unit in {value!r} is not one of K, M, G, T, KiB, MiB, GiB, TiB, "
                                 "kB, MB, GB, TB, B")
            base = 1000 if suffix and not binary else 1024
            value = int(float(number) * base ** "_kmgt".index(unit.lower() or "_"))
    if isinstance(value, float):
        if not math.isfinite(value) or not 0 < value <= 1:
            raise ValueError(f"{field} as a fraction of free memory must be in (0, 1], got {value!r}")
        return value
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{field} must be a positive number of bytes, got {value!r}")
        return value
    raise ValueError(f"{field} must be bytes (int or a size string) or a fraction (float), got {value!r}")


def check_load_format(value: object, field: str = "load_format") -> str:
    """`value` if it is one of LOAD_FORMATS; ValueError naming `field` otherwise."""
    if value not in LOAD_FORMATS:
        raise ValueError(f"{field} must be one of {', '.join(LOAD_FORMATS)}, got {value!r}")
    return value

# Speculative decoding (zili.engine.spec_decode): the proposal methods zili runs.
SPECULATIVE_METHODS = ("ngram", "draft_model", "deepseek_mtp")
# Other spellings of a method (vLLM's): "[ngram]" is its older name for ngram, "mtp" its newer name for the MTP methods.
SPECULATIVE_METHOD_ALIASES = {"[ngram]": "ngram", "mtp": "deepseek_mtp"}
DEFAULT_NUM_SPECULATIVE_TOKENS = 5  # what `--speculative-model` alone proposes a step


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding settings, named as vLLM's `speculative_config` names them.

    method "ngram": draftless prompt lookup (Saxena 2023, "Prompt Lookup Decoding"): the last n tokens
    of a sequence (n from prompt_lookup_max down to prompt_lookup_min) are looked up earlier in its own
    prompt and output, and the tokens that followed there are proposed, at most num_speculative_tokens
    a step. disable_by_batch_size: no proposals in steps where at least this many sequences run
    (None: always propose).

    method "draft_model": a smaller model of the same tokenizer (`model`: a path or alias) runs beside the
    target in the same process with its own KV cache and proposes num_speculative_tokens tokens a step
    greedily (Leviathan et al. 2023; vLLM's `draft_model`, `--speculative-model`).

    method "deepseek_mtp" (alias "mtp", as vLLM spells both): the target checkpoint's own
    multi-token-prediction layer (DeepSeek-V3 report, section 2.2; `num_nextn_predict_layers` >= 1)
    proposes num_speculative_tokens tokens a step from the target's last hidden state, reusing itself
    recursively past its one prediction depth (zili.engine.mtp).

    requests: which requests speculate, "all" or "structured" (only those with a structured output
    format: a JSON schema, a regex, a grammar; zili's own setting, which `SPECULATIVE_AUTO`, the engine's
    default, uses). Build it with `parse_speculative_config`, which names a bad field."""

    method: str = "ngram"
    num_speculative_tokens: int = 5
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    disable_by_batch_size: int | None = None
    model: str | None = None  # the draft model (method "draft_model")
    requests: str = "all"  # "all" or "structured" (SPECULATIVE_REQUESTS)


SPECULATIVE_REQUESTS = ("all", "structured")
# The engine's default ("auto"): n-gram speculation for structured-output requests only. Extraction-style
# requests copy names and numbers from their prompt (4-8x llama-server's tokens/s on the extraction workload,
# benchmarks/notes/extract-vs-llama.md); free chat keeps plain decoding unless asked. "off" (or None) turns it off.
SPECULATIVE_AUTO = SpeculativeConfig("ngram", 5, 4, 2, requests="structured")


def parse_speculative_config(value: object, field: str = "speculative_config") -> SpeculativeConfig | None:
    """A SpeculativeConfig from a dict, a JSON object string, a SpeculativeConfig, "auto"
    (`SPECULATIVE_AUTO`), or None / "off" (off).

    Follows vLLM: `num_speculative_tokens` is required; of prompt_lookup_min / max, one given sets
    the other, neither gives 5 and 5. ValueError naming `field.key` for an unknown key, a wrong type,
    an out-of-range value, or a key its method does not use (`model` with "ngram", prompt_lookup_*
    with another method)."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str) and value.strip().lower() in ("auto", "off", "none"):
        return SPECULATIVE_AUTO if value.strip().lower() == "auto" else None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{field} must be a JSON object, e.g. '{{\"method\": \"ngram\", "
                             f"\"num_speculative_tokens\": 5}}': {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be a JSON object (dict), got {type(value).__name__}")
    known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size",
             "model", "requests"}
    unknown = sorted(str(k) for k in value if k not in known)
    if unknown:
        raise ValueError(f"{field}.{unknown[0]} is not a known setting; known: {', '.join(sorted(known))}")
    model = value.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise ValueError(f"{field}.model must be a model path or alias (a non-empty string), got {model!r}")
    # As vLLM: a `model` without a method is a draft model.
    method = value.get("method", "ngram" if model is None else "draft_model")
    if isinstance(method, str):
        method = SPECULATIVE_METHOD_ALIASES.get(method, method)
    if method not in SPECULATIVE_METHODS:
        raise ValueError(f"{field}.method {method!r} is not supported; supported: {', '.join(SPECULATIVE_METHODS)}")
    if method == "draft_model" and model is None:
        raise ValueError(f"{field}.model is required for method 'draft_model' (the draft model's path or alias)")
    if method == "ngram" and model is not None:
        raise ValueError(f"{field}.model is not used by method 'ngram' (drafts come from the prompt); "
                         "use method 'draft_model'")
    if method == "deepseek_mtp" and model is not None:
        raise ValueError(f"{field}.model is not used by method 'deepseek_mtp' (the MTP layer is read from the "
                         "target's own checkpoint)")
    for key in ("prompt_lookup_min", "prompt_lookup_max"):
        if method != "ngram" and value.get(key) is not None:
            raise ValueError(f"{field}.{key} is used only by method 'ngram' (prompt lookup), not by {method!r}")

    def positive(key: str, default: int | None, limit: int = 64) -> int | None:
        v = value.get(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit:
            raise ValueError(f"{field}.{key} must be an integer in [1, {limit}], got {v!r}")
        return v

    if "num_speculative_tokens" not in value:
        raise ValueError(f"{field}.num_speculative_tokens is required (the most tokens proposed a step)")
    k = positive("num_speculative_tokens", None, 32)
    lo, hi = positive("prompt_lookup_min", None), positive("prompt_lookup_max", None)
    lo, hi = (lo or hi or 5), (hi or lo or 5)
    if lo > hi:
        raise ValueError(f"{field}.prompt_lookup_min ({lo}) must not exceed prompt_lookup_max ({hi})")
    batch = positive("disable_by_batch_size", None, 1 << 20)
    requests = value.get("requests", "all")
    if requests not in SPECULATIVE_REQUESTS:
        raise ValueError(f"{field}.requests must be one of {', '.join(SPECULATIVE_REQUESTS)}, got {requests!r}")
    return SpeculativeConfig(method, k, hi, lo, batch, model, requests)  # type: ignore[arg-type]


def _with_speculative_model(spec: SpeculativeConfig | None, model: object) -> SpeculativeConfig:
    """speculative_config with `speculative_model` (vLLM's shorthand) folded in; ValueError naming the field
    when it is not a string or contradicts speculative_config."""
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"EngineConfig.speculative_model must be a model path or alias, got {model!r}")
    if spec is None:
        return SpeculativeConfig("draft_model", DEFAULT_NUM_SPECULATIVE_TOKENS, model=model)
    if spec.method != "draft_model" or spec.model != model:
        raise ValueError(f"EngineConfig.speculative_model={model!r} contradicts speculative_config "
                         f"(method {spec.method!r}, model {spec.model!r}); give one of them")
    return spec


@dataclass
class EngineConfig:
    """Engine options. Names follow vLLM's where they exist."""

    model: str | None = None  # path to a .gguf file, an HF checkpoint directory, or an alias
    dtype: str = "auto"  # "auto" or a dtype name / alias (normalised to float32, bfloat16, float16)
    max_model_len: int | None = None  # None: the model's context length
    max_num_seqs: int = 64
    # Token budget of one step (chunked prefill); None: the platform's default for the model's dtype
    # (`Platform.default_max_num_batched_tokens`: 2048, 1024 on a CPU computing in float32).
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    # KV pool size: bytes (int), a fraction of the device's free memory (float in (0, 1]), a size
    # string ("2GiB", "512MB", "0.5"; see parse_memory_size), or None.
    kv_cache_memory: int | float | str | None = None
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
    # Layer shapes the tune cache has no packed-matmul choice for are measured at start (a few seconds,
    # bounded; zili.layers.quant_calibration) and cached; False keeps the defaults. None: ZILI_CALIBRATE.
    calibrate: bool | None = None
    # True: every step runs eagerly. False: decode-only steps run one compiled graph where the
    # set-up allows it (zili.engine.compiled_decode). None: False unless ZILI_ENFORCE_EAGER=1.
    enforce_eager: bool | None = None
    # "auto": read the checkpoint's weights. "dummy": seeded random weights on the checkpoint's
    # architecture (an HF config.json is enough), for speed runs on shapes not on the machine.
    load_format: str = "auto"
    # "mp" runs the tensor-parallel executor (process group, collectives) even at
    # tensor_parallel_size 1, to measure what that path costs; None: only when the size is above 1.
    distributed_executor_backend: str | None = None
    # Reasoning models (zili.reasoning): how the output's thinking is delimited, for thinking budgets
    # and for grammars that start after the thinking. "auto" decides from the chat template.
    reasoning_parser: str = "auto"
    # Speculative decoding (zili.engine.spec_decode), vLLM's `speculative_config`: a dict, a JSON object
    # string or a SpeculativeConfig, e.g. {"method": "ngram", "num_speculative_tokens": 5,
    # "prompt_lookup_max": 4, "prompt_lookup_min": 2}. None: off.
    # "auto" (the default): n-gram speculation for structured-output requests only (SPECULATIVE_AUTO);
    # None or "off": none.
    speculative_config: SpeculativeConfig | dict | str | None = "auto"
    # vLLM's shorthand for a draft model: the same as speculative_config {"method": "draft_model",
    # "model": speculative_model, "num_speculative_tokens": 5}.
    speculative_model: str | None = None
    # KV cache element type (vLLM's option): "auto" (the model's dtype, except bf16 rows under an
    # automatic fp32 dtype on a CPU without native bf16: `kv_cache_torch_dtype`), "bfloat16", or quantized
    # per token and KV head: "int8", "fp8_e4m3" (about half the bytes of bf16, so twice the tokens).
    kv_cache_dtype: str = "auto"
    # Jump-forward structured decoding (zili.engine.jump_forward): text a request's grammar forces comes
    # in one step. On by default: in the default "verify" mode its tokens are speculative drafts the model
    # verifies under the grammar mask, so greedy output is the same as without it, in fewer steps (bit
    # for bit under `deterministic`; otherwise the verify rows enlarge the batch, and a near-tie can flip
    # as with any batching).
    enable_jump_forward: bool = True
    # JUMP_FORWARD_MODES: "verify" (forced text as verified drafts, also with speculative_config off) or
    # "append" (the tokenizer's spelling appended unverified, SGLang's jump-forward). None: "verify" when
    # jump-forward is on (it stays None when off).
    jump_forward_mode: str | None = None
    # Batch-invariant kernels (vLLM's batch-invariant mode, SGLang's deterministic inference): a greedy
    # or seeded request gets the same tokens whatever else runs in its steps and however its prompt
    # was chunked or prefix-cached. Every matmul runs one kernel at a fixed row tile, every attention
    # row alone over its own context, the decode step eagerly (zili.engine.builder). Costs speed.
    deterministic: bool = False
    # The grammar library behind structured output (vLLM's `structured_outputs_config.backend`,
    # zili.structured.backend): "xgrammar", "llguidance", or "auto" (xgrammar, and llguidance for a
    # JSON schema xgrammar refuses).
    structured_outputs_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(f"EngineConfig.quantization must be one of {', '.join(QUANTIZATION_MODES)}, "
                             f"got {self.quantization!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"EngineConfig.threads must be a positive integer, got {self.threads!r}")
        if not isinstance(self.attention_backend, str) or not self.attention_backend:
            raise ValueError(f"EngineConfig.attention_backend must be a backend name or 'auto', "
                             f"got {self.attention_backend!r}")
        check_load_format(self.load_format, "EngineConfig.load_format")
        if self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"EngineConfig.reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, "
                             f"got {self.reasoning_parser!r}")
        if self.distributed_executor_backend not in (None, "mp"):
            raise ValueError(f"EngineConfig.distributed_executor_backend must be None or 'mp', "
                             f"got {self.distributed_executor_backend!r}")
        self.dtype = normalize_dtype(self.dtype, "EngineConfig.dtype")
        timeout = self.distributed_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"EngineConfig.distributed_timeout must be positive seconds, got {timeout!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size"):
            value = getattr(self, name)
            if value is None and name == "max_num_batched_tokens":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"EngineConfig.max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_memory_size(self.kv_cache_memory, "EngineConfig.kv_cache_memory")
        self.speculative_config = parse_speculative_config(self.speculative_config, "EngineConfig.speculative_config")
        if self.speculative_model is not None and self.speculative_config is SPECULATIVE_AUTO:
            self.speculative_config = None  # a draft model asked for replaces the default
        if self.speculative_model is not None:
            self.speculative_config = _with_speculative_model(self.speculative_config, self.speculative_model)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"EngineConfig.kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if not isinstance(self.enable_jump_forward, bool):
            raise ValueError(f"EngineConfig.enable_jump_forward must be true or false, got {self.enable_jump_forward!r}")
        if self.jump_forward_mode is not None and self.jump_forward_mode not in JUMP_FORWARD_MODES:
            raise ValueError(f"EngineConfig.jump_forward_mode must be one of {', '.join(JUMP_FORWARD_MODES)}, "
                             f"got {self.jump_forward_mode!r}")
        if self.jump_forward_mode is not None and not self.enable_jump_forward:
            raise ValueError(f"EngineConfig.jump_forward_mode={self.jump_forward_mode!r} needs enable_jump_forward "
                             "(it is off)")
        if self.jump_forward_mode is None and self.enable_jump_forward:
            self.jump_forward_mode = "verify"
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"EngineConfig.deterministic must be true or false, got {self.deterministic!r}")
        if self.structured_outputs_backend not in STRUCTURED_OUTPUTS_BACKENDS:
            raise ValueError(f"EngineConfig.structured_outputs_backend must be one of "
                             f"{', '.join(STRUCTURED_OUTPUTS_BACKENDS)}, got {self.structured_outputs_backend!r}")
