"""Cases for the Triton attention kernels under TRITON_INTERPRET=1, against the torch reference, at
small shapes: the cache write, prefill over variable-length chunks with a cached prefix (mixed with
decode rows), decode with and without context splits, MLA decode over the latent cache, the same
over int8 / fp8 caches (kv_quant's rows: the write kernel's bytes equal quantize_rows', attention
equals the torch reference's over the dequantized cache), and tiny models generating the same greedy
tokens through either backend.

The interpreter must be on before triton is first imported (triton's own library functions are
built at import), and other tests import it earlier (transformers does), so this file runs in a
fresh process: test_triton_kernels.py starts it. By hand:
    TRITON_INTERPRET=1 python -m pytest tests/unit/test_triton_cases.py
On a GPU the same cases run compiled on the device (`make test-gpu` does this):
    ZILI_TEST_DEVICE=cuda python -m pytest tests/unit/test_triton_cases.py
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("ZILI_TEST_DEVICE", "cpu")
if os.environ.get("TRITON_INTERPRET") != "1" and DEVICE == "cpu":
    pytest.skip("runs in its own process under TRITON_INTERPRET=1 (test_triton_kernels.py starts it)",
                allow_module_level=True)
import triton  # noqa: E402,F401

from zili.kernels.attention import AttentionMetadata, sdpa_paged_attention  # noqa: E402
from zili.kernels.attention import write_kv_cache as reference_write  # noqa: E402
from zili.kernels.kv_quant import dequantize_rows, quantize_latent_rows, quantize_rows  # noqa: E402
from zili.kernels.mla_attention import mla_decode_absorbed  # noqa: E402

QUANTIZED = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}


@pytest.fixture(scope="module")
def kernels():
    from zili.kernels import triton_attention, triton_mla

    assert triton_attention.interpreting() == (DEVICE == "cpu"), \
        "on the CPU, triton was imported before TRITON_INTERPRET=1 was set"
    return triton_attention, triton_mla


def make_batch(query_lens, seq_lens, *, heads=4, kv_heads=2, head_dim=32, page=16, num_blocks=24,
               dtype=torch.float32, seed=0):
    """Random cache, queries and new K/V; block tables are a shuffled, non-contiguous assignment."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for s in seq_lens:
        n = -(-s // page)
        tables.append(order[used:used + n])
        used += n
    assert used <= num_blocks
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, page, DEVICE)
    T = sum(query_lens)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    cache = rand(2, num_blocks, page, kv_heads, head_dim)
    return meta, cache, rand(T, heads, head_dim), rand(T, kv_heads, head_dim), rand(T, kv_heads, head_dim)


def tol(dtype):
    return dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def test_write_kv_cache_matches_and_skips_padding(kernels):
    ta, _ = kernels
    meta, cache, _, k, v = make_batch([3, 1], [19, 7], head_dim=24, page=8)
    expected, got = cache.clone(), cache.clone()
    reference_write(k, v, expected, meta.slot_mapping)
    ta.write_kv_cache(k, v, got, meta.slot_mapping)
    assert torch.equal(expected, got)
    padded = torch.cat([meta.slot_mapping, torch.tensor([-1], device=DEVICE)])
    before = got.clone()
    ta.write_kv_cache(torch.cat([k, k[:1]]), torch.cat([v, v[:1]]), got, padded)  # row 4: slot -1
    assert torch.equal(before, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page,block_m,block_n", [(16, 16, 32), (8, 32, 16)])
def test_prefill_with_prefix_and_decode_rows(kernels, dtype, page, block_m, block_n):
    """Three chunks: a fresh prompt, a decode row, a chunk over a 30-token cached prefix (GQA 2)."""
    ta, _ = kernels
    meta, cache, q, k, v = make_batch([5, 1, 20], [5, 41, 50], head_dim=24, page=page, num_blocks=28, dtype=dtype)
    c_ref, c_tri = cache.clone(), cache.clone()
    expected = sdpa_paged_attention(q, k, v, c_ref, meta, 0.3)
    ta.write_kv_cache(k, v, c_tri, meta.slot_mapping)
    got = ta.paged_prefill(q, c_tri, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                           max(meta.query_lens_cpu), 0.3, block_m=block_m, block_n=block_n)
    assert torch.equal(c_ref, c_tri)
    torch.testing.assert_close(got.float(), expected.float(), **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 2, 4])
