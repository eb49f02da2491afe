"""Block-scaled FP8 (DeepSeek V3's checkpoint format): quantize a tiny model's linear weights to e4m3
in 128x128 blocks, save them with their weight_scale_inv (sharded, some scales in the other shard),
load through zili, and compare logits."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers  # noqa: E402,F401
from safetensors.torch import load_file, save_file

from tests.tiny_models import write_tiny_deepseek  # noqa: E402
from zili.kernels.attention import AttentionMetadata  # noqa: E402
from zili.models.loader import load_model  # noqa: E402
from zili.models.registry import build_model  # noqa: E402
from zili.weights.fp8 import dequantize_block_fp8, quantize_block_fp8  # noqa: E402

BLOCK = (128, 128)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_block_quantization_round_trip() -> None:
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    w[:128, :128] *= 100  # blocks of very different magnitude: each gets its own scale
    q, scale_inv = quantize_block_fp8(w, BLOCK)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (2, 3)  # partial edge blocks
    deq = dequantize_block_fp8(q, scale_inv, BLOCK, torch.float32)
    block_max = scale_inv.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300] * 448
    assert ((deq - w).abs() <= block_max / 16).all()  # e4m3: 3 mantissa bits
    assert ((deq - w).abs() <= w.abs() / 16 + block_max / 2**9).all()
    q2, s2 = quantize_block_fp8(deq, BLOCK)  # dequantized values are representable: exact again
    assert torch.equal(dequantize_block_fp8(q2, s2, BLOCK, torch.float32), deq)
    with pytest.raises(ValueError, match="weight_scale_inv.*shape"):
        dequantize_block_fp8(q, scale_inv[:1], BLOCK, torch.float32)


def _quantized(name: str, t: torch.Tensor) -> bool:
    """What DeepSeek V3 ships in fp8: every linear weight but the router, embeddings and lm_head."""
    return t.dim() == 2 and (name.endswith("_proj.weight") or name.endswith("kv_a_proj_with_mqa.weight"))


@pytest.fixture(scope="module")
def fp8_checkpoints(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(fp32 original, fp8 copy, the fp32 state with quantized weights replaced by their dequantization)."""
    root = tmp_path_factory.mktemp("fp8")
    # hidden 256, intermediate 320: weights span several 128x128 blocks, some partial. Every token uses
    # all 16 experts, so fp8 rounding cannot flip a routing choice (a discrete jump in a random model).
    orig = write_tiny_deepseek(root / "orig", "v3", init_std=0.05, hidden_size=256, intermediate_size=320,
                               moe_intermediate_size=96, num_experts_per_tok=16, topk_group=4)
    state = load_file(str(orig / "model.safetensors"))
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    dequantized = dict(state)
    for i, (name, t) in enumerate(sorted(state.items())):
        if not _quantized(name, t):
            shards[i % 2][name] = t
            continue
        q, scale_inv = quantize_block_fp8(t, BLOCK)
        shards[i % 2][name] = q
        shards[(i // 3) % 2][name + "_scale_inv"] = scale_inv  # now and then in the other shard
        dequantized[name] = dequantize_block_fp8(q, scale_inv, BLOCK, torch.float32)
    fp8 = root / "fp8"
    fp8.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (fp8 / f).write_bytes((orig / f).read_bytes())
    config = json.loads((orig / "config.json").read_text())
    config["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                         weight_block_size=list(BLOCK))
    (fp8 / "config.json").write_text(json.dumps(config))
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(shard, str(fp8 / file))
        weight_map.update(dict.fromkeys(shard, file))
    (fp8 / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    quantized = [n for n, t in state.items() if _quantized(n, t)]
    assert len(quantized) > 20
    for n in quantized:  # e4m3 keeps about 2-3% of a Gaussian weight's norm as rounding error
        assert (dequantized[n] - state[n]).norm() <= 0.04 * state[n].norm(), n
    return orig, fp8, dequantized


@torch.no_grad()
def _prefill_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    cfg = model.config
    caches = [torch.zeros(cfg.kv_cache_shape(16, 4)) for _ in range(cfg.num_hidden_layers)]
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [list(range(15, 15 - -(-len(ids) // 4), -1))], 4)
    return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), caches, meta))


def test_fp8_checkpoint_loads_dequantized(fp8_checkpoints) -> None:
    orig, fp8, dequantized = fp8_checkpoints
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    got = _prefill_logits(load_model(str(fp8), dtype="float32", device="cpu").model, ids)
    # Exactly the model whose weights are the dequantized ones ...
    loaded = load_model(str(orig), dtype="float32", device="cpu")
    reference = build_model(loaded.config, torch.float32, "cpu")
    reference.load_weights(dequantized.items())
    assert (got - _prefill_logits(reference, ids)).abs().max().item() <= 1e-5
    # ... and within fp8 rounding of the unquantized one (a random tiny model turns ~2.6% weight error
    # into ~9% logit error; 2% Gaussian weight noise does about the same).
    full = _prefill_logits(loaded.model, ids)
    assert (got - full).norm() <= 0.15 * full.norm()
    assert torch.nn.functional.cosine_similarity(got, full, dim=-1).min() >= 0.97


def test_fp8_checkpoint_loads_in_bfloat16(fp8_checkpoints) -> None:
    _, fp8, dequantized = fp8_checkpoints
    model = load_model(str(fp8), dtype="bfloat16", device="cpu").model
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    assert torch.equal(model.model.layers[1].self_attn.kv_b_proj.weight, dequantized[name].to(torch.bfloat16))
    assert model.model.layers[1].mlp.experts.w13.dtype == torch.bfloat16
