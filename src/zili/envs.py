"""Every `ZILI_*` environment variable zili reads, in one place: its type, default and meaning.

Other modules call the accessors here instead of reading `os.environ`, so this table is complete
by construction. Values are read at call time (not import time): tests and launchers may set them
after zili is imported. A malformed value is a ValueError naming the variable.

This module imports nothing from zili, so every layer (platforms included) may use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EnvVar:
    """One documented variable: `kind` is "bool" (1/true/yes/on or 0/false/no/off), "int", "str" or "path"."""

    name: str
    kind: str
    default: str | bool | int | None
    help: str


ZILI_ENFORCE_EAGER = EnvVar(
    "ZILI_ENFORCE_EAGER", "bool", False,
    "Run every engine step eagerly (no compiled decode) when EngineConfig.enforce_eager is None; "
    "the test suite sets it so only the compile tests pay for compilation.")
ZILI_BACKGROUND_COMPILE = EnvVar(
    "ZILI_BACKGROUND_COMPILE", "bool", False,
    "Compile the decode step on a background thread while the engine serves eagerly (`zili serve` sets it).")
ZILI_AOT_DECODE = EnvVar(
    "ZILI_AOT_DECODE", "bool", True,
    "With ZILI_BACKGROUND_COMPILE (`zili serve`), serve the decode step from an AOTInductor package built in a child "
    "process and cached under $XDG_CACHE_HOME/zili/aot_decode, so the serving process never imports the compiler; "
    "`LLM(enforce_eager=False)` loads such a package when one is cached. 0: the in-process torch.compile "
    "(benchmarks/notes: the package decoded 1.48-1.58x llama.cpp's tg128 against 1.05-1.13x, at 1.97-2.26x "
    "llama-server's peak RSS served against 3.2x).")
ZILI_AOT_DECODE_DIR = EnvVar(
    "ZILI_AOT_DECODE_DIR", "path", None,
    "Where AOT decode packages are cached; unset: $XDG_CACHE_HOME/zili/aot_decode (~/.cache/zili/aot_decode).")
ZILI_PLATFORM = EnvVar(
    "ZILI_PLATFORM", "str", None,
    "Platform to run on, by name (cpu, cuda, or an installed plugin's); unset: the preferred available one.")
ZILI_TUNE_CACHE = EnvVar(
    "ZILI_TUNE_CACHE", "path", None,
    "The `zili tune` results file; unset: $XDG_CACHE_HOME/zili/tune.json (~/.cache/zili/tune.json).")
ZILI_CPU_KERNELS = EnvVar(
    "ZILI_CPU_KERNELS", "bool", True,
    "Build and use zili's C++ CPU attention kernels; 0 keeps the torch paths (for comparisons).")
ZILI_CPU_ISA = EnvVar(
    "ZILI_CPU_ISA", "str", None,
    "Force the CPU instruction-set level the C++ kernels are built for (avx512, avx2, neon, portable); unset: detected.")
ZILI_ONEDNN = EnvVar(
    "ZILI_ONEDNN", "bool", True,
    "Pre-pack dense bf16 weights for oneDNN's matmul on CPUs; 0 turns packing off (for comparisons).")
ZILI_MALLOC_TUNE = EnvVar(
    "ZILI_MALLOC_TUNE", "bool", True,
    "Keep a step's large host blocks on glibc's heap (mallopt) on CPUs; 0 leaves the allocator alone.")
ZILI_HUGEPAGE_WEIGHTS = EnvVar(
    "ZILI_HUGEPAGE_WEIGHTS", "bool", True,
    "Place a model's packed CPU weights in memory advised for transparent huge pages (Linux); 0: the heap.")
ZILI_API_KEY = EnvVar(
    "ZILI_API_KEY", "str", None,
    "API key `zili serve` requires on /v1/* (read by the --api-key option); unset: no key unless given.")
ZILI_ADMIN_KEY = EnvVar(
    "ZILI_ADMIN_KEY", "str", None,
    "Admin key that turns on `zili serve`'s admin API (read by the --admin-key option); unset: admin API off.")
ZILI_DATABASE_URL = EnvVar(
    "ZILI_DATABASE_URL", "str", None,
    "SQLAlchemy URL of the accounts / usage database (zili.governance); unset: a SQLite file under "
    "$XDG_DATA_HOME/zili.")
ZILI_LLAMA_CPP_DIR = EnvVar(
    "ZILI_LLAMA_CPP_DIR", "path", None,
    "Where the benchmark tooling builds / finds llama.cpp (benchmarks/peers.py); unset: the user cache.")
ZILI_PACKED_KERNELS = EnvVar(
    "ZILI_PACKED_KERNELS", "str", None,
    "Force the packed int4/int8 matmul of every quantized layer: 'zili' (zili's kernel at this CPU's level) or "
    "'torch' (torch's own); unset or 'auto': chosen per layer shape by measurement (tune cache, else ZILI_CALIBRATE).")
ZILI_DENSE_WEIGHTS = EnvVar(
    "ZILI_DENSE_WEIGHTS", "str", "dequant",
    "How a layer served by zili's packed int4/int8 kernel runs batches past its row limit (prefill, large decode "
    "batches): 'dequant' (default) dequantizes its codes a few MiB at a time into a scratch buffer for the dense "
    "matmul, so no dense copy of the weight is held; 'copy' keeps a dense (oneDNN-packed bf16) copy beside the codes: "
    "~200 MiB more for SmolLM2-135M, prefill matmuls ~1.1-1.3x faster (benchmarks/notes/memory.md).")
ZILI_CALIBRATE = EnvVar(
    "ZILI_CALIBRATE", "bool", True,
    "At engine start, measure the packed-matmul choice of layer shapes the tune cache lacks (a few seconds, "
    "bounded) and cache it; 0 (or --no-calibrate) keeps the defaults: torch's kernels up to 16 rows. The test "
    "suite sets 0.")
ZILI_PARALLEL_MIN_BYTES = EnvVar(
    "ZILI_PARALLEL_MIN_BYTES", "str", None,
    "Least work (bytes of packed weights x rows of a q4/q8 product, bytes of KV rows of a decode-attention call) "
    "that zili's CPU kernels split over the intra-op threads; less runs on one thread. Unset or 'auto': 2 MiB when "
    "the host is overloaded at engine start and the process has no raised priority (a parallel region then waits "
    "a time slice for its second thread), else 0 (every call parallel).")
# Structured output's own caps (zili.structured.spec): a request past one gets a 400 that names the cap
# and this variable. The grammar library compiles large counts cheaply (maxLength 65,535 in ~30 ms),
# so the defaults admit what real schemas use; the caps bound a hostile request's compile time.
ZILI_STRUCTURED_MAX_SPEC_CHARS = EnvVar(
    "ZILI_STRUCTURED_MAX_SPEC_CHARS", "int", 64 * 1024,
    "Longest JSON schema, regex, grammar or choice list (characters of its compact JSON / text).")
ZILI_STRUCTURED_MAX_SCHEMA_DEPTH = EnvVar(
    "ZILI_STRUCTURED_MAX_SCHEMA_DEPTH", "int", 64, "Deepest nesting of JSON containers in a schema.")
ZILI_STRUCTURED_MAX_COUNT = EnvVar(
    "ZILI_STRUCTURED_MAX_COUNT", "int", 1_000_000,
    "Largest minLength / maxLength / minItems / maxItems / minProperties / maxProperties in a schema.")
ZILI_STRUCTURED_MAX_REGEX_REPEAT = EnvVar(
    "ZILI_STRUCTURED_MAX_REGEX_REPEAT", "int", 10_000,
    "Largest {n,m} repetition count in a regex, a schema pattern or a grammar.")

ENVIRONMENT_VARIABLES: dict[str, EnvVar] = {v.name: v for v in (
    ZILI_ENFORCE_EAGER, ZILI_BACKGROUND_COMPILE, ZILI_AOT_DECODE, ZILI_AOT_DECODE_DIR, ZILI_PLATFORM, ZILI_TUNE_CACHE,
    ZILI_CPU_KERNELS, ZILI_CPU_ISA, ZILI_HUGEPAGE_WEIGHTS,
    ZILI_ONEDNN, ZILI_MALLOC_TUNE, ZILI_API_KEY, ZILI_ADMIN_KEY, ZILI_DATABASE_URL, ZILI_LLAMA_CPP_DIR,
    ZILI_PACKED_KERNELS, ZILI_DENSE_WEIGHTS, ZILI_CALIBRATE, ZILI_STRUCTURED_MAX_SPEC_CHARS,
    ZILI_STRUCTURED_MAX_SCHEMA_DEPTH, ZILI_STRUCTURED_MAX_COUNT, ZILI_STRUCTURED_MAX_REGEX_REPEAT,
    ZILI_PARALLEL_MIN_BYTES)}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _raw(var: EnvVar) -> str | None:
    value = os.environ.get(var.name)
    return value.strip() if value is not None and value.strip() else None


def get_bool(var: EnvVar) -> bool:
    """A "bool" variable's value, its default when unset or empty; ValueError naming it otherwise."""
    value = _raw(var)
    if value is None:
        return bool(var.default)
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"{var.name}={value!r} is not a boolean; use one of {', '.join(_TRUE + _FALSE)}")


