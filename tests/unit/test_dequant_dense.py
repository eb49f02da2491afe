"""Layers on zili's packed kernels hold no dense weight (ZILI_DENSE_WEIGHTS=dequant, the default): past
their row limit they dequantize their codes into scratch memory for the dense matmul. Checked on every
kernel level this CPU executes (ZILI_CPU_ISA): the dequantized weight is the codes' exactly; where the
dense copy holds the same values (float32, codes the packed form holds exactly) the logits and greedy
tokens equal the copy's; in bf16 each layer's output is within one bf16 rounding of the copy's; no copy held.

Why the tiny GGUF's Q4_K blocks get power-of-two super-block scales: the int4 form stores each 32-element
group's scale d * sc (a float16 times a 6-bit integer: up to 17 significant bits) as float16 (11), so for
most Q4_K blocks the codes' weight is within 2^-11 (relative, per scale) of the file's but not equal to it
(`test_q4_k_scales_are_rounded_to_float16`), while the copy holds the file's values: with random scales
the copy and the dequantized codes are two different weights, and a tiny random model amplifies the
difference (up to 0.22 in the logits: what failed here before). Both paths on the same weights is the
invariant worth asserting exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import tests.unit.test_gguf as gguf_tests
from tests.unit.test_gguf import random_blocks, reference_decode, write_tiny_gguf
from tests.unit.test_hugepage_weights import KERNEL_HAS_THP, mapping_flags
from zili.kernels import cpu_isa
from zili.kernels.cpu_quant import dequantize_q4, dequantize_q8, pack_q4, pack_q8
from zili.layers.linear import Linear
from zili.layers.quant import Int4Weight, Int8Weight, float_group_quant, gguf_group_quant
from zili.layers.quant_calibration import TORCH, choose

LEVELS = cpu_isa.executable_levels()
SCRATCH_BYTES = 4 << 20  # kScratchBytes in kernels/csrc/quant_gemm_cpu.cpp


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


def _bf16_bound(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """How far two bf16 matmuls of the same bf16 operands may differ: each sums exact products in fp32
    (in its own order: at most K * 2^-24 * sum |x||w|) and rounds once to bf16 (2^-9 relative each)."""
    return 2**-8 * y.float().abs() + x.shape[-1] * 2**-24 * (x.float().abs() @ w.float().abs().t()) + 1e-30


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("form", ["q4", "q8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_weights_are_dequantized_a_chunk_at_a_time(isa, form, dtype):
    """A weight past the 4 MiB scratch in x's dtype is dequantized and multiplied in chunks of rows (the
    last ragged): the result is the whole weight's product (fp32: to fp32 rounding; bf16: to one bf16
    rounding of an fp32 sum, `_bf16_bound`)."""
    n, k = (2000, 640) if dtype == torch.float32 else (4000, 640)
    assert n * k * dtype.itemsize > SCRATCH_BYTES and n * k * dtype.itemsize % SCRATCH_BYTES
    p, w, op, scales = _packed(form, n, k, seed=1)
    x = torch.randn(3, k).to(dtype)
    got = getattr(cpu_isa.ops(isa), op)(x, p.qs, scales, n)
    assert got.dtype == dtype and got.shape == (3, n)
    if dtype == torch.float32:
        torch.testing.assert_close(got, x @ w.t(), rtol=1e-5, atol=1e-4)
    else:
        wb = w.to(dtype)
        want = x @ wb.t()
        assert ((got.float() - want.float()).abs() <= _bf16_bound(x, wb, want)).all()
    assert getattr(cpu_isa.ops(isa), op)(x[:0], p.qs, scales, n).shape == (0, n)


@pytest.mark.parametrize("isa", LEVELS)
def test_linear_without_a_dense_weight_serves_every_row_count(isa):
    lin = Linear(64, [32, 32])
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 64))
    lin.quant = Int8Weight(lin.weight.detach(), max_rows=4, isa=isa)
    assert lin.quant.isa == isa and lin.quant.dequantizes
    ref_w = dequantize_q8(lin.quant.q8)
    lin.weight.data = torch.empty(0)  # what release_dense_weights does
    for rows in (1, 4, 5, 37):  # the packed kernel, then the dequantize path
        x = torch.randn(rows, 64)
        ref = x @ ref_w.t()
        assert (lin(x) - ref).abs().max() < 0.03 * ref.abs().max()
    x = torch.randn(9, 64)
    torch.testing.assert_close(lin(x), x @ ref_w.t(), rtol=1e-5, atol=1e-5)  # no activation quantization


@pytest.mark.parametrize("isa", LEVELS)
def test_q4_k_scales_are_rounded_to_float16(isa):
    """Q4_K's group scales d * sc and mins dmin * m are rounded to float16 in the int4 form: within 2^-11
    of each (relative), so the dequantized codes are within that of the file's values, and equal to them
    where the products fit float16 (power-of-two d and dmin). A code or scale out of place is far off."""
    raw = random_blocks(Q.Q4_K, 32, 512)
    file_w = torch.from_numpy(reference_decode(raw, Q.Q4_K))
    w = Int4Weight(gguf_group_quant(raw, Q.Q4_K, (32, 512)), isa=isa)
    got = w.dense_matmul(torch.eye(512)).t()
    gq = gguf_group_quant(raw, Q.Q4_K, (32, 512))
    terms = (gq.codes.reshape(32, 16, 32).float() * gq.scale[..., None].abs() + gq.minimum[..., None].abs())
    bound = (2**-11 + 2**-20) * terms.reshape(32, 512)  # two float16 roundings, a few fp32 ones
    assert not torch.equal(got, file_w)
    assert ((got - file_w).abs() <= bound).all()
    exact = _power_of_two_scales(raw, Q.Q4_K)
    w = Int4Weight(gguf_group_quant(exact, Q.Q4_K, (32, 512)), isa=isa)
    assert torch.equal(w.dense_matmul(torch.eye(512)).t(), torch.from_numpy(reference_decode(exact, Q.Q4_K)))


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


def _power_of_two_scales(raw: np.ndarray, qtype: Q) -> np.ndarray:
    """Q4_K blocks with their super-block d and dmin replaced by powers of two (2^-8 .. 2^-6), so that
    d * sc and dmin * m (sc, m < 64) are exact in float16 and the int4 form holds the file's values."""
    if qtype != Q.Q4_K:
        return raw
    blocks = raw.copy().reshape(-1, 144)
    rng = np.random.default_rng(len(blocks))
    scales = (2.0 ** -rng.integers(6, 9, (len(blocks), 2))).astype(np.float16)
    blocks[:, 0:4] = scales.view(np.uint8)
    return blocks.reshape(raw.shape)


