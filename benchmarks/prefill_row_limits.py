"""Whether zili's packed int4 kernel should serve prefill rows (issue #22; benchmarks/notes/cpu-isa.md).

    python benchmarks/prefill_row_limits.py kernels [--rows 16,64,128,256,512,2048] [--threads 2]
    python benchmarks/prefill_row_limits.py ab [--rounds 5]

`kernels`: per SmolLM2-135M projection shape, `Int4Weight.matmul` (zili's kernel at this CPU's level)
against `.dense_matmul` (dequantize into scratch, then the dense matmul: the path past a layer's row
limit), fp32 activations, best of 7 wall-clock calls each, and their ratio (below 1: the kernel wins).
`ab`: one engine (`LLM("smollm2-135m")`, eager), prefill throughput with the calibrated row limits
against the same limits capped at 64 (the calibration's old last row count), interleaved per round:
pp512 and 16 prompts of 128 tokens. Wall time: run it on a quiet machine and read the ratios.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # qkv, o, gate_up, down (SmolLM2-135M)


def _best_us(fn, x, calls: int = 7) -> float:
    fn(x)
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def kernels(rows: list[int], threads: int) -> None:
    from zili.kernels import cpu_isa
    from zili.layers.quant import Int4Weight, float_group_quant

    torch.set_num_threads(threads)
    level = cpu_isa.selected()
    print(f"kernel level {level}, {threads} threads")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n, k in SHAPES:
            packed = Int4Weight(float_group_quant(torch.randn(n, k, generator=gen) * 0.05), isa=level)
            for r in rows:
                x = torch.randn(r, k, generator=gen)
                a, b = _best_us(packed.matmul, x), _best_us(packed.dense_matmul, x)
                print(f"{n}x{k} {r:5d} rows: kernel {a:9.0f} us  dequant+dense {b:9.0f} us  ratio {a / b:5.2f}")


def ab(rounds: int) -> None:
    from zili import LLM, SamplingParams
    from zili.layers.linear import Linear

    llm = LLM("smollm2-135m", enforce_eager=True)
    quant = [m.quant for m in llm.engine.runner.model.modules() if isinstance(m, Linear) and m.quant is not None]
    limits = {"calibrated": [q.max_rows for q in quant], "cap64": [min(q.max_rows, 64) for q in quant]}
    rng = random.Random(0)
    params = SamplingParams(max_tokens=1, temperature=0)

    def prefill(n: int, length: int) -> float:
        prompts = [{"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(length)]} for _ in range(n)]
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return n * length / (time.perf_counter() - start)

    for label, (n, length) in {"pp512": (1, 512), "16x128": (16, 128)}.items():
        got: dict[str, list[float]] = {name: [] for name in limits}
        prefill(n, length)
        for i in range(rounds):
            for name in (list(limits) if i % 2 == 0 else list(limits)[::-1]):
                for q, r in zip(quant, limits[name]):
                    q.max_rows = r
                got[name].append(prefill(n, length))
        a, b = statistics.median(got["calibrated"]), statistics.median(got["cap64"])
        print(f"{label}: calibrated {a:.0f} tok/s, capped at 64 rows {b:.0f} tok/s, ratio {a / b:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kernels")
    k.add_argument("--rows", default="16,64,128,256,512,2048")
    k.add_argument("--threads", type=int, default=2)
    a = sub.add_parser("ab")
    a.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.what == "kernels":
        kernels([int(r) for r in args.rows.split(",")], args.threads)
    else:
        ab(args.rounds)


if __name__ == "__main__":
    main()