def get_int(var: EnvVar) -> int:
    """An "int" variable's value (underscores allowed: 65_536), its default when unset or empty;
    ValueError naming it when not a positive integer."""
    value = _raw(var)
    if value is None:
        return int(var.default or 0)
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{var.name}={value!r} is not a positive integer")
    return number


def get_str(var: EnvVar) -> str | None:
    """A "str" variable's value (stripped), None when unset or empty."""
    value = _raw(var)
    return value if value is not None else (var.default if isinstance(var.default, str) else None)


def get_path(var: EnvVar) -> Path | None:
    """A "path" variable's value with ~ expanded, None when unset or empty."""
    value = _raw(var)
    return Path(value).expanduser() if value is not None else None


def user_cache_dir() -> Path:
    """zili's cache root: $XDG_CACHE_HOME/zili, default ~/.cache/zili (XDG base-directory spec)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "zili"


def enforce_eager() -> bool:
    """ZILI_ENFORCE_EAGER."""
    return get_bool(ZILI_ENFORCE_EAGER)


def background_compile() -> bool:
    """ZILI_BACKGROUND_COMPILE."""
    return get_bool(ZILI_BACKGROUND_COMPILE)


def aot_decode() -> bool:
    """ZILI_AOT_DECODE."""
    return get_bool(ZILI_AOT_DECODE)


def aot_decode_dir() -> Path:
    """ZILI_AOT_DECODE_DIR, else the default under the user cache."""
    return get_path(ZILI_AOT_DECODE_DIR) or user_cache_dir() / "aot_decode"


def platform_name() -> str | None:
    """ZILI_PLATFORM."""
    return get_str(ZILI_PLATFORM)


def tune_cache_path() -> Path:
    """ZILI_TUNE_CACHE, else the default under the user cache."""
    return get_path(ZILI_TUNE_CACHE) or user_cache_dir() / "tune.json"


def cpu_kernels_enabled() -> bool:
    """ZILI_CPU_KERNELS."""
    return get_bool(ZILI_CPU_KERNELS)


def cpu_isa() -> str | None:
    """ZILI_CPU_ISA, lower-cased."""
    value = get_str(ZILI_CPU_ISA)
    return value.lower() if value else None


def calibrate() -> bool:
    """ZILI_CALIBRATE."""
    return get_bool(ZILI_CALIBRATE)


def parallel_min_bytes() -> int | None:
    """ZILI_PARALLEL_MIN_BYTES: a byte count, or None for "auto" (unset); ValueError naming the variable otherwise."""
    value = get_str(ZILI_PARALLEL_MIN_BYTES)
    if value is None or value.lower() == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"{ZILI_PARALLEL_MIN_BYTES.name} must be 'auto' or a non-negative integer, got {value!r}")
    return n


DENSE_WEIGHT_MODES = ("dequant", "copy")


def dense_weights() -> str:
    """ZILI_DENSE_WEIGHTS, lower-cased: "dequant" or "copy"; ValueError naming the variable otherwise."""
    value = (get_str(ZILI_DENSE_WEIGHTS) or "dequant").lower()
    if value not in DENSE_WEIGHT_MODES:
        raise ValueError(f"{ZILI_DENSE_WEIGHTS.name} must be one of {', '.join(DENSE_WEIGHT_MODES)}, got {value!r}")
    return value


def onednn_enabled() -> bool:
    """ZILI_ONEDNN."""
    return get_bool(ZILI_ONEDNN)


def malloc_tune_enabled() -> bool:
    """ZILI_MALLOC_TUNE."""
    return get_bool(ZILI_MALLOC_TUNE)


def hugepage_weights_enabled() -> bool:
    """ZILI_HUGEPAGE_WEIGHTS."""
    return get_bool(ZILI_HUGEPAGE_WEIGHTS)


def database_url() -> str | None:
    """ZILI_DATABASE_URL."""
    return get_str(ZILI_DATABASE_URL)


def use_zili_inductor_cache() -> None:
    """Point torch.compile's Inductor cache at zili's cache directory (~/.cache/zili/inductor),
    unless TORCHINDUCTOR_CACHE_DIR is set: compiled decode steps are then reused across starts."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(user_cache_dir() / "inductor")
