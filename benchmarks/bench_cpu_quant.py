"""Packed 4-bit / 8-bit matmuls at the default model's decode shapes: zili's kernels on every
instruction-set level this CPU executes (zili.kernels.cpu_isa) against torch's own int4/int8 CPU
kernels (bf16 activations) and the dense matmul.

    python benchmarks/bench_cpu_quant.py [--rows 1,2,4,8,16] [--levels avx512,avx2,portable]

Weights rotate through 30 copies (2 for the LM head) so that they come from memory, as in a decode
step. Prints microseconds per call and the weight bytes read per second. Torch's kernels pick their
own ISA (ATEN_CPU_CAPABILITY=avx2 lowers them); this script compares kernels, not whole machines.
"""

from __future__ import annotations

import argparse
import time

import torch

from zili.kernels import cpu_isa
from zili.layers.quant import Int4Weight, Int8Weight, float_group_quant

SHAPES = [("qkv 576x960", 576, 960, 30, "int4"), ("gate_up 576x3072", 576, 3072, 30, "int4"),
          ("down 1536x576", 1536, 576, 30, "int4"), ("lm_head 576x49152", 576, 49152, 2, "int8")]


def per_call(fn, layers, x, repeats: int = 5) -> float:
    for layer in layers * 2:
        fn(layer, x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for layer in layers:
            fn(layer, x)
        best = min(best, (time.perf_counter() - start) / len(layers))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--levels", default=",".join(reversed(cpu_isa.executable_levels())))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    levels = [lv for lv in args.levels.split(",") if lv]
    print(f"threads {torch.get_num_threads()}, activations {args.dtype}; us per call (weight GB/s)")
    for name, k, n, copies, form in SHAPES:
        weights = [torch.randn(n, k) * 0.05 for _ in range(copies)]
        kernels: dict[str, list[Int4Weight] | list[Int8Weight]] = {}
        for level in [*levels, "torch"]:
            if form == "int4":
                kernels[level] = [Int4Weight(float_group_quant(w), isa=level) for w in weights]
            else:
                kernels[level] = [Int8Weight(w, isa=level) for w in weights]
        dense = [w.to(dtype) for w in weights]
        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(rows, k).to(dtype)
            cells = []
            for level, layers in kernels.items():
                us = per_call(lambda layer, x: layer.matmul(x), layers, x) * 1e6
                cells.append(f"{level} {us:8.1f} ({layers[0].nbytes() / us / 1e3:5.1f})")
            us = per_call(lambda w, x: torch.nn.functional.linear(x, w), dense, x) * 1e6
            cells.append(f"dense {us:8.1f}")
            print(f"{name:18s} rows {rows:3d}  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
