"""The names EngineConfig's enumerated settings take (dtype, kv_cache_dtype, load_format, quantization).

They live apart from zili.config, which needs torch, so that the command line can list them in its
options' help (zili.cli_options) without importing torch: `zili --help`, `zili models` and
`zili keys` start in a fraction of a second. zili.config validates against these same tuples.
"""

from __future__ import annotations

# Weights and activations dtypes: "auto" (the platform's choice for the checkpoint), then the canonical
# floating-point names (zili.config.normalize_dtype maps the aliases users write onto them).
DTYPES = ("auto", "float32", "bfloat16", "float16")

# KV cache element types (vLLM's `kv_cache_dtype` names). "auto": the model's dtype, except bf16 rows under
# an automatic fp32 dtype on a CPU without native bf16 (zili.config.kv_cache_torch_dtype). int8 and fp8_e4m3
# are quantized per token and KV head: each cache row holds head_dim one-byte elements, then its
# bfloat16 scale (absmax / 127 for int8, absmax / 448 for fp8_e4m3); see zili.kernels.kv_quant.
KV_CACHE_DTYPES = ("auto", "bfloat16", "int8", "fp8_e4m3")

# How checkpoints are read: "auto" reads the weights; "dummy" (vLLM's name) fills seeded random
# weights on the checkpoint's architecture.
LOAD_FORMATS = ("auto", "dummy")

# Weights kept quantized in memory; "auto" follows the checkpoint (a GGUF's quantized tensors).
QUANTIZATION_MODES = ("auto", "none", "int8", "int4")

# What jump-forward structured decoding does with the text a grammar forces (zili.engine.jump_forward):
# "verify" proposes it as speculative drafts the model verifies (greedy output is decoding's without
# jump-forward: bit for bit with batch-invariant kernels, deterministic=True; otherwise the verify rows
# enlarge the batch, so a near-tie can flip as with any batching); "append" appends the tokenizer's
# spelling of it unverified.
JUMP_FORWARD_MODES = ("verify", "append")
