"""What holding no dense weight copies costs (ZILI_DENSE_WEIGHTS=dequant against =copy): per layer shape
of the default model, the packed kernel, the dense copy (oneDNN-packed bf16) and the dequantize-then-dense
path at decode-batch and prefill row counts; and a whole prefill forward of each engine build.

    python benchmarks/bench_dense_weights.py [--rows 16,64,512] [--pp 512] [--threads 1] [--rounds 15]

Times are CPU seconds of the calling thread (`time.thread_time`), best of `--rounds`, candidates
interleaved: on a shared, overloaded host wall time measures other processes' time slices, CPU time
does not (it still carries their cache pollution). With `--threads 1` every op runs on the calling
thread, so its CPU time is the op's work; ratios, not absolute speeds, are what this reports.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch


def race(calls: dict, rounds: int) -> dict[str, float]:
    names = list(calls)
    for name in names:
        calls[name]()
    best = dict.fromkeys(names, float("inf"))
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.thread_time()
            calls[name]()
            best[name] = min(best[name], time.thread_time() - start)
    return {name: round(1e6 * t, 1) for name, t in best.items()}


def build(mode: str, model: str | None):
    import os

    from zili.models.loader import load_model, open_checkpoint
    from zili.models.quantize import quantize_and_calibrate

    os.environ["ZILI_DENSE_WEIGHTS"] = mode
    loaded = load_model(model, dtype="bfloat16")
    quantize_and_calibrate(loaded.model, "auto", torch.bfloat16, "cpu-packed", lambda: open_checkpoint(loaded.source),
                           calibrate=False)
    return loaded


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="16,64,512")
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import os

    os.environ.setdefault("ZILI_PACKED_KERNELS", "zili")
    from zili.kernels.attention import AttentionMetadata
    from zili.layers.linear import Linear

    copy, lean = build("copy", args.model), build("dequant", args.model)
    rows = [int(r) for r in args.rows.split(",")]
    seen = set()
    with torch.inference_mode():
        for a, b in zip(copy.model.modules(), lean.model.modules()):
            if type(a) is not Linear or a.quant is None or a.packed is None or b.weight.numel() != 0:
                continue
            key = (type(a.quant).__name__, a.out_features, a.in_features)
            if key in seen:
                continue
            seen.add(key)
            # The dequant path's two parts: dequantizing (one row: the matmul is next to nothing) and the
            # dense matmul on a plain (not pre-packed) weight, which oneDNN re-blocks on every call.
            plain = b.quant.dense_matmul(torch.eye(a.in_features, dtype=torch.bfloat16)).t().contiguous()
            one = torch.randn(1, a.in_features).to(torch.bfloat16)
            for m in rows:
                x = torch.randn(m, a.in_features).to(torch.bfloat16)
                t = race({"packed kernel": functools.partial(a.quant.matmul, x),
                          "dense copy": functools.partial(a.packed.matmul, x),
                          "dequant+dense": functools.partial(b.quant.dense_matmul, x),
                          "dequant alone": functools.partial(b.quant.dense_matmul, one),
                          "plain-weight matmul": functools.partial(torch.nn.functional.linear, x, plain)},
                         args.rounds)
                print(f"{key[0]} {key[1]}x{key[2]} rows {m:4d}: " + "  ".join(f"{k} {v:8.1f} us" for k, v in t.items())
                      + f"  dequant/copy {t['dequant+dense'] / t['dense copy']:.2f}x", flush=True)
        cfg = copy.config
        blocks = -(-args.pp // 16)
        tokens = torch.randint(0, cfg.vocab_size, (args.pp,))
        meta = AttentionMetadata.build([args.pp], [args.pp], [list(range(blocks))], 16)

        def prefill(loaded):
            caches = [torch.zeros(cfg.kv_cache_shape(blocks, 16, torch.bfloat16), dtype=torch.bfloat16)
                      for _ in range(cfg.num_hidden_layers)]
            return lambda: loaded.model(tokens, torch.arange(args.pp), caches, meta)

        t = race({"copy": prefill(copy), "dequant": prefill(lean)}, max(3, args.rounds // 3))
        print(f"prefill {args.pp} tokens, {args.threads} thread(s): copy {t['copy'] / 1e3:.1f} ms "
              f"({args.pp / t['copy'] * 1e6:.0f} tok/s), dequant {t['dequant'] / 1e3:.1f} ms "
              f"({args.pp / t['dequant'] * 1e6:.0f} tok/s): dequant/copy {t['dequant'] / t['copy']:.2f}x time")


if __name__ == "__main__":
    main()
