"""zili's C++ paged decode attention for CPUs (kernels/csrc/paged_decode_cpu.cpp).

Built on first use with torch.utils.cpp_extension (gcc, -O3 -march=native, OpenMP), then loaded
from the build cache under ~/.cache/zili: about a minute the first time, instant afterwards. It
registers `torch.ops.zili_cpu.paged_decode`, which reads each sequence's keys and values in place
through its block table (no gathered copy) and runs in float32; with a fake (shape) implementation
so that the compiled decode step can call it inside its graph.

`available()` is False where it cannot be built (no compiler, not a CPU build of torch): the torch
paths in zili.kernels.attention stay. ZILI_CPU_KERNELS=0 turns it off, for comparison.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "paged_decode_cpu.cpp"
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_tag() -> str:
    """A short digest of this CPU's feature flags: -march=native code is only valid where built."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _build_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "zili" / "torch_extensions" / f"paged_decode_{_cpu_tag()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def available() -> bool:
    """Build (once per machine) and load the kernel; False, with the reason logged, when it cannot."""
    if os.environ.get("ZILI_CPU_KERNELS", "1").strip() == "0":
        return False
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _load()
    return bool(_state["ok"])


def _load() -> bool:
    try:
        from torch.utils.cpp_extension import load

        load(name="zili_paged_decode_cpu", sources=[str(_SOURCE)], build_directory=str(_build_dir()),
             extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
             extra_ldflags=["-fopenmp", "-lmvec"],
             is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler, no ninja, an unsupported platform: the torch path stays
        logger.warning("C++ CPU attention kernel unavailable, using the torch path (%s: %s)",
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return False

    @torch.library.register_fake("zili_cpu::paged_decode")
    def _(q, kv_cache, block_tables, seq_lens, scale, window=0):
        return torch.empty_like(q)

    return True


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float, window: int | None = None) -> torch.Tensor:
    """q [B, H, D] (one token per sequence) over its paged context -> [B, H, D]; needs `available()`.

    kv_cache [2, num_blocks, block_size, KVH, D]; block_tables [B, W] int64; seq_lens [B] int64
    (context length including the new token). `window`: sliding-window attention (Mistral, Gemma's
    local layers): each query sees only the last `window` positions of its sequence; None or 0 is
    the whole context. A negative window is a ValueError.
    """
    window = 0 if window is None else int(window)
    if window < 0:
        raise ValueError(f"window must be >= 0 (0 or None: full context), got {window}")
    return torch.ops.zili_cpu.paged_decode(q, kv_cache, block_tables, seq_lens, scale, window)