def test_decode_matches_reference(kernels, dtype, splits):
    ta, _ = kernels
    meta, cache, q, k, v = make_batch([1, 1, 1], [3, 70, 17], heads=8, kv_heads=2, dtype=dtype, num_blocks=12)
    expected = sdpa_paged_attention(q, k, v, cache.clone(), meta, 0.125)
    ta.write_kv_cache(k, v, cache, meta.slot_mapping)
    got = ta.paged_decode(q, cache, meta.block_tables, meta.seq_lens, 0.125, splits=splits, block_n=16)
    torch.testing.assert_close(got.float(), expected.float(), **tol(dtype))


# Every window in float32; bf16 (only the dots' operand type changes) at one window.
@pytest.mark.parametrize("dtype,window", [(torch.float32, 1), (torch.float32, 7), (torch.float32, 20),
                                          (torch.bfloat16, 7)])
def test_sliding_window_prefill_and_decode_match_reference(kernels, dtype, window):
    """A sliding layer's window (shorter than the contexts, not a multiple of the tile or page) in
    prefill chunks over a cached prefix, in decode with and without context splits; the torch
    reference applies the same window (tests/unit/test_sliding_window.py checks it against a mask)."""
    ta, _ = kernels
    meta, cache, q, k, v = make_batch([5, 1, 20], [5, 41, 50], head_dim=24, page=8, num_blocks=28, dtype=dtype)
    c_ref, c_tri = cache.clone(), cache.clone()
    expected = sdpa_paged_attention(q, k, v, c_ref, meta, 0.3, window=window)
    got = ta.paged_attention(q, k, v, c_tri, meta, 0.3, window=window)
    torch.testing.assert_close(got.float(), expected.float(), **tol(dtype))
    dmeta, dcache, dq, dk, dv = make_batch([1, 1, 1], [3, 70, 17], heads=8, kv_heads=2, dtype=dtype, num_blocks=12)
    expected = sdpa_paged_attention(dq, dk, dv, dcache.clone(), dmeta, 0.125, window=window)
    ta.write_kv_cache(dk, dv, dcache, dmeta.slot_mapping)
    for splits in (1, 4):
        got = ta.paged_decode(dq, dcache, dmeta.block_tables, dmeta.seq_lens, 0.125, splits=splits, block_n=16,
                              window=window)
        torch.testing.assert_close(got.float(), expected.float(), **tol(dtype))


def test_decode_padded_row_gives_zeros(kernels):
    """A captured graph pads the batch with rows of context length 0: finite zeros, not NaN."""
    ta, _ = kernels
    meta, cache, q, _, _ = make_batch([1, 1], [9, 20], heads=2, kv_heads=2)
    seq_lens = meta.seq_lens.clone()
    seq_lens[1] = 0
    for splits in (1, 2):
        got = ta.paged_decode(q, cache, meta.block_tables, seq_lens, 0.2, splits=splits, block_n=16)
        assert torch.equal(got[1], torch.zeros_like(got[1]))
        assert torch.isfinite(got).all()


def test_backend_entry_point_mixed_batch(kernels):
    ta, _ = kernels
    meta, cache, q, k, v = make_batch([4, 1], [12, 33])
    c_ref, c_tri = cache.clone(), cache.clone()
    torch.testing.assert_close(ta.paged_attention(q, k, v, c_tri, meta, 0.2),
                               sdpa_paged_attention(q, k, v, c_ref, meta, 0.2), **tol(torch.float32))
    decode = AttentionMetadata.build([1, 1], [13, 34], [meta.block_tables[0].tolist(), meta.block_tables[1].tolist()], 16,
                                     DEVICE)
    q1, k1, v1 = q[:2], k[:2] * 2, v[:2] * 2
    torch.testing.assert_close(ta.paged_attention(q1, k1, v1, c_tri, decode, 0.2),
                               sdpa_paged_attention(q1, k1, v1, c_ref, decode, 0.2), **tol(torch.float32))


