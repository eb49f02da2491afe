"""Decode throughput with tensor parallelism against one rank, side by side in one run.

    .venv/bin/python benchmarks/bench_tensor_parallel.py [--model REF] [--batch 1 8] [--tokens 64]

For each batch size: B prompts are prefilled, then the decode steps alone are timed (every step
makes one token per sequence). Configurations alternate within each repeat, so drift of a shared
machine hits all alike: tp=1 with the default threads, tp=1 with threads/2, tp=2 with threads/2
per rank. Also timed: one all-reduce of a decode step's hidden state between two gloo ranks (a
decode step makes 2 per layer, 1 for the embedding and 1 gather of the logits). Prints a table
and a JSON line; records nothing by itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import statistics
import time
from typing import Any


def decode_tok_s(engine, batch: int, tokens: int) -> float:
    from zili.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{batch}-{time.monotonic_ns()}-{i}", f"Request {i}: tell me a long story about", params)
    while engine.scheduler.waiting:  # prefill (and the first token)
        engine.step()
    start, made = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        made += sum(1 for _ in engine.scheduler.running)
        engine.step()
    return made / (time.perf_counter() - start)


def _allreduce_worker(rank: int, port: int, hidden: int, rows: int, iters: int, out) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    x = torch.randn(rows, hidden, dtype=torch.bfloat16)
    for _ in range(20):
        dist.all_reduce(x)
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    if rank == 0:
        out.put((time.perf_counter() - start) / iters)
    dist.destroy_process_group()


def allreduce_us(hidden: int, rows: int, iters: int = 500) -> float:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_allreduce_worker, args=(r, port, hidden, rows, iters, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    seconds = out.get(timeout=120)
    for p in procs:
        p.join(30)
    return seconds * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from zili.config import EngineConfig
    from zili.engine.builder import build_engine
    from zili.platforms import current_platform

    platform = current_platform()
    platform.set_num_threads(None)
    threads = torch.get_num_threads()
    half = max(1, threads // 2)
    configs: dict[str, dict[str, Any]] = {f"tp=1 threads={threads}": dict(tensor_parallel_size=1, threads=threads),
               f"tp=1 threads={half}": dict(tensor_parallel_size=1, threads=half),
               f"tp=2 threads={half}/rank": dict(tensor_parallel_size=2, threads=half)}
    engines = {}
    for name, options in configs.items():  # all loaded up front; only one runs at a time
        config = EngineConfig(model=args.model, max_model_len=1024, kv_cache_memory=64 * 2**20,
                              max_num_seqs=max(args.batch), use_tune_cache=False, **options)
        engines[name] = build_engine(config)
    results: dict[str, dict[int, list[float]]] = {name: {b: [] for b in args.batch} for name in configs}
    for _ in range(args.repeats):
        for batch in args.batch:
            for name, engine in engines.items():
                platform.set_num_threads(configs[name]["threads"])
                results[name][batch].append(decode_tok_s(engine, batch, args.tokens))
    for engine in engines.values():
        engine.close()
    hidden = next(iter(engines.values())).model_config.hidden_size
    reduce = {b: allreduce_us(hidden, b) for b in args.batch}

    print(f"\nmodel {args.model or 'default'}, {os.cpu_count()} CPUs ({threads} physical cores), "
          f"load average {os.getloadavg()[0]:.1f}; decode tok/s, median of {args.repeats}")
    base = f"tp=1 threads={threads}"
    for batch in args.batch:
        for name in configs:
            median = statistics.median(results[name][batch])
            ratio = median / statistics.median(results[base][batch])
            print(f"  batch {batch:3d}  {name:24s} {median:8.1f} tok/s  x{ratio:.2f}")
        print(f"  batch {batch:3d}  gloo all-reduce of [{batch}, {hidden}] bf16: {reduce[batch]:.0f} us")
    print(json.dumps({"decode_tok_s": {n: {b: statistics.median(v) for b, v in r.items()} for n, r in results.items()},
                      "allreduce_us": reduce, "load_average": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
