"""Single-stream decode speed against zili's kernel work threshold (`cpu_isa.set_parallel_min_bytes`), in one
process: the compare's zili peer (`LLM(model)`, one sequence), the threshold set before each measurement and
the values interleaved round by round, tg measured as `python -m benchmarks compare` does (`zili_decode_tps`).

    python benchmarks/parallel_threshold_ab.py --thresholds 0,2097152 --rounds 3 --tokens 64 [--eager]

(the forced-AVX2 path: prefix the ISA variables of benchmarks/README.md). Prints each round and the medians.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics

from zili.bench.offline import zili_decode_tps
from zili.engine.llm import LLM
from zili.kernels import cpu_isa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--thresholds", default="0,2097152", help="comma-separated byte counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--eager", action="store_true")
    args = parser.parse_args()
    thresholds = [int(t) for t in args.thresholds.split(",")]
    llm = LLM(args.model, max_num_seqs=1, **({"enforce_eager": True} if args.eager else {}))
    rng = random.Random(0)
    zili_decode_tps(llm, 8, rng)  # warm-up
    results: dict[int, list[float]] = {t: [] for t in thresholds}
    for r in range(args.rounds):
        for t in thresholds:
            cpu_isa.set_parallel_min_bytes(t)
            results[t].append(zili_decode_tps(llm, args.tokens, rng))
        print(f"round {r}: " + ", ".join(f"{t}: {v[-1]:.1f}" for t, v in results.items())
              + f" tok/s (load {os.getloadavg()[0]:.1f})", flush=True)
    mode = "eager" if args.eager else "compiled"
    print(f"{mode}, {cpu_isa.selected()}: median tok/s " + ", ".join(
        f"{t}: {statistics.median(v):.1f}" for t, v in results.items()))


if __name__ == "__main__":
    main()
