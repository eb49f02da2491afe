"""zili's C++ paged decode attention alone, a bf16 cache against a quantized one (int8 / fp8 e4m3 rows
with their scales), at the 64-sequence offline shape of the default model (SmolLM2-135M: 9 query
heads, 3 KV heads, head_dim 64), on each instruction-set level asked for (zili.kernels.cpu_isa).

    python benchmarks/bench_paged_decode.py [--batch 64] [--context 384] [--layers 30] [--rounds 7]
                                            [--levels avx512,avx2] [--kv int8,fp8_e4m3]

Every call reads another of `--layers` caches (one per model layer, blocks in a random order) so the
KV bytes come from memory, as in a decode step. The cache kinds run interleaved, a round each in
turn, and the script prints the best and median milliseconds per call (one layer) and each quantized
kind's ratio against bf16 in the same process. Ratios, not absolute times, are what a loaded machine
keeps. A kernel microbenchmark: engine speed is recorded with `zili bench offline`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from zili.kernels import cpu_attention, cpu_isa
from zili.kernels.kv_quant import quantize_rows

KV_DTYPES = {"bf16": torch.bfloat16, "int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}


def make_layers(kind: str, n_layers: int, batch: int, context: int, n_kv: int, d: int, block_size: int, seed: int):
    """`n_layers` caches of `kind` holding `batch` sequences of `context` positions, blocks shuffled,
    and the block table they share."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = -(-context // block_size)
    num_blocks = batch * per_seq
    tables = torch.randperm(num_blocks, generator=gen).view(batch, per_seq)
    caches = []
    for _ in range(n_layers):
        x = torch.randn(2, num_blocks, block_size, n_kv, d, generator=gen)
        caches.append(x.bfloat16() if kind == "bf16" else quantize_rows(x, KV_DTYPES[kind]))
    return caches, tables


def per_call(caches, q, tables, lens, scale: float, isa: str) -> float:
    start = time.perf_counter()
    for cache in caches:
        cpu_attention.paged_decode(q, cache, tables, lens, scale, isa=isa)
    return (time.perf_counter() - start) / len(caches)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=384)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--levels", default=None, help="comma-separated levels (default: the selected one)")
    ap.add_argument("--kv", default="int8", help="quantized kinds against bf16, comma-separated")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = args.levels.split(",") if args.levels else [cpu_isa.selected()]
    kinds = ["bf16", *args.kv.split(",")]
    q = torch.randn(args.batch, args.heads, args.head_dim).bfloat16()
    lens = torch.full((args.batch,), args.context, dtype=torch.int64)
    scale = args.head_dim ** -0.5
    data = {k: make_layers(k, args.layers, args.batch, args.context, args.kv_heads, args.head_dim, args.block_size, 0)
            for k in kinds}
    kv_mb = {k: 2 * args.batch * args.context * args.kv_heads * data[k][0][0].shape[-1] * data[k][0][0].element_size()
             / 1e6 for k in kinds}
    print(f"B={args.batch} context={args.context} heads={args.heads}/{args.kv_heads} d={args.head_dim} "
          f"block={args.block_size} layers={args.layers} threads={torch.get_num_threads()} rounds={args.rounds}")
    for isa in levels:
        if not cpu_attention.available(isa):
            print(f"{isa}: not built here")
            continue
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for kind in kinds:  # warm-up: one pass over every layer
            per_call(data[kind][0], q, data[kind][1], lens, scale, isa)
        for _ in range(args.rounds):
            for kind in kinds:
                times[kind].append(per_call(data[kind][0], q, data[kind][1], lens, scale, isa))
        for kind in kinds:
            best, med = min(times[kind]), statistics.median(times[kind])
            line = (f"{isa:8s} {kind:8s} best {best * 1e3:7.3f} ms  median {med * 1e3:7.3f} ms  "
                    f"KV {kv_mb[kind]:6.1f} MB/call  {kv_mb[kind] / 1e3 / best:5.1f} GB/s")
            if kind != "bf16":
                line += (f"  bf16/{kind}: best {min(times['bf16']) / best:.2f}x  "
                         f"median {statistics.median(times['bf16']) / med:.2f}x")
            print(line)


if __name__ == "__main__":
    main()
