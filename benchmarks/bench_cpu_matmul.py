"""bf16 projection matmuls on this CPU: `F.linear` on the plain weight against the same weight
pre-packed for oneDNN (zili.layers.onednn), at the shapes of the default model.

    python benchmarks/bench_cpu_matmul.py

Weights rotate through `layers` copies so that they come from memory, as in a decode step. Prints
microseconds per call and GFLOP/s; the largest row count shows the machine's matmul peak.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from zili.layers.onednn import PackedDense, available

SHAPES = [(576, 3072, 30), (1536, 576, 30), (576, 960, 30), (576, 49152, 2)]  # K, N, copies


def per_call(fn, weights, x, repeats: int = 5) -> float:
    for w in weights * 2:
        fn(x, w)
    start = time.perf_counter()
    for _ in range(repeats):
        for w in weights:
            fn(x, w)
    return (time.perf_counter() - start) / repeats / len(weights)


def main() -> None:
    if not available(torch.bfloat16):
        raise SystemExit("this torch build or CPU has no oneDNN bf16 matmul")
    print(f"threads {torch.get_num_threads()}")
    print("K     N      rows  F.linear us  GFLOP/s  packed us  GFLOP/s")
    for k, n, copies in SHAPES:
        weights = [torch.randn(n, k).to(torch.bfloat16) for _ in range(copies)]
        packed = [PackedDense(w) for w in weights]
        for rows in (1, 8, 64, 256, 4096):
            x = torch.randn(rows, k).to(torch.bfloat16)
            plain = per_call(lambda x, w: F.linear(x, w), weights, x)
            pre = per_call(lambda x, p: p.matmul(x), packed, x)
            flop = 2 * rows * k * n
            print(f"{k:<5} {n:<6} {rows:<5} {plain * 1e6:>11.0f} {flop / plain / 1e9:>8.0f} {pre * 1e6:>10.0f} "
                  f"{flop / pre / 1e9:>8.0f}")


if __name__ == "__main__":
    main()
