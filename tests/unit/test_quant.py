"""Quantized weights: GGUF blocks repacked without changing a code, kernels that agree with the
dequantized weights, and the row-count switch back to dense."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from zili.layers.linear import Linear
from zili.layers.quant import GROUP, Int4Weight, Int8Weight, dequantize_group, float_group_quant, gguf_group_quant

RNG = np.random.default_rng(0)


def random_q4k(n: int, k: int) -> np.ndarray:
    blocks = RNG.integers(0, 256, (n * k // 256, 144), dtype=np.uint8)
    blocks[:, 0:4] = (RNG.random((len(blocks), 2)) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 4)
    return blocks.reshape(n, -1)


def gguf_rows(qtype: QT, n: int = 16, k: int = 512) -> np.ndarray:
    if qtype == QT.Q4_K:
        return random_q4k(n, k)
    return quantize(RNG.standard_normal((n, k)).astype(np.float32), qtype)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q4_K])
def test_gguf_blocks_decode_exactly(qtype):
    rows = gguf_rows(qtype)
    gq = gguf_group_quant(rows, qtype, (16, 512))
    assert gq.codes.min() >= 0 and gq.codes.max() <= 15
    assert np.array_equal(dequantize_group(gq).numpy(), dequantize(rows, qtype))


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q4_K])
def test_torch_int4_packing_keeps_every_code(qtype):
    """Multiplying by the identity reads the packed weight back: the codes are untouched and
    only the per-group scale and zero are rounded to bf16 (the kernel's scale type)."""
    rows = gguf_rows(qtype, n=32, k=256)
    gq = gguf_group_quant(rows, qtype, (32, 256))
    packed = Int4Weight(gq, isa="torch")
    read_back = packed.matmul(torch.eye(256, dtype=torch.bfloat16)).t().float()
    sz = packed.scales_zeros.float()  # [K/G, N, 2]
    expected = ((gq.codes.float() - 8).reshape(32, -1, GROUP) * sz[..., 0].t()[..., None]
                + sz[..., 1].t()[..., None]).reshape(32, 256)
    assert torch.equal(read_back, expected.bfloat16().float())
    # And against the GGUF's own dequantization, the only difference is that bf16 rounding.
    ref = torch.from_numpy(dequantize(rows, qtype))
    assert (read_back - ref).abs().max() <= 0.02 * ref.abs().max()


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q4_K])
def test_zili_int4_packing_keeps_every_code(qtype):
    """zili's kernel format holds the codes as they are and the scales as float16: the GGUF's own
    type for Q4_0/Q4_1 (exact), a rounding of Q4_K's scale products."""
    from zili.kernels.cpu_quant import dequantize_q4, pack_q4

    rows = gguf_rows(qtype, n=32, k=256)
    gq = gguf_group_quant(rows, qtype, (32, 256))
    back = dequantize_q4(pack_q4(gq.codes, gq.scale, gq.minimum))
    ref = torch.from_numpy(dequantize(rows, qtype))
    if qtype == QT.Q4_K:
        assert (back - ref).abs().max() <= 2e-3 * ref.abs().max()
    else:
        assert torch.equal(back, ref)


def test_int4_layer_uses_the_selected_kernel_level(monkeypatch):
    from zili.kernels import cpu_isa

    gq = float_group_quant(torch.randn(48, 96))
    x = torch.randn(2, 96)
    ref = x @ dequantize_group(gq).t()
    monkeypatch.setenv("ZILI_PACKED_KERNELS", "zili")
    for isa in cpu_isa.executable_levels():
        monkeypatch.setenv("ZILI_CPU_ISA", isa)
        layer = Int4Weight(gq)
        assert layer.isa == isa
        assert (layer.matmul(x) - ref).abs().max() < 0.03 * ref.abs().max()
    monkeypatch.setenv("ZILI_CPU_KERNELS", "0")
    assert Int4Weight(gq).isa is None  # torch's kernel


def test_float_weights_quantize_within_a_step():
    w = torch.randn(64, 128)
    gq = float_group_quant(w)
    step = gq.scale.repeat_interleave(GROUP, dim=1)
    assert ((dequantize_group(gq) - w).abs() <= step / 2 + 1e-6).all()


