"""Layers on zili's packed kernels hold no dense weight (ZILI_DENSE_WEIGHTS=dequant, the default): past
their row limit they dequantize their codes into scratch memory for the dense matmul. Checked against
the dense copy's path: the same weight values, the same logits and greedy tokens, and no copy held."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tests.unit.test_gguf import write_tiny_gguf
from zili.kernels import cpu_isa
from zili.kernels.cpu_quant import dequantize_q4, dequantize_q8, pack_q4, pack_q8
from zili.layers.linear import Linear
from zili.layers.quant import Int4Weight, Int8Weight, float_group_quant
from zili.layers.quant_calibration import TORCH, choose

LEVELS = cpu_isa.executable_levels()


def _packed(form: str, n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.1
    if form == "q4":
        gq = float_group_quant(torch.nn.functional.pad(w, (0, -k % 32)))
        p = pack_q4(gq.codes[:, :k], gq.scale, gq.minimum)
        return p, dequantize_q4(p), "q4_dequant_linear", p.dm
    p = pack_q8(w)
    return p, dequantize_q8(p), "q8_dequant_linear", p.d


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("form", ["q4", "q8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantized_weight_is_the_kernels_weight_exactly(isa, form, dtype):
    """x = I reads the dequantized weight back through the dense matmul: every element (a tail block of
    K = 80, N = 40 not a multiple of the 16-row groups) is d * code + m, rounded once to x's dtype."""
    p, w, op, scales = _packed(form, 40, 80)
    eye = torch.eye(80, dtype=dtype)
    got = getattr(cpu_isa.ops(isa), op)(eye, p.qs, scales, 40)
    assert got.dtype == dtype and got.shape == (80, 40)
    assert torch.equal(got, w.t().to(dtype))


@pytest.mark.parametrize("form", ["q4", "q8"])
def test_wide_weights_are_dequantized_a_chunk_at_a_time(form):
    """2,000 x 640 fp32 is 4.9 MiB, past the 4 MiB scratch: two chunks, the second ragged."""
    p, w, op, scales = _packed(form, 2000, 640, seed=1)
    x = torch.randn(3, 640)
    got = getattr(cpu_isa.ops(), op)(x, p.qs, scales, 2000)
    torch.testing.assert_close(got, x @ w.t(), rtol=1e-5, atol=1e-4)
    assert getattr(cpu_isa.ops(), op)(x[:0], p.qs, scales, 2000).shape == (0, 2000)


def test_linear_without_a_dense_weight_serves_every_row_count():
    lin = Linear(64, [32, 32])
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 64))
    lin.quant = Int8Weight(lin.weight.detach(), max_rows=4, isa=cpu_isa.selected())
    ref_w = dequantize_q8(lin.quant.q8)
    lin.weight.data = torch.empty(0)  # what release_dense_weights does
    for rows in (1, 4, 5, 37):  # the packed kernel, then the dequantize path
        x = torch.randn(rows, 64)
        ref = x @ ref_w.t()
        assert (lin(x) - ref).abs().max() < 0.03 * ref.abs().max()
    x = torch.randn(9, 64)
    torch.testing.assert_close(lin(x), x @ ref_w.t(), rtol=1e-5, atol=1e-5)  # no activation quantization


def test_dequantize_path_inside_torch_compile():
    w = Int4Weight(float_group_quant(torch.randn(48, 96) * 0.1), max_rows=2, isa=cpu_isa.selected())
    compiled = torch.compile(w.dense_matmul, fullgraph=True, dynamic=True)
    with torch.inference_mode():
        for rows in (3, 17):
            x = torch.randn(rows, 96)
            assert torch.equal(compiled(x), w.dense_matmul(x))


def test_calibration_limits_a_zili_kernel_against_the_path_it_will_take():
    """zili's kernel loses to the dense copy from 8 rows but beats dequantize-then-dense up to 32: with no
    copy held, its limit is 32 (4 against the copy). torch's kernel keeps a copy: its limit is against it."""
    timings = {r: {"avx512": 10.0 * r, TORCH: 12.0 * r, "dense": 40.0 + r, "dequant": 300.0 + r}
               for r in (1, 2, 4, 8, 16, 32, 64)}
    assert choose(timings, ["avx512"]).max_rows == 32
    assert choose(timings, ["avx512", TORCH]).kernel == "avx512"
    assert choose(timings, [TORCH]).max_rows == 2
    without = {r: {k: v for k, v in t.items() if k != "dequant"} for r, t in timings.items()}
    assert choose(without, ["avx512"]).max_rows == 4  # ZILI_DENSE_WEIGHTS=copy: today's rule


