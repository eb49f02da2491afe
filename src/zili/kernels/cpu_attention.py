"""zili's C++ paged decode attention for CPUs (kernels/csrc/paged_decode_cpu.cpp).

Built per instruction-set level with the other CPU kernels (`zili.kernels.cpu_isa`: avx512 with
bf16 dot-product scores and a vector softmax, avx2 and portable as fp32 loops the compiler
vectorises for their flags), the level chosen from the CPU at load time. It registers
`torch.ops.zili_cpu_<level>.paged_decode`, which reads each sequence's keys and values in place
through its block table (no gathered copy) and runs in float32; with a fake (shape) implementation
so that the compiled decode step can call it inside its graph.

`available()` is False where it cannot be built (no compiler, not a CPU build of torch): the torch
paths in zili.kernels.attention stay. ZILI_CPU_KERNELS=0 turns it off, for comparison.
"""

from __future__ import annotations

import torch

from zili.kernels import cpu_isa


def available(isa: str | None = None) -> bool:
    """Build (once per machine) and load the kernel at `isa` (default: the selected level); False,
    with the reason logged, when it cannot."""
    return cpu_isa.load(isa)


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float, window: int | None = None, isa: str | None = None) -> torch.Tensor:
    """q [B, H, D] (one token per sequence) over its paged context -> [B, H, D]; needs `available()`.

    kv_cache [2, num_blocks, block_size, KVH, D] of q's dtype, or a quantized cache [2, num_blocks,
    block_size, KVH, D + 2] of int8 / float8_e4m3fn (zili.kernels.kv_quant's rows: D elements, then the
    row's bf16 scale); block_tables [B, W] int64; seq_lens [B] int64
    (context length including the new token). `window`: sliding-window attention (Mistral, Gemma's
    local layers): each query sees only the last `window` positions of its sequence; None or 0 is
    the whole context. A negative window is a ValueError. `isa`: run that level's build (tests).
    """
    window = 0 if window is None else int(window)
    if window < 0:
        raise ValueError(f"window must be >= 0 (0 or None: full context), got {window}")
    return cpu_isa.ops(isa).paged_decode(q, kv_cache, block_tables, seq_lens, scale, window)
