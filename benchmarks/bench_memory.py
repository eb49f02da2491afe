"""Where a `zili serve` process's memory goes, stage by stage, at the default model and the KV
capacity `python -m benchmarks compare` gives both engines (32 slots x 512 tokens).

    python benchmarks/bench_memory.py [--compile] [--kv-tokens 16384] [--requests 32 --prompt-len 64 --output-len 32]

Prints resident memory (VmRSS) after each stage of building a server's engine in this process and
the bytes each kind of tensor holds, so that each ~50 MB has a name. `--requests` then runs that many
requests through the engine at once (what a served load adds: step temporaries, logits, the
allocator's kept heap) and prints the peak per step; `--smaps` splits the final resident memory by
mapping (shared libraries' file pages, the heap, anonymous mappings). Set ZILI_CPU_ISA to see another
kernel level (its dtype: fp32 below AVX-512, so dense weights and the KV pool double).
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")



def _holds_no_dense_copy(module: object) -> bool:
    import torch  # here, not at the top: the script measures what importing torch costs

    weight, packed = getattr(module, "weight", None), getattr(module, "packed", None)
    return isinstance(weight, torch.Tensor) and weight.numel() == 0 and packed is None

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true", help="compile the decode step (as zili serve does)")
    ap.add_argument("--kv-tokens", type=int, default=32 * 512)
    ap.add_argument("--model", default=None, help="path or alias (default: the default model)")
    ap.add_argument("--no-tune-cache", action="store_true", help="ignore the tune cache (zili serve reads it)")
    ap.add_argument("--timeline", action="store_true", help="print VmRSS / VmHWM beside every log line of the build")
    ap.add_argument("--requests", type=int, default=0, help="then run this many requests at once (greedy)")
    ap.add_argument("--prompt-len", type=int, default=64, help="tokens per request's prompt (random ids)")
    ap.add_argument("--output-len", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--smaps", action="store_true", help="split the final resident memory by mapping")
    args = ap.parse_args()
    rows: list[tuple[str, float]] = [("python", rss_mib())]
    import torch

    rows.append(("import torch", rss_mib()))
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401

    import zili.server.app  # noqa: F401  the HTTP stack a server imports

    rows.append(("import the server stack (fastapi, uvicorn, zili.server)", rss_mib()))
    from zili.config import EngineConfig
    from zili.engine.builder import build_engine
    from zili.engine.runner import ModelRunner, kv_bytes_per_block
    from zili.layers.onednn import packed_only_bytes
    from zili.models.loader import open_checkpoint, resolve_model
    from zili.models.quantize import quantized_bytes
    from zili.platforms import current_platform

    dtype = current_platform().default_dtype()

    if args.timeline:
        class Probe(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                print(f"  [rss {rss_mib():7.1f} hwm {hwm_mib():7.1f} MiB] {record.getMessage()[:110]}", flush=True)
        logging.getLogger("zili").addHandler(Probe())
        logging.getLogger("zili").setLevel(logging.INFO)
    # The pool is sized from the checkpoint's header, as `python -m benchmarks compare` does: no weights read.
    model_config = open_checkpoint(resolve_model(args.model)).config()
    per_block = kv_bytes_per_block(model_config, 16, dtype)
    blocks = -(-args.kv_tokens // 16)
    config = EngineConfig(model=args.model, max_num_seqs=32, kv_cache_memory=blocks * per_block,
                          enforce_eager=not args.compile, use_tune_cache=not args.no_tune_cache)
    engine = build_engine(config)
    gc.collect()
    rows.append(("engine: load, quantize, pack, KV pool" + (", compile the decode step" if args.compile else ""),
                 rss_mib()))
    runner = engine.runner
    assert isinstance(runner, ModelRunner), "bench_memory measures the single-process engine"
    model = runner.model
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = sum(c.numel() * c.element_size() for c in runner.kv_caches)
    from zili import envs

    lean = sum(1 for m in model.modules()
               if getattr(m, "quant", None) is not None and _holds_no_dense_copy(m))
    print(f"ZILI_DENSE_WEIGHTS={envs.dense_weights()}: {lean} quantized layers hold no dense copy")
    print(f"threads {torch.get_num_threads()}, kernel level {__import__('zili.kernels.cpu_isa', fromlist=['x']).selected()}")
    prev = 0.0
    for name, mib in rows:
        print(f"{mib:8.1f} MiB  (+{mib - prev:7.1f})  {name}")
        prev = mib
    print(f"peak (VmHWM) {hwm_mib():.1f} MiB")
    print(f"tensors: dense parameters {dense / 2**20:.1f} MiB (embedding, norms, and dense weights kept), "
          f"packed int4/int8 {quantized_bytes(model) / 2**20:.1f} MiB, "
          f"oneDNN-packed only {packed_only_bytes(model) / 2**20:.1f} MiB, KV pool {kv / 2**20:.1f} MiB")
    print(f"modules loaded: torch._inductor {'torch._inductor' in sys.modules}, "
          f"torch._dynamo {'torch._dynamo' in sys.modules}")
    if args.requests:
        run_load(engine, model_config.vocab_size, args.requests, args.prompt_len, args.output_len)
    if args.smaps:
        print_smaps()


def run_load(engine, vocab: int, requests: int, prompt_len: int, output_len: int) -> None:
    """All requests queued at once, stepped to the end: VmRSS after the first steps and the peak."""
    import torch

    from zili.sampling import SamplingParams

    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    before = rss_mib()
    for i in range(requests):
        engine.add_request(f"load-{i}", torch.randint(3, vocab, (prompt_len,), generator=gen).tolist(), params)
    steps, peak_rss = 0, before
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        now = rss_mib()
        if steps <= 3 or now > peak_rss + 1:
            print(f"  step {steps:4d}: rss {now:7.1f} hwm {hwm_mib():7.1f} MiB")
        peak_rss = max(peak_rss, now)
    print(f"load: {requests} x ({prompt_len} prompt + {output_len} output) tokens in {steps} steps: rss {before:.1f} "
          f"-> peak {peak_rss:.1f} -> {rss_mib():.1f} MiB after; VmHWM {hwm_mib():.1f} MiB")


def print_smaps() -> None:
    """Resident MiB per mapping kind from /proc/self/smaps: file-backed pages per library (shared
    with other processes mapping the same file, but counted in every one's RSS), heap, anonymous."""
    groups: dict[str, float] = {}
    name = "?"
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                path = head[5] if len(head) > 5 else "[anonymous]"
                name = path.rsplit("/", 1)[-1] if path.startswith("/") else path
                if ".cpython-" in name or name.endswith(".so") or ".so." in name:
                    name = name if name.startswith(("libtorch", "libgomp", "libmkl", "libdnnl", "zili_cpu")) \
                        else "other shared libraries"
            elif head and head[0] == "Rss:":
                groups[name] = groups.get(name, 0.0) + int(head[1]) / 1024
    total = sum(groups.values())
    print(f"resident by mapping (smaps, {total:.1f} MiB):")
    for key, mib in sorted(groups.items(), key=lambda kv: -kv[1]):
        if mib >= 1:
            print(f"  {mib:8.1f} MiB  {key}")


if __name__ == "__main__":
    main()