# Both layers of the tiny GGUF quantized with codes the packed forms hold exactly (so the dense copy and
# the dequantized codes are the same weights): layer 0 Q4_K q|k|v and Q4_0 o_proj, layer 1 Q4_1 with a
# Q8_0 down projection; the rest float. (A fused layer of Q5_K / Q6_K parts is requantized to int8, and
# its copy then holds the file's values, not the codes'.)
TYPES = {f"blk.1.{p}.weight": Q.Q4_1 for p in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")}
TYPES["blk.1.ffn_down.weight"] = Q.Q8_0
TYPES["blk.0.attn_k.weight"] = TYPES["blk.0.attn_v.weight"] = Q.Q4_K


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("dequant") / "tiny.gguf"
    write_tiny_gguf(path, tensor_types=TYPES)
    return path


def _build(path, dtype: torch.dtype, dense_weights: str, monkeypatch):
    from zili.models.loader import load_model, open_checkpoint
    from zili.models.quantize import quantize_and_calibrate

    with monkeypatch.context() as m:
        m.setenv("ZILI_DENSE_WEIGHTS", dense_weights)
        m.setenv("ZILI_PACKED_KERNELS", "zili")
        loaded = load_model(str(path), dtype=str(dtype).removeprefix("torch."))
        report = quantize_and_calibrate(loaded.model, "auto", dtype, "cpu-packed",
                                        lambda: open_checkpoint(loaded.source), max_rows=2, calibrate=False)
    return loaded, report


def _prefill_logits(loaded, tokens: list[int]) -> torch.Tensor:
    from zili.kernels.attention import AttentionMetadata

    cfg = loaded.config
    caches = [torch.zeros(cfg.kv_cache_shape(3, 16, loaded.dtype), dtype=loaded.dtype)
              for _ in range(cfg.num_hidden_layers)]
    meta = AttentionMetadata.build([len(tokens)], [len(tokens)], [[0, 1, 2]], 16)  # up to 48 tokens
    with torch.inference_mode():
        hidden = loaded.model(torch.tensor(tokens), torch.arange(len(tokens)), caches, meta)
        return loaded.model.compute_logits(hidden)


def test_no_dense_copy_is_held_and_the_logits_match_the_copys(tiny_gguf, monkeypatch):
    copy, copy_report = _build(tiny_gguf, torch.float32, "copy", monkeypatch)
    lean, report = _build(tiny_gguf, torch.float32, "dequant", monkeypatch)
    quantized = {n for n, m in lean.model.named_modules() if type(m) is Linear and m.quant is not None}
    assert {"model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.down_proj"} <= quantized
    modules = dict(lean.model.named_modules())
    for name in quantized - {"lm_head"}:  # the head's dense table is the embedding's (and refined from)
        assert modules[name].weight.numel() == 0 and modules[name].packed is None, name
        assert dict(copy.model.named_modules())[name].weight.numel() > 0, name
    assert report.dequantized_dense == len(quantized - {"lm_head"}) and copy_report.dequantized_dense == 0
    tokens = list(range(3, 40))  # 37 rows: every quantized layer past its 2-row limit
    torch.testing.assert_close(_prefill_logits(lean, tokens), _prefill_logits(copy, tokens), rtol=1e-4, atol=1e-4)

    # bf16: nothing is packed for oneDNN beside the codes either.
    from zili.layers import onednn

    if onednn.available(torch.bfloat16):
        lean16, _ = _build(tiny_gguf, torch.bfloat16, "dequant", monkeypatch)
        copy16, _ = _build(tiny_gguf, torch.bfloat16, "copy", monkeypatch)
        mods16 = dict(lean16.model.named_modules())
        assert all(mods16[n].packed is None and mods16[n].weight.numel() == 0 for n in quantized - {"lm_head"})
        assert onednn.packed_only_bytes(lean16.model) < onednn.packed_only_bytes(copy16.model)


def test_greedy_tokens_equal_with_and_without_dense_copies(tiny_gguf, monkeypatch):
    from zili import LLM, SamplingParams

    monkeypatch.setenv("ZILI_PACKED_KERNELS", "zili")
    prompts = ["Hello there, how are you today", "a b c d e f g h i j k", "def fib(n): return"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for mode in ("copy", "dequant"):
        monkeypatch.setenv("ZILI_DENSE_WEIGHTS", mode)
        llm = LLM(str(tiny_gguf), dtype="float32", kv_cache_memory=2 * 2**20, block_size=16, calibrate=False)
        held = [m.weight.numel() for m in llm.engine.runner.model.modules()
                if type(m) is Linear and m.quant is not None and m is not llm.engine.runner.model.lm_head]
        assert held and (all(h == 0 for h in held) if mode == "dequant" else all(h > 0 for h in held))
        outs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs["copy"] == outs["dequant"]
