"""Where a decode step's time goes: the decoder layers, the LM head (compute_logits) and sampling.

A 262k-token vocabulary (Gemma 3) makes the head and the per-row work on the logits a far larger
share of a step than SmolLM2's 49k. This loads a model with its serving weights (packed int4/int8
as `--quantization auto` does), prefills B sequences, then times decode steps split into the three
parts, interleaved and repeated; it prints medians in ms and each part's share. Usage:

    python -m benchmarks.lm_head_share gemma3-270m smollm2-135m --batch 1 16 --steps 12
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from zili.engine.sampler import apply_top_k_top_p
from zili.kernels.attention import AttentionMetadata
from zili.models.loader import load_model, open_checkpoint
from zili.models.quantize import quantize_and_calibrate
from zili.platforms import current_platform

BLOCK = 16


def profile(ref: str, batches: list[int], steps: int, prompt_len: int = 64) -> None:
    loaded = load_model(ref, dtype="bfloat16")
    quantize_and_calibrate(loaded.model, "auto", torch.bfloat16, current_platform().matmul_backend(),
                           lambda: open_checkpoint(loaded.source))
    model, cfg = loaded.model, loaded.config
    print(f"{ref}: vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, layers {cfg.num_hidden_layers}")
    for B in batches:
        per_seq = -(-(prompt_len + steps + 1) // BLOCK)
        tables = [list(range(b * per_seq, (b + 1) * per_seq)) for b in range(B)]
        caches = [torch.zeros(cfg.kv_cache_shape(B * per_seq, BLOCK), dtype=torch.bfloat16)
                  for _ in range(cfg.num_hidden_layers)]
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, min(cfg.vocab_size, 30000), (B * prompt_len,), generator=gen)
        lens = [prompt_len] * B
        with torch.inference_mode():
            meta = AttentionMetadata.build([prompt_len] * B, lens, tables, BLOCK)
            model(ids, torch.arange(prompt_len).repeat(B), caches, meta)
            times: dict[str, list[float]] = {"layers": [], "lm_head": [], "sampling": []}
            last = torch.zeros(B, dtype=torch.long)
            top_k = torch.full((B,), 50)
            top_p = torch.full((B,), 0.9)
            for _ in range(steps):
                lens = [n + 1 for n in lens]
                meta = AttentionMetadata.build([1] * B, lens, tables, BLOCK)
                t0 = time.perf_counter()
                hidden = model(last, torch.tensor([n - 1 for n in lens]), caches, meta)
                t1 = time.perf_counter()
                logits = model.compute_logits(hidden)
                t2 = time.perf_counter()
                probs = torch.softmax(apply_top_k_top_p(logits / 0.7, top_k, top_p), dim=-1)
                last = torch.multinomial(probs, 1, generator=gen).view(-1)
                t3 = time.perf_counter()
                times["layers"].append(t1 - t0)
                times["lm_head"].append(t2 - t1)
                times["sampling"].append(t3 - t2)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        total = sum(med.values())
        shares = ", ".join(f"{k} {v:.1f} ms ({100 * v / total:.0f}%)" for k, v in med.items())
        print(f"  batch {B:3d}: step {total:.1f} ms = {shares}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for ref in args.models:
        profile(ref, args.batch, args.steps)


if __name__ == "__main__":
    main()
