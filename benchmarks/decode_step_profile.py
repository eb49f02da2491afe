"""Where a single-stream decode step's time goes, as `python -m benchmarks compare --mode offline` runs it.

Loads the model as the compare's zili peer does (`LLM(model)`, the serving defaults: packed weights,
the compiled decode step unless --eager), streams `--tokens` greedy tokens of a one-token prompt
(tgN's workload), and reports per decode step, in microseconds:
- the whole engine step (`Engine.step`), the runner's forward + logits (`ModelRunner.execute`), and
  the rest (scheduling, sampling, detokenization, output processing: the engine's host work);
- inside the forward, per op class from torch.profiler's self times: the packed matmuls by projection
  (recognised by their weight's size), the LM head, the attention kernel, and everything else the
  compiled graph runs (Inductor's fused loops for norms, rotary, SwiGLU, residuals, the KV write, the
  top-k refinement) as the remainder.

Usage (ISA variables as in benchmarks/README.md for the forced-AVX2 path):

    python benchmarks/decode_step_profile.py [--eager] [--tokens 64] [--rounds 3] [--model ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from zili.engine.llm import LLM
from zili.layers.linear import Linear
from zili.sampling import SamplingParams


def projection_names(model: torch.nn.Module) -> dict[tuple, str]:
    """Packed codes' shape -> projection leaf name (qkv_proj, o_proj, ..., lm_head)."""
    names: dict[tuple, str] = {}
    for name, module in model.named_modules():
        quant = getattr(module, "quant", None) if isinstance(module, Linear) else None
        packed = getattr(quant, "q4", None) or getattr(quant, "q8", None)
        if packed is not None:
            names[tuple(packed.qs.shape)] = name.rpartition(".")[2]
    return names


def classify(name: str, shapes, names: dict[tuple, str]) -> str:
    if "q4_gemm" in name or "q8_gemm" in name:
        if shapes and len(shapes) > 1 and shapes[1]:
            return "matmul " + names.get(tuple(shapes[1]), f"? {shapes[1]}")
        return "matmul ?"
    if "paged_decode" in name:
        return "attention (C++ kernel)"
    return name


def timed_stream(llm: LLM, tokens: int, seed: int, clock=time.perf_counter) -> tuple[list[float], list[float]]:
    """Per decode step: (whole Engine.step seconds, ModelRunner.execute seconds) by `clock` (wall time,
    or `time.thread_time`: the calling thread's CPU time, which a preemption by another process
    does not inflate)."""
    engine: Any = llm.engine  # its step and its runner's execute are wrapped for the timing
    runner: Any = engine.runner
    steps: list[float] = []
    execs: list[float] = []
    real_execute, real_step = runner.execute, engine.step

    def execute(step_input):
        t0 = clock()
        try:
            return real_execute(step_input)
        finally:
            execs.append(clock() - t0)

    def step():
        t0 = clock()
        try:
            return real_step()
        finally:
            steps.append(clock() - t0)

    runner.execute, engine.step = execute, step
    try:
        params = SamplingParams(max_tokens=tokens + 1, ignore_eos=True, temperature=0)
        for _ in llm.stream([100 + seed], params):
            pass
    finally:
        del runner.execute, engine.step
    return steps[1:], execs[1:]  # the first step is the prompt's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--eager", action="store_true", help="the eager decode step (--enforce-eager)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top", type=int, default=14, help="op rows to print")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the engine's)")
    args = parser.parse_args()

    # One sequence: only the batch-1 decode graph is built (minutes less of compiling on 2 cores).
    options: dict = {"max_num_seqs": 1, **({"enforce_eager": True} if args.eager else {})}
    if args.threads:
        options["threads"] = args.threads
    llm = LLM(args.model, **options)
    runner: Any = llm.engine.runner
    print(f"threads {torch.get_num_threads()}, compiled decode: {runner.compiled_decode is not None}")
    timed_stream(llm, 8, 0)  # warm-up
    for label, clock in (("wall", time.perf_counter), ("main thread CPU", time.thread_time)):
        step_ms, exec_ms = [], []
        for r in range(args.rounds):
            s, e = timed_stream(llm, args.tokens, r + 1, clock)
            step_ms.append(statistics.median(s) * 1e6)
            exec_ms.append(statistics.median(e) * 1e6)
        step_us, exec_us = min(step_ms), min(exec_ms)
        print(f"{label}: engine step {step_us:.0f} us (median per round, best round; {1e6 / step_us:.1f} tok/s), "
              f"runner.execute {exec_us:.0f} us, engine host work {step_us - exec_us:.0f} us")

    names = projection_names(runner.model)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        timed_stream(llm, args.tokens, 99)
    # Per class: calls per step x the median self time of one call (a median, not a mean: on a shared
    # machine a call that lost its core to another process would otherwise dominate its class).
    durations: dict[str, list[float]] = defaultdict(list)
    for event in prof.events():
        durations[classify(event.name, event.input_shapes, names)].append(event.self_cpu_time_total)
    n = args.tokens
    per_class = {c: statistics.median(d) * len(d) / n for c, d in durations.items()}
    total = sum(per_class.values())
    print(f"profiled: {total:.0f} us of self time per step (medians x calls; profiler overhead included)")
    for c, us in sorted(per_class.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {us:8.1f} us  {len(durations[c]) / n:6.1f} calls/step  {c}")


if __name__ == "__main__":
    main()