def test_int8_matmul_is_close():
    w = torch.randn(96, 64)
    x = torch.randn(3, 64)
    y = Int8Weight(w).matmul(x)
    ref = x @ w.t()
    assert y.dtype == x.dtype
    assert (y - ref).abs().max() < 0.03 * ref.abs().max()


def test_linear_switches_to_dense_above_max_rows():
    lin = Linear(64, [32, 32])
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 64))
    dense = lin.weight.detach().clone()
    lin.quant = Int8Weight(dense, max_rows=4)
    with torch.no_grad():
        lin.weight.zero_()  # poison the dense copy: small batches must not read it
    small, big = torch.randn(4, 64), torch.randn(5, 64)
    ref = small @ dense.t()
    assert (lin(small) - ref).abs().max() < 0.03 * ref.abs().max()
    assert torch.equal(lin(big), torch.zeros(5, 64))


@pytest.fixture(scope="module")
def smollm_pair(smollm2_fp32):
    from zili.models.loader import load_model, open_checkpoint
    from zili.models.quantize import quantize_model

    ref = smollm2_fp32  # load_model(None, dtype="float32"), shared with tests/integration/test_smollm2_gguf.py
    quant = load_model(None, dtype="bfloat16")
    counts = quantize_model(quant.model, "auto", open_checkpoint(quant.source))
    return ref, quant, counts


