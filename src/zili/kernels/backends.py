"""Attention backends: which implementation of `paged_attention` (and MLA decode) runs.

  sdpa    the portable torch reference in `zili.kernels.attention` (torch SDPA on any device);
          the fallback wherever Triton is not usable.
  triton  the paged kernels in `zili.kernels.triton_attention` / `triton_mla` (GPUs).
  cpp     zili's C++ decode kernel (`zili.kernels.cpu_attention`, built on first use) reading the
          paged cache in place; prefill and MLA as sdpa. CPUs with a compiler.

The platform names the default (`Platform.attention_backend()`), `zili tune` may measure a better
one, and `EngineConfig.attention_backend` overrides both. Nothing here is process-global: the
engine's runner holds its `AttentionBackend` and names it in each step's `AttentionMetadata`, so the
model code keeps calling `paged_attention` unchanged and two engines in one process may differ.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    paged_attention: Callable[..., Any]  # (q, k, v, kv_cache, meta, scale) -> [T, H, d]
    mla_decode: Callable[..., Any]  # drop-in for mla_attention.mla_decode_absorbed
    graph_safe_decode: bool  # a decode step reads no host-side lengths, so it may be graph-captured
    configure: Callable[[dict | None], None] | None = None  # installs tuned launch settings
    # Quantized KV caches (EngineConfig.kv_cache_dtype names, zili.kernels.kv_quant) its kernels read:
    # per-head rows for paged_attention, and MLA's latent rows for mla_decode.
    kv_cache_dtypes: tuple[str, ...] = ()
    mla_kv_cache_dtypes: tuple[str, ...] = ()
    # Quantized per-head rows padded to a multiple of this many bytes (ModelConfig.kv_cache_shape): 16
    # lets the GPU kernels load 16-byte vectors (H200, int8 decode at 2,048 tokens x 64 sequences:
    # 1,013 -> 281 us). The CPU kernels read packed rows (no padding: the pool holds more tokens).
    kv_row_align: int = 1


_QUANTIZED = ("int8", "fp8_e4m3")


def _sdpa() -> AttentionBackend:
    from zili.kernels.attention import sdpa_paged_attention
    from zili.kernels.mla_attention import mla_decode_absorbed

    return AttentionBackend("sdpa", sdpa_paged_attention, mla_decode_absorbed, graph_safe_decode=False,
                            kv_cache_dtypes=_QUANTIZED, mla_kv_cache_dtypes=_QUANTIZED)


def _cpp() -> AttentionBackend:
    from zili.kernels.attention import cpu_paged_attention
    from zili.kernels.mla_attention import mla_decode_absorbed

    return AttentionBackend("cpp", cpu_paged_attention, mla_decode_absorbed, graph_safe_decode=False,
                            kv_cache_dtypes=_QUANTIZED, mla_kv_cache_dtypes=_QUANTIZED)


def _triton() -> AttentionBackend:
    from zili.kernels import triton_attention, triton_mla

    return AttentionBackend("triton", triton_attention.paged_attention, triton_mla.mla_decode, graph_safe_decode=True,
                            configure=triton_attention.set_config, kv_cache_dtypes=_QUANTIZED,
                            mla_kv_cache_dtypes=_QUANTIZED, kv_row_align=16)


def batch_invariant(backend: AttentionBackend, cpu_kernel: bool) -> AttentionBackend:
    """`backend` with every query row computed alone by a per-row paged kernel
    (`zili.kernels.attention.batch_invariant_paged_attention`: zili's C++ one with `cpu_kernel`, the
    caller having checked that it runs on the platform's device; else a per-row torch loop), for
    EngineConfig.deterministic. Same
    name (it is the same kernel family, and what a log or a tensor-parallel rank names); never
    graph-captured, and MLA models are refused by the builder."""
    from zili.kernels.attention import batch_invariant_paged_attention

    attention = functools.partial(batch_invariant_paged_attention, cpu_kernel=cpu_kernel)
    return dataclasses.replace(backend, paged_attention=attention, graph_safe_decode=False,
                               kv_cache_dtypes=_QUANTIZED, kv_row_align=1)  # the per-row kernels read packed rows


_FACTORIES: dict[str, Callable[[], AttentionBackend]] = {"sdpa": _sdpa, "triton": _triton, "cpp": _cpp}
_REQUIRES: dict[str, str] = {"triton": "triton"}  # backend -> the module it needs installed


def register_attention_backend(name: str, factory: Callable[[], AttentionBackend]) -> None:
    """For platform plugins that bring their own kernels (their Platform then names `name`)."""
    _FACTORIES[name] = factory


def is_installed(name: str) -> bool:
    if name == "cpp":
        from zili.kernels import cpu_attention

        return cpu_attention.available()
    need = _REQUIRES.get(name)
    return name in _FACTORIES and (need is None or importlib.util.find_spec(need) is not None)


def get_attention_backend(name: str) -> AttentionBackend:
    if name not in _FACTORIES:
        raise ValueError(f"attention backend {name!r} is unknown; known: {', '.join(_FACTORIES)}")
    if not is_installed(name):
        if name == "cpp":
            raise ValueError("attention backend 'cpp' could not build its C++ kernel here (see the log); "
                             "use sdpa")
        raise ValueError(f"attention backend {name!r} needs the {_REQUIRES[name]!r} package: "
                         f"pip install {_REQUIRES[name]}")
    return _FACTORIES[name]()


def use_attention_backend(name: str, kernel_config: dict | None = None) -> AttentionBackend:
    """The backend `name`, with tuned launch settings (`kernel_config`) installed when it takes any.
    ValueError if it is unknown or cannot run here. Selects nothing: the caller hands the result to
    its runner."""
    backend = get_attention_backend(name)
    if backend.configure is not None:
        backend.configure(kernel_config)
    return backend


def choose_attention_backend(requested: str, platform, tuned: str | None = None) -> str:
    """"auto" takes the tuned winner when it still runs here, else the platform's default when it
    is installed (the C++ kernel builds, Triton imports), else the first of the platform's
    candidates that is. An explicit name must be one of the platform's candidates (ValueError)."""
    candidates = platform.attention_backends()
    if requested != "auto":
        if requested not in candidates:
            raise ValueError(f"attention backend {requested!r} does not run on {platform.name}; "
                             f"available: {', '.join(candidates)}")
        return requested
    if tuned and tuned in candidates and is_installed(tuned):
        return tuned
    preferred = platform.attention_backend()
    if is_installed(preferred):
        return preferred
    return next((name for name in candidates if is_installed(name)), "sdpa")