def make_mla(seq_lens, *, heads=4, rank=32, d_rope=16, d_nope=24, d_v=20, page=16, num_blocks=10, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(-(-s // page) for s in seq_lens)
    tables, used = [], 0
    for s in seq_lens:
        n = -(-s // page)
        tables.append(order[used:used + n] + [0] * (width - n))
        used += n

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)

    B = len(seq_lens)
    return (rand(B, heads, d_nope), rand(B, heads, d_rope), rand(num_blocks, page, rank + d_rope),
            torch.tensor(tables, device=DEVICE), torch.tensor(seq_lens, device=DEVICE),
            rand(heads, d_nope + d_v, rank, scale=0.2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 2])
def test_mla_decode_matches_reference(kernels, dtype, splits):
    _, tm = kernels
    q_nope, q_rope, cache, tables, seq_lens, w = make_mla([5, 33, 17], dtype=dtype)
    expected = mla_decode_absorbed(q_nope, q_rope, cache, tables, seq_lens, 33, w, 0.1)
    q_latent = torch.einsum("bhd,hdr->bhr", q_nope, w[:, :24])
    latent = tm.mla_decode_latent(q_latent, q_rope, cache, tables, seq_lens, 0.1, splits=splits, block_n=16)
    got = torch.einsum("bhr,hvr->bhv", latent, w[:, 24:])
    torch.testing.assert_close(got.float(), expected.float(), **tol(dtype))
    if splits == 1:
        torch.testing.assert_close(tm.mla_decode(q_nope, q_rope, cache, tables, seq_lens, 33, w, 0.1).float(),
                                   expected.float(), **tol(dtype))


# ---- quantized caches (zili.kernels.kv_quant) ------------------------------------------------------


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_quantized_write_stores_the_reference_bytes(kernels, name):
    """The write kernel's int8 / fp8 rows and bf16 scales are quantize_rows' bytes: rows spanning
    11 decades, exact rounding ties, zero and negative-zero rows, and a padded row (slot -1) skipped."""
    ta, _ = kernels
    gen = torch.Generator().manual_seed(7)
    T, n_kv, d = 12, 2, 24
    k = torch.randn(T, n_kv, d, generator=gen) * torch.logspace(-6, 5, T)[:, None, None]
    k[1] = (k[1] * 4).round() / 4  # halves and quarters: ties for the int8 grid
    k[2, 0], k[2, 1] = 0.0, -0.0
    k[3] = torch.linspace(-448, 448, d) / 448 * 3.0  # e4m3's grid points and the ties between them
    v = torch.randn(T, n_kv, d, generator=gen)
    cache = torch.zeros(2, 6, 8, n_kv, d + 2, dtype=QUANTIZED[name], device=DEVICE)
    slots = torch.tensor([5, 40, 3, 17, 0, 9, 22, 31, 47, 12, 29, -1], device=DEVICE)
    k, v = k.to(DEVICE), v.to(DEVICE)
    expected = cache.clone()
    reference_write(k[:-1], v[:-1], expected, slots[:-1])
    ta.write_kv_cache(k, v, cache, slots)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))


def _quantized(cache: torch.Tensor, name: str) -> torch.Tensor:
    """A float cache's values as packed int8 / fp8 rows, rows scaled differently so scales matter."""
    rows = cache.float() * torch.logspace(-1, 1, cache.shape[2], device=cache.device)[:, None, None]
    return quantize_rows(rows, QUANTIZED[name])


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_quantized_prefill_and_decode_match_the_reference(kernels, name):
    """Over an int8 / fp8 cache: a mixed step through the backend entry point (prefill kernel) and
    decode with and without splits, a sliding window too, against the torch reference, which
    attends over the dequantized rows; both write the step's rows first and agree on every byte."""
    ta, _ = kernels
    meta, cache, q, k, v = make_batch([5, 1, 20], [5, 41, 50], head_dim=24, page=8, num_blocks=28)
    cache = _quantized(cache, name)
    c_ref, c_tri = cache.clone(), cache.clone()
    expected = sdpa_paged_attention(q, k, v, c_ref, meta, 0.3)
    got = ta.paged_attention(q, k, v, c_tri, meta, 0.3)
    assert torch.equal(c_ref.view(torch.uint8), c_tri.view(torch.uint8))
    torch.testing.assert_close(got, expected, **tol(torch.float32))
    dmeta, dcache, dq, dk, dv = make_batch([1, 1, 1], [3, 70, 17], heads=8, kv_heads=2, num_blocks=12)
    dcache = _quantized(dcache, name)
    for window in (None, 20):
        expected = sdpa_paged_attention(dq, dk, dv, dcache.clone(), dmeta, 0.125, window=window)
        if window is None:
            ta.write_kv_cache(dk, dv, dcache, dmeta.slot_mapping)
        for splits in (1, 4):
            got = ta.paged_decode(dq, dcache, dmeta.block_tables, dmeta.seq_lens, 0.125, splits=splits, block_n=16,
                                  window=window)
            torch.testing.assert_close(got, expected, **tol(torch.float32))


def test_quantized_decode_bf16_queries(kernels):
    """bf16 queries over an int8 cache (the GPU's case: tiles converted to bf16 for the dot)."""
    ta, _ = kernels
    meta, cache, q, k, v = make_batch([1, 1], [9, 40], heads=4, kv_heads=2, num_blocks=8)
    cache = _quantized(cache, "int8")
    q = q.bfloat16()
    ta.write_kv_cache(k, v, cache, meta.slot_mapping)
    dense = dequantize_rows(cache, torch.float32)
    expected = sdpa_paged_attention(q.float(), k[:0], v[:0], dense, _no_new_rows(meta), 0.125)
    got = ta.paged_decode(q, cache, meta.block_tables, meta.seq_lens, 0.125, splits=2, block_n=16)
    torch.testing.assert_close(got.float(), expected, **tol(torch.bfloat16))


def test_quantized_decode_fp16_queries_keep_small_values(kernels):
    """fp16 queries over an int8 cache of small values (|v| ~ 1e-4, 1e-5: scales ~1e-7) and near-flat
    scores: the error is that of rounding the exact answer to fp16, not more (P diag(scale) cast to fp16
    fell to subnormals and lost 2-3x that)."""
    ta, _ = kernels
    gen = torch.Generator().manual_seed(0)
    S, D, page = 256, 32, 16
    for small in (1e-4, 1e-5):
        rows = [torch.randn(S, D, generator=gen) * scale for scale in (0.02, small)]  # keys, values
        cache = torch.stack([quantize_rows(r, torch.int8).view(S // page, page, 1, D + 2) for r in rows]).to(DEVICE)
        q = torch.randn(1, 1, D, generator=gen).to(DEVICE)
        k, v = (dequantize_rows(c.view(S, D + 2), torch.float32) for c in cache)
        exact = torch.softmax(q[0] @ k.T / D**0.5, -1) @ v
        tables, lens = torch.arange(S // page, device=DEVICE)[None], torch.tensor([S], device=DEVICE)
        got = ta.paged_decode(q.half(), cache, tables, lens, 1 / D**0.5, splits=1)[0].float()
        err = ((got - exact).norm() / exact.norm()).item()
        floor = ((exact.half().float() - exact).norm() / exact.norm()).item()
        assert err <= 1.1 * floor + 1e-4, (small, err, floor)


def _no_new_rows(meta: AttentionMetadata) -> AttentionMetadata:
    """The same step with nothing left to write (the rows are in the cache already)."""
    import dataclasses

    return dataclasses.replace(meta, slot_mapping=meta.slot_mapping[:0])


@pytest.mark.parametrize("name", list(QUANTIZED))
@pytest.mark.parametrize("splits", [1, 2])
def test_quantized_mla_decode_matches_reference(kernels, name, splits):
    """MLA decode over packed latent rows (two scales: the latent's, the rope key's) against the torch
    reference over the same cache; the rope part is scaled 20x so a shared scale would show."""
    _, tm = kernels
    q_nope, q_rope, cache, tables, seq_lens, w = make_mla([5, 33, 17])
    cache = quantize_latent_rows(cache[..., :32], cache[..., 32:] * 20, QUANTIZED[name])
    assert cache.shape[-1] == 32 + 16 + 4
    expected = mla_decode_absorbed(q_nope, q_rope, cache, tables, seq_lens, 33, w, 0.1)
    q_latent = torch.einsum("bhd,hdr->bhr", q_nope, w[:, :24])
    latent = tm.mla_decode_latent(q_latent, q_rope, cache, tables, seq_lens, 0.1, splits=splits, block_n=16)
    torch.testing.assert_close(torch.einsum("bhr,hvr->bhv", latent, w[:, 24:]), expected, **tol(torch.float32))


def test_tiny_deepseek_int8_cache_same_greedy_tokens_through_triton(kernels, tmp_path, monkeypatch):
    """A one-layer DeepSeek-V3 with an int8 latent cache: the engine's MLA decode runs the backend's
    kernel (Triton's here, the torch reference under sdpa) and both give the same greedy tokens."""
    from tests.tiny_models import write_tiny_deepseek
    from zili import LLM, SamplingParams
    from zili.platforms.cpu import CpuPlatform

    tiny = write_tiny_deepseek(tmp_path / "ds", num_hidden_layers=1)
    monkeypatch.setenv("ZILI_TUNE_CACHE", str(tmp_path / "none.json"))
    if DEVICE == "cpu":
        monkeypatch.setattr(CpuPlatform, "attention_backends", lambda self: ["sdpa", "triton"])
    calls = {"n": 0}
    _, tm = kernels
    inner = tm.mla_decode_latent

    def counting(*args, **kw):
        calls["n"] += 1
        return inner(*args, **kw)

    monkeypatch.setattr(tm, "mla_decode_latent", counting)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outs = {}
    for name in ("sdpa", "triton"):
        llm = LLM(str(tiny), dtype="float32", attention_backend=name, kv_cache_dtype="int8", kv_cache_memory=2**20,
                  threads=1)
        assert llm.engine.runner.kv_caches[0].dtype == torch.int8
        outs[name] = [o.outputs[0].token_ids for o in llm.generate(["Hello there", "abc"], params, use_tqdm=False)]
    assert calls["n"] >= 3  # the decode steps went through the Triton kernel
    assert outs["triton"] == outs["sdpa"]


def test_tiny_llama_same_greedy_tokens_through_triton(kernels, tmp_path, monkeypatch):
    """The model calls paged_attention unchanged; the chosen backend runs underneath."""
    from tests.tiny_models import write_tiny_llama
    from zili import LLM, SamplingParams
    from zili.platforms.cpu import CpuPlatform

    tiny = write_tiny_llama(tmp_path / "tiny", num_hidden_layers=1)
    monkeypatch.setenv("ZILI_TUNE_CACHE", str(tmp_path / "none.json"))
    if DEVICE == "cpu":  # on a GPU the platform lists triton itself
        monkeypatch.setattr(CpuPlatform, "attention_backends", lambda self: ["sdpa", "triton"])
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompts = ["Hello there", "abc"]
    outs = {}
    for name in ("sdpa", "triton"):
        llm = LLM(str(tiny), dtype="float32", attention_backend=name, kv_cache_memory=2**20, threads=1)
        assert llm.engine.runner.attention.name == name  # the runner owns its backend: no process-wide one
        outs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs["triton"] == outs["sdpa"]


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_tiny_llama_quantized_cache_rows_are_padded_for_triton(kernels, tmp_path, monkeypatch, name):
    """The Triton backend's int8 / fp8 rows sit at a 16-byte stride (aligned vector loads) behind a view of
    the packed row's width: the same greedy tokens as torch's attention over packed rows, and a pool
    sized by the padded bytes."""
    from tests.tiny_models import write_tiny_llama
    from zili import LLM, SamplingParams
    from zili.engine.runner import kv_bytes_per_block
    from zili.platforms.cpu import CpuPlatform

    tiny = write_tiny_llama(tmp_path / "tiny", num_hidden_layers=2)
    monkeypatch.setenv("ZILI_TUNE_CACHE", str(tmp_path / "none.json"))
    if DEVICE == "cpu":
        monkeypatch.setattr(CpuPlatform, "attention_backends", lambda self: ["sdpa", "triton"])
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = ["Hello there", "abc abc abc", "The quick brown fox"]
    outs, blocks = {}, {}
    for backend in ("sdpa", "triton"):
        llm = LLM(str(tiny), dtype="float32", attention_backend=backend, kv_cache_dtype=name, kv_cache_memory=2**20,
                  threads=1, enforce_eager=True)
        cache = llm.engine.runner.kv_caches[0]
        d = llm.engine.model_config.head_dim
        assert cache.dtype == QUANTIZED[name] and cache.shape[-1] == d + 2
        assert cache.stride(3) == (-(-(d + 2) // 16) * 16 if backend == "triton" else d + 2)
        blocks[backend] = llm.engine.kv_cache.num_blocks
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs["triton"] == outs["sdpa"]
    mc = llm.engine.model_config
    assert blocks["triton"] == 2**20 // kv_bytes_per_block(mc, llm.engine.config.block_size, QUANTIZED[name], 16)
    assert blocks["triton"] < blocks["sdpa"]