def _decode_argmax(loaded, prompt: list[int], continuation: list[int] | None, new_tokens: int,
                   kv_dtype: torch.dtype | None = None, backend=None):
    """Feed `prompt` one token per forward (the decode path), then either `continuation` (teacher
    forcing) or, when it is None, the model's own greedy choices. Returns (tokens fed, argmax after
    each generated-position token, and the gap between the two highest logits there). `kv_dtype`:
    the cache's element type (default the model's); `backend`: the attention backend (default sdpa)."""
    from zili.kernels.attention import AttentionMetadata

    cfg, model = loaded.config, loaded.model
    total = len(prompt) + new_tokens
    blocks = -(-total // 16)
    kv_dtype = kv_dtype or loaded.dtype
    caches = [torch.zeros(cfg.kv_cache_shape(blocks, 16, kv_dtype), dtype=kv_dtype) for _ in range(cfg.num_hidden_layers)]
    seq, preds, margins = list(prompt), [], []
    with torch.inference_mode():
        for pos in range(total - 1):
            meta = AttentionMetadata.build([1], [pos + 1], [list(range(blocks))], 16, backend=backend)
            hidden = model(torch.tensor([seq[pos]]), torch.tensor([pos]), caches, meta)
            if pos < len(prompt) - 1:
                continue
            logits = model.compute_logits(hidden)[0]
            pred = int(logits.argmax())
            top2 = logits.topk(2).values
            preds.append(pred)
            margins.append(float(top2[0] - top2[1]))
            if len(seq) < total:
                seq.append(continuation[len(seq) - len(prompt)] if continuation is not None else pred)
    return seq, preds, margins


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at",
           "<|im_start|>user\nName three fruits.<|im_end|>\n<|im_start|>assistant\n",
           "Once upon a time, in a small village,", "import numpy as np\n",
           "The theory of relativity states that",
           "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def fp32_greedy(smollm_pair):
    """The fp32 model's own greedy continuation of each prompt: (prompt, sequence, argmaxes, top-2 gaps)."""
    ref = smollm_pair[0]
    runs = []
    for p in PROMPTS:
        prompt = ref.tokenizer.encode(p)
        runs.append((prompt, *_decode_argmax(ref, prompt, None, 32)))
    return runs


def _assert_agrees(quant, fp32_greedy, min_agreement: float = 0.98) -> None:
    pairs, margins = [], []
    for prompt, seq, want, gaps in fp32_greedy:  # teacher-forced through the quantized model
        _, got, _ = _decode_argmax(quant, prompt, seq[len(prompt):], 32)
        pairs += list(zip(want, got))
        margins += gaps
    assert len(pairs) == len(PROMPTS) * 32
    agreement = sum(w == g for w, g in pairs) / len(pairs)
    # Measured 98.8-99.6% depending on the attention kernel's bf16 rounding (not on quantization):
    # the disagreements are near-ties of the fp32 reference. Where the reference's top two logits
    # are at least 0.5 apart, every choice must agree.
    assert agreement >= min_agreement, agreement
    clear = [(w, g) for (w, g), m in zip(pairs, margins) if m >= 0.5]
    assert len(clear) >= 0.6 * len(pairs)  # 73% of these 256 positions
    assert all(w == g for w, g in clear), [m for (w, g), m in zip(pairs, margins) if w != g]


def test_smollm2_quantized_agrees_with_fp32_reference(smollm_pair, fp32_greedy):
    _, quant, counts = smollm_pair
    # The GGUF's 4-bit projections stay 4-bit; the tied Q8_0 head becomes int8, never int4.
    assert counts == {"int4": 30 * 4, "int8": 1}
    assert type(quant.model.lm_head.quant).__name__ == "Int8Weight"
    _assert_agrees(quant, fp32_greedy)


def _kernel_levels() -> list[str]:
    from zili.kernels import cpu_isa

    return cpu_isa.executable_levels()


@pytest.mark.parametrize("isa", _kernel_levels())
def test_smollm2_agrees_on_every_kernel_level(isa, fp32_greedy, monkeypatch):
    """Each CPU kernel level (forced with ZILI_CPU_ISA) at the dtype the platform picks for it
    (bf16 with AVX-512, fp32 below: no emulated bf16), int8 activations in the packed matmuls."""
    from zili.layers.quant_calibration import KernelChoice, shape_key
    from zili.models.loader import load_model, open_checkpoint
    from zili.models.quantize import quantize_and_calibrate
    from zili.platforms.cpu import CpuPlatform

    monkeypatch.setenv("ZILI_CPU_ISA", isa)
    dtype = CpuPlatform().default_dtype()
    assert (dtype == torch.bfloat16) == (isa == "avx512")
    quant = load_model(None, dtype=str(dtype).removeprefix("torch."))
    # The level reaches the layers the way the engine applies a tune entry or a calibration's choice:
    # per layer shape (SmolLM2's four int4 projections and its int8 head).
    shapes = {("int4", 960, 576), ("int4", 576, 576), ("int4", 3072, 576), ("int4", 576, 1536), ("int8", 49152, 576)}
    report = quantize_and_calibrate(quant.model, "auto", dtype, "cpu-packed", lambda: open_checkpoint(quant.source),
                                    tuned_kernels={shape_key(*s, dtype): KernelChoice(isa, 16) for s in shapes},
                                    calibrate=False)
    assert set(report.how.values()) == {"tune cache"}
    levels = {m.quant.isa for m in quant.model.modules() if getattr(m, "quant", None) is not None}
    assert levels == {isa}
    # The bar issue #22 sets for every path: every position where the fp32 reference's top two
    # logits are >= 0.5 apart agrees (checked inside). Overall, int8-per-32 activations (llama.cpp's
    # Q8 scheme) flip more near-ties than bf16 activations: 96.1% measured on avx512 and avx2
    # (2026-11-29) against 98.8-99.6% on torch's bf16 kernels, so the overall floor here is 95%. The
    # engine runs them where the tune cache or its start-up calibration measured them faster.
    _assert_agrees(quant, fp32_greedy, min_agreement=0.95)


def test_refined_logits_match_fp32_at_the_top():
    from zili.models.base import refine_top_logits

    torch.manual_seed(0)
    w = torch.randn(500, 64).bfloat16()
    h = torch.randn(3, 64).bfloat16()
    exact = h.float() @ w.float().t()
    approx = (h @ w.t()).float()  # bf16 output: rounded
    assert not torch.equal(approx.topk(4).values, exact.topk(4).values)
    refine_top_logits(approx, h, w, 8)
    top = exact.topk(4)
    assert torch.equal(approx.topk(4).indices, top.indices)
    torch.testing.assert_close(approx.topk(4).values, top.values)


@pytest.fixture(scope="module")
def bf16_cache_greedy(smollm_pair):
    """The bf16 (int4-weight) model's own greedy continuations with a bf16 KV cache."""
    quant = smollm_pair[1]
    return [(prompt, *_decode_argmax(quant, prompt, None, 32)) for prompt in map(quant.tokenizer.encode, PROMPTS)]


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_smollm2_quantized_kv_cache_agrees_with_the_bf16_cache(smollm_pair, bf16_cache_greedy, kv_dtype):
    """Issue 20's bar for a quantized KV cache: top-1 agreement with the bf16 cache >= 99% over the
    positions where the bf16 model's top two logits are >= 0.5 apart (teacher-forced on its greedy text)."""
    from zili.config import kv_cache_torch_dtype

    quant = smollm_pair[1]
    dtype = kv_cache_torch_dtype(kv_dtype, torch.bfloat16)
    clear, agree = 0, 0
    for prompt, seq, want, gaps in bf16_cache_greedy:
        _, got, _ = _decode_argmax(quant, prompt, seq[len(prompt):], 32, kv_dtype=dtype)
        for w, g, gap in zip(want, got, gaps):
            if gap >= 0.5:
                clear += 1
                agree += w == g
    assert clear >= 0.6 * len(PROMPTS) * 32
    assert agree / clear >= 0.99, (agree, clear)


def test_q8_packing_in_chunks_equals_one_piece_and_rows_read_back(monkeypatch):
    """pack_q8 packs a bounded number of rows at a time; the blocks are those of packing the whole
    weight at once (written out here), and q8_rows gathers exact dequantized rows from them."""
    from zili.kernels import cpu_quant

    w = torch.randn(70, 80)  # N and K both padded (to 80 and 96)
    n, k, kb = 70, 80, 3
    full = torch.nn.functional.pad(w, (0, kb * GROUP - k, 0, 80 - n)).reshape(80, kb, GROUP)
    d = (full.abs().amax(dim=-1) / 127).to(torch.float16)
    inv = torch.where(d.float() > 0, 1 / d.float(), torch.zeros(1))
    codes = torch.round(full * inv[..., None]).clamp(-127, 127)
    monkeypatch.setattr(cpu_quant, "PACK_CHUNK_ROWS", 32)
    p = cpu_quant.pack_q8(w)
    back = cpu_quant.dequantize_q8(p)
    assert torch.equal(back, (codes * d.float()[..., None]).reshape(80, kb * GROUP)[:n, :k])
    ids = torch.tensor([[0, 69], [17, 16]])
    assert torch.equal(cpu_quant.q8_rows(p, ids), back[ids])
    assert cpu_quant.q8_rows(p, ids, torch.bfloat16).dtype == torch.bfloat16


def test_q8_0_blocks_are_packed_without_a_float_round_trip():
    """GGUF Q8_0 codes and scales go into the kernel's blocks as they are: its rows are the
    file's exact values (a bf16 weight repacked would have moved some codes by one)."""
    from zili.kernels.cpu_quant import dequantize_q8, pack_q8_codes

    rows = gguf_rows(QT.Q8_0, n=40, k=96)
    blocks = rows.reshape(40, 3, 34)
    d = torch.from_numpy(np.ascontiguousarray(blocks[..., :2]).view(np.float16).reshape(40, 3))
    codes = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(40, 96))
    assert torch.equal(dequantize_q8(pack_q8_codes(codes, d)), torch.from_numpy(dequantize(rows, QT.Q8_0)))
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_q8_codes(codes[:, :90], d)


@pytest.mark.parametrize("n, vocab, k", [(1, 49152, 8), (3, 1000, 8), (2, 64 * 40 + 17, 5), (4, 30, 8), (2, 512, 1)])
def test_top_k_indices_finds_torch_topk_values(n, vocab, k):
    """The two-stage top-k (chunk maxima, then the best chunks' elements and the tail) returns the values
    torch.topk returns, including rows whose largest values crowd into one chunk or sit in the tail."""
    from zili.models.base import TOP_K_CHUNK, top_k_indices

    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(n, vocab, generator=gen)
    logits[0, 5 * TOP_K_CHUNK:5 * TOP_K_CHUNK + k] += 50.0  # all of row 0's top k in one chunk
    if n > 1:
        logits[1, -3:] += 60.0  # row 1's best three in the tail (when V % TOP_K_CHUNK leaves one)
    got = top_k_indices(logits, k)
    assert got.shape == (n, min(k, vocab))
    want = logits.topk(min(k, vocab), dim=-1).values
    assert torch.equal(logits.gather(1, got).sort(-1, descending=True).values, want)