# Both layers of the tiny GGUF quantized with codes the packed forms hold exactly (so the dense copy and
# the dequantized codes are the same weights): layer 0 Q4_K q|k|v (power-of-two super-block scales, see
# the module doc) and Q4_0 o_proj, layer 1 Q4_1 with a Q8_0 down projection; the rest float. (A fused
# layer of Q5_K / Q6_K parts is requantized to int8, and its copy then holds the file's values, not the
# codes'.)
TYPES = {f"blk.1.{p}.weight": Q.Q4_1 for p in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")}
TYPES["blk.1.ffn_down.weight"] = Q.Q8_0
TYPES["blk.0.attn_k.weight"] = TYPES["blk.0.attn_v.weight"] = Q.Q4_K


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("dequant") / "tiny.gguf"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(gguf_tests, "random_blocks", lambda qtype, rows, cols:
                  _power_of_two_scales(random_blocks(qtype, rows, cols), qtype))
        write_tiny_gguf(path, tensor_types=TYPES)
    return path


def _build(path, dtype: torch.dtype, dense_weights: str, isa: str, monkeypatch, defer: bool = False,
           kernels: str = "zili"):
    """Load + quantize as the engine does; `defer`: with the loader's `defer_packed` (the engine's way)."""
    from zili.models.loader import load_model, open_checkpoint
    from zili.models.quantize import quantize_and_calibrate

    with monkeypatch.context() as m:
        m.setenv("ZILI_DENSE_WEIGHTS", dense_weights)
        m.setenv("ZILI_PACKED_KERNELS", kernels)
        m.setenv("ZILI_CPU_ISA", isa)
        loaded = load_model(str(path), dtype=str(dtype).removeprefix("torch."), defer_packed="auto" if defer else None)
        report = quantize_and_calibrate(loaded.model, "auto", dtype, "cpu-packed",
                                        lambda: open_checkpoint(loaded.source), max_rows=2, calibrate=False)
    quantized = [m for m in loaded.model.modules() if type(m) is Linear and m.quant is not None]
    assert quantized and {m.quant.isa for m in quantized} == {isa if kernels == "zili" else None}
    assert not any(m.weight_deferred for m in loaded.model.modules() if isinstance(m, Linear))
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


@pytest.mark.parametrize("isa", LEVELS)
def test_no_dense_copy_is_held_and_the_logits_match_the_copys(tiny_gguf, isa, monkeypatch):
    from zili.models import quantize
    from zili.platforms.cpu import CpuPlatform

    copy, copy_report = _build(tiny_gguf, torch.float32, "copy", isa, monkeypatch)
    trims = []
    monkeypatch.setattr(quantize, "HEAP_TRIM_EVERY_BYTES", 1)  # the heap handed back after every layer packed
    monkeypatch.setattr(CpuPlatform, "release_host_memory", lambda self: trims.append(1))
    lean, report = _build(tiny_gguf, torch.float32, "dequant", isa, monkeypatch)
    assert len(trims) >= report.counts.get("int4", 0) + report.counts.get("int8", 0)
    quantized = {n for n, m in lean.model.named_modules() if type(m) is Linear and m.quant is not None}
    assert {"model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.down_proj"} <= quantized
    modules, copies = dict(lean.model.named_modules()), dict(copy.model.named_modules())
    for name in quantized - {"lm_head"}:  # the head's dense table is the embedding's (and refined from)
        assert modules[name].weight.numel() == 0 and modules[name].packed is None, name
        # the loader packed into huge-page memory (cpu_quant.HugePageArena)
        quant = modules[name].quant
        codes = quant.q4.qs if isinstance(quant, Int4Weight) else quant.q8.qs
        assert ("hg" in (mapping_flags(codes.data_ptr()) or [])) == KERNEL_HAS_THP, name
        # The copy is the codes' weight exactly (the premise of comparing the two paths' outputs).
        held = copies[name].weight.detach()
        assert torch.equal(modules[name].quant.dense_matmul(torch.eye(held.shape[1])).t(), held), name
    assert report.dequantized_dense == len(quantized - {"lm_head"}) and copy_report.dequantized_dense == 0
    tokens = list(range(3, 40))  # 37 rows: every quantized layer past its 2-row limit
    # The same fp32 weights through the same dense matmul: equal up to fp32 summation order.
    torch.testing.assert_close(_prefill_logits(lean, tokens), _prefill_logits(copy, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpu_isa.executable_levels()[-1] == "avx512", reason="bf16 serving needs AVX-512 BF16")
def test_bf16_layers_match_the_onednn_copy_within_one_rounding(tiny_gguf, monkeypatch):
    """bf16 (the AVX-512 default): nothing is packed for oneDNN beside the codes, and each quantized layer
    past its row limit gives the oneDNN copy's output to within one bf16 rounding (`_bf16_bound`: two
    fp32 sums of the same bf16 products in different orders). Whole-model logits are not compared here:
    a random model amplifies those last-bit differences over its layers."""
    from zili.layers import onednn

    if not onednn.available(torch.bfloat16):
        pytest.skip("no oneDNN bf16 matmul here")
    lean16, _ = _build(tiny_gguf, torch.bfloat16, "dequant", "avx512", monkeypatch)
    copy16, _ = _build(tiny_gguf, torch.bfloat16, "copy", "avx512", monkeypatch)
    lean_mods, copy_mods = dict(lean16.model.named_modules()), dict(copy16.model.named_modules())
    names = [n for n, m in lean_mods.items() if type(m) is Linear and m.quant is not None and n != "lm_head"]
    assert names and all(lean_mods[n].packed is None and lean_mods[n].weight.numel() == 0 for n in names)
    assert onednn.packed_only_bytes(lean16.model) < onednn.packed_only_bytes(copy16.model)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for name in names:
            lean, copy = lean_mods[name], copy_mods[name]
            assert copy.packed is not None, name
            w = lean.quant.dense_matmul(torch.eye(lean.in_features, dtype=torch.bfloat16)).t()
            x = torch.randn(37, lean.in_features, generator=gen).bfloat16()
            got, want = lean(x), copy(x)
            assert ((got.float() - want.float()).abs() <= _bf16_bound(x, w, want)).all(), name


def test_greedy_tokens_equal_with_and_without_dense_copies(tiny_gguf, monkeypatch):
    """Through the engine (fp32, this CPU's level): prefill steps past the 16-row default limit take the
    dequantize path or the copy, decode steps the same packed kernel; on the same weights, the same tokens."""
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


# The projections of the tiny GGUF that are packed from its codes (Q4_0/Q4_1/Q4_K -> int4, Q8_0 -> int8):
# fused layers' checkpoint tensors, as the loader reads them.
CODE_TENSORS = {f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"} | {
    f"model.layers.1.{p}.weight" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def _reads(monkeypatch) -> list[str]:
    """Records every tensor the GGUF loader dequantizes (by HF name)."""
    from zili.weights.gguf import GGUFCheckpoint

    read: list[str] = []
    original = GGUFCheckpoint.tensor

    def tensor(self, name, dtype=torch.float32):
        read.append(name)
        return original(self, name, dtype)
    monkeypatch.setattr(GGUFCheckpoint, "tensor", tensor)
    return read


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deferred_load_never_reads_packed_projections_dense_and_gives_the_same_logits(tiny_gguf, dtype, monkeypatch):
    """The engine's load (`defer_packed`): the projections packed from the GGUF's codes with no dense copy
    kept are never dequantized into a dense weight (the build's peak, issue 22 item 4), and the model
    is the one loaded dense then released: the same forms, the same held weights, the same logits bit for bit."""
    if dtype == torch.bfloat16 and LEVELS[-1] != "avx512":
        pytest.skip("bf16 serving needs AVX-512 BF16")
    isa = LEVELS[-1]
    old, old_report = _build(tiny_gguf, dtype, "dequant", isa, monkeypatch)
    read = _reads(monkeypatch)
    new, report = _build(tiny_gguf, dtype, "dequant", isa, monkeypatch, defer=True)
    assert read and not CODE_TENSORS & set(read)
    # The tied Q8_0 table is never read dense either: the head is packed from its codes, and lookups and
    # the head's refinement read the packed rows (the plain load reads it, then releases it).
    assert "model.embed_tokens.weight" not in read
    assert report.counts == old_report.counts and report.dequantized_dense == old_report.dequantized_dense > 0
    assert report.tied_table_released and old_report.tied_table_released
    assert new.model.model.embed_tokens.weight.numel() == 0 and not new.model.lm_head.weight_deferred
    olds, news = dict(old.model.named_modules()), dict(new.model.named_modules())
    for name, module in news.items():
        if isinstance(module, Linear):
            assert torch.equal(module.weight, olds[name].weight), name
            assert (module.packed is None) == (olds[name].packed is None), name
    tokens = list(range(3, 40))  # past every layer's 2-row limit: the dequantize path too
    assert torch.equal(_prefill_logits(new, tokens), _prefill_logits(old, tokens))
    assert torch.equal(_prefill_logits(new, tokens[:2]), _prefill_logits(old, tokens[:2]))  # the packed kernels


@pytest.mark.parametrize("dense_weights, kernels", [("copy", "zili"), ("dequant", "torch")])
def test_deferred_weights_are_loaded_where_a_dense_copy_stays(tiny_gguf, dense_weights, kernels, monkeypatch):
    """Where the dense weight is kept after all (ZILI_DENSE_WEIGHTS=copy: nothing is deferred; torch's
    packed kernels cannot dequantize: deferred, then read after packing) it is the plain load's exactly."""
    isa = LEVELS[-1]
    old, old_report = _build(tiny_gguf, torch.float32, dense_weights, isa, monkeypatch, kernels=kernels)
    read = _reads(monkeypatch)
    new, report = _build(tiny_gguf, torch.float32, dense_weights, isa, monkeypatch, defer=True, kernels=kernels)
    assert CODE_TENSORS <= set(read) and report.dequantized_dense == old_report.dequantized_dense == 0
    # Read dense in both: ZILI_DENSE_WEIGHTS=copy defers nothing (the table is released after packing, as
    # in the plain load); torch's int8 kernel cannot serve the tied table's rows exactly: deferred, then read.
    assert "model.embed_tokens.weight" in read
    assert report.tied_table_released == old_report.tied_table_released == (kernels == "zili")
    olds = dict(old.model.named_modules())
    for name, module in new.model.named_modules():
        if isinstance(module, Linear):
            assert torch.equal(module.weight, olds[name].weight), name
            assert module.weight.numel() > 0 or name == "lm_head", name  # the tied Q8_0 table is held once
    tokens = list(range(3, 40))
    assert torch.equal(_prefill_logits(new, tokens), _prefill_logits(old, tokens))
