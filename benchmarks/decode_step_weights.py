"""What one decode step's weights cost on this CPU: every packed product of a SmolLM2-135M step, back to back.

    python benchmarks/decode_step_weights.py [--rows 1] [--threads 2] [--steps 12]

30 layers of the int4 projections (qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536) and the 49,152 x 576
int8 LM head: 96 MB, more than an L3, so every step reads its weights from memory as a served step does. Random
codes, zili's kernels at this CPU's level (`ZILI_CPU_ISA` lowers it). Two copies of the weights are timed
interleaved, step by step: packed on the heap, and packed in huge-page memory (`cpu_quant.huge_page_weights`,
what the engine's loader does). Prints the median milliseconds and GB/s of the int4 products and of the head per
step, beside a plain multi-threaded read of the same number of bytes (`torch.sum` over int64: the bandwidth a
step could reach). A kernel probe (issue #22, benchmarks/notes/cpu-isa.md); engine speed is `zili bench`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from zili.kernels import cpu_isa, cpu_quant

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))
LAYERS = 30
HEAD = (49152, 576)


def _weights(seed: int) -> tuple[list[cpu_quant.Q4Packed], cpu_quant.Q8Packed]:
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(LAYERS):
        for n, k in SHAPES:
            kb = k // 32
            layers.append(cpu_quant.pack_q4(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8),
                                            torch.rand(n, kb, generator=gen) * 0.01,
                                            -torch.rand(n, kb, generator=gen) * 0.08))
    return layers, cpu_quant.pack_q8(torch.randn(*HEAD, generator=gen) * 0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1, help="activation rows (sequences in the step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ops = cpu_isa.ops()
    copies = {"heap": _weights(0)}
    with cpu_quant.huge_page_weights(True):
        copies["huge pages"] = _weights(0)
    layers, head = copies["heap"]
    q4_bytes, head_bytes = sum(p.nbytes() for p in layers), head.nbytes()
    reference = torch.zeros((q4_bytes + head_bytes) // 8, dtype=torch.int64)
    xs = {k: torch.randn(args.rows, k) for k in (576, 1536)}

    def step(layers, head) -> tuple[float, float]:
        t0 = time.perf_counter()
        for p in layers:
            ops.q4_gemm(xs[p.in_features], p.qs, p.dm, p.out_features)
        t1 = time.perf_counter()
        ops.q8_gemm(xs[576], head.qs, head.d, head.out_features)
        return t1 - t0, time.perf_counter() - t1

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in copies}
    reads = []
    for weights in copies.values():  # warm-up
        step(*weights)
    for _ in range(args.steps):
        t0 = time.perf_counter()
        reference.sum()
        reads.append(time.perf_counter() - t0)
        for name, weights in copies.items():
            times[name].append(step(*weights))
    print(f"kernel level {cpu_isa.selected()}, {args.threads} threads, {args.rows} row(s); int4 {q4_bytes / 1e6:.1f} MB, "
          f"head {head_bytes / 1e6:.1f} MB; median of {args.steps} interleaved steps")
    read = statistics.median(reads)
    print(f"{'plain read':12s} {read * 1e3:7.2f} ms  {(q4_bytes + head_bytes) / read / 1e9:5.1f} GB/s")
    for name, runs in times.items():
        a, b = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        print(f"{name:12s} int4 {a * 1e3:6.2f} ms {q4_bytes / a / 1e9:5.1f} GB/s   head {b * 1e3:6.2f} ms "
              f"{head_bytes / b / 1e9:5.1f} GB/s   step {(a + b) * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
