"""MLA latent cache and grouped MoE: what they save. A program, not a test.

1. KV cache bytes per token (all layers) for DeepSeek shapes: zili's latent cache
   (`ModelConfig.kv_cache_shape`, kv_lora_rank + qk_rope_head_dim per layer) against the same model
   with expanded per-head K and V (H * (qk_nope + qk_rope) + H * v_head_dim per layer), and how many
   sequences of a given length fit in a fixed KV budget.
2. Decode tokens/s of a tiny random MoE model (zili's DeepseekForCausalLM driven through the paged
   latent cache) with grouped experts (only routed experts run, on their own tokens) against a dense
   loop that runs every expert on every token. Runs alternate, the best of --repeats is kept.

    .venv/bin/python benchmarks/bench_mla_moe.py [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from zili.config import ModelConfig
from zili.engine.runner import kv_bytes_per_block
from zili.kernels.attention import AttentionMetadata
from zili.layers.moe import FusedExperts
from zili.models.base import CausalLM
from zili.models.registry import build_model

GiB = 2**30
SHAPES = {  # the attention / layer-count fields of the published configs
    "DeepSeek-V3": dict(num_hidden_layers=61, num_attention_heads=128, hidden_size=7168, kv_lora_rank=512,
                        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128),
    "DeepSeek-V2": dict(num_hidden_layers=60, num_attention_heads=128, hidden_size=5120, kv_lora_rank=512,
                        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128),
    "DeepSeek-V2-Lite": dict(num_hidden_layers=27, num_attention_heads=16, hidden_size=2048, kv_lora_rank=512,
                             qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128),
}


def _mla_config(shape: dict, **extra) -> ModelConfig:
    H = shape["num_attention_heads"]
    return ModelConfig(architecture="deepseek_v3", intermediate_size=4 * shape["hidden_size"], num_key_value_heads=H,
                       vocab_size=1024, head_dim=shape["qk_nope_head_dim"] + shape["qk_rope_head_dim"],
                       **shape, **extra)


def kv_table(budget_gib: float, seq_len: int, dtype: torch.dtype) -> list[dict]:
    rows = []
    elem = torch.empty((), dtype=dtype).element_size()
    for name, shape in SHAPES.items():
        cfg = _mla_config(shape)
        latent = kv_bytes_per_block(cfg, 1, dtype)  # per token, all layers, as the engine sizes its pool
        H = shape["num_attention_heads"]
        per_layer = H * (shape["qk_nope_head_dim"] + shape["qk_rope_head_dim"]) + H * shape["v_head_dim"]
        expanded = per_layer * shape["num_hidden_layers"] * elem
        budget = int(budget_gib * GiB)
        rows.append(dict(model=name, latent_bytes_per_token=latent, expanded_bytes_per_token=expanded,
                         ratio=expanded / latent, budget_gib=budget_gib, seq_len=seq_len,
                         latent_max_seqs=budget // (latent * seq_len),
                         expanded_max_seqs=budget // (expanded * seq_len)))
    return rows


# --- MoE decode ---------------------------------------------------------------------------------------

def tiny_moe_config() -> ModelConfig:
    return ModelConfig(architecture="deepseek_v3", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=512, head_dim=48,
                       max_position_embeddings=1024, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
                       qk_rope_head_dim=16, v_head_dim=32, rope_interleave=True, n_routed_experts=64,
                       n_shared_experts=1, num_experts_per_tok=6, moe_intermediate_size=128, first_k_dense_replace=1,
                       scoring_func="sigmoid", topk_method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True,
                       routed_scaling_factor=2.5)


def dense_loop_experts(self: FusedExperts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The baseline: every expert on every token, zero-weighted where it was not chosen."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    inter = self.intermediate_size
    for e in range(self.num_experts):
        h = F.linear(x, self.w13[e])
        y = F.linear(F.silu(h[:, :inter]) * h[:, inter:], self.w2[e])
        out += y.float() * (weights * (ids == e)).sum(-1, keepdim=True)
    return out.to(x.dtype)


def _random_model(cfg: ModelConfig, seed: int = 0) -> CausalLM:
    model = build_model(cfg, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=gen) if "norm" in name
                    else 0.05 * torch.randn(p.shape, generator=gen))
    return model


@torch.inference_mode()
def decode_tokens_per_s(model: CausalLM, batch: int, prompt_len: int, steps: int) -> tuple[float, list]:
    """Prefill `batch` random prompts, then greedy-decode `steps` tokens each; (decode tokens/s, tokens)."""
    cfg: ModelConfig = model.config
    block_size = 16
    blocks_per_seq = -(-(prompt_len + steps) // block_size)
    caches = [torch.zeros(cfg.kv_cache_shape(batch * blocks_per_seq, block_size)) for _ in range(cfg.num_hidden_layers)]
    tables = [list(range(b * blocks_per_seq, (b + 1) * blocks_per_seq)) for b in range(batch)]
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    meta = AttentionMetadata.build([prompt_len] * batch, [prompt_len] * batch, tables, block_size)
    positions = torch.arange(prompt_len).repeat(batch)
    hidden = model(prompts.flatten(), positions, caches, meta)
    last = model.compute_logits(hidden.view(batch, prompt_len, -1)[:, -1]).argmax(-1)
    tokens = [last.tolist()]
    start = time.perf_counter()
    for step in range(steps):
        seq_len = prompt_len + step + 1
        meta = AttentionMetadata.build([1] * batch, [seq_len] * batch, tables, block_size)
        hidden = model(last, torch.full((batch,), seq_len - 1), caches, meta)
        last = model.compute_logits(hidden).argmax(-1)
        tokens.append(last.tolist())
    return batch * steps / (time.perf_counter() - start), tokens


def moe_table(batches: list[int], prompt_len: int, steps: int, repeats: int) -> list[dict]:
    cfg = tiny_moe_config()
    model = _random_model(cfg)
    grouped_forward = FusedExperts.forward
    rows = []
    for batch in batches:
        best = {"grouped": 0.0, "dense_loop": 0.0}
        outputs = {}
        for _ in range(repeats):  # alternate, so both see the same machine load
            for kind, forward in (("grouped", grouped_forward), ("dense_loop", dense_loop_experts)):
                FusedExperts.forward = forward  # type: ignore[method-assign]  # the A/B swaps the kernel
                try:
                    tps, tokens = decode_tokens_per_s(model, batch, prompt_len, steps)
                finally:
                    FusedExperts.forward = grouped_forward  # type: ignore[method-assign]
                best[kind] = max(best[kind], tps)
                outputs[kind] = tokens
        rows.append(dict(batch=batch, prompt_len=prompt_len, decode_steps=steps,
                         grouped_tokens_per_s=round(best["grouped"], 1),
                         dense_loop_tokens_per_s=round(best["dense_loop"], 1),
                         speedup=round(best["grouped"] / best["dense_loop"], 2),
                         same_tokens=outputs["grouped"] == outputs["dense_loop"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-gib", type=float, default=40.0, help="KV budget for the concurrency column")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence for the concurrency column")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    kv = kv_table(args.budget_gib, args.seq_len, torch.bfloat16)
    print(f"KV cache per token, all layers, bf16; max sequences of {args.seq_len} tokens in {args.budget_gib:g} GiB")
    print(f"{'model':<18}{'latent':>12}{'expanded':>14}{'ratio':>8}{'latent seqs':>13}{'expanded seqs':>15}")
    for r in kv:
        latent_kib, expanded_mib = r["latent_bytes_per_token"] / 2**10, r["expanded_bytes_per_token"] / 2**20
        print(f"{r['model']:<18}{latent_kib:>9.1f} KiB{expanded_mib:>10.2f} MiB"
              f"{r['ratio']:>7.1f}x{r['latent_max_seqs']:>13}{r['expanded_max_seqs']:>15}")

    cfg = tiny_moe_config()
    print(f"\nDecode, tiny MoE (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
          f"{cfg.n_routed_experts} experts, top-{cfg.num_experts_per_tok}, {cfg.n_shared_experts} shared), fp32, "
          f"{torch.get_num_threads()} thread(s), best of {args.repeats}")
    moe = moe_table(args.batches, args.prompt_len, args.steps, args.repeats)
    print(f"{'batch':>6}{'grouped tok/s':>16}{'dense-loop tok/s':>19}{'speedup':>9}{'same tokens':>13}")
    for r in moe:
        print(f"{r['batch']:>6}{r['grouped_tokens_per_s']:>16}{r['dense_loop_tokens_per_s']:>19}{r['speedup']:>8}x"
              f"{str(r['same_tokens']):>13}")
    if args.json:
        result = dict(command="benchmarks/bench_mla_moe.py", machine=platform.processor() or platform.machine(),
                      torch=torch.__version__, threads=torch.get_num_threads(), kv_cache=kv, moe_decode=moe)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
