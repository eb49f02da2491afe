"""Cases for the Triton attention kernels under TRITON_INTERPRET=1, against the torch reference, at
small shapes: the cache write, prefill over variable-length chunks with a cached prefix (mixed with
decode rows), decode with and without context splits, MLA decode over the latent cache, and a tiny
model generating the same greedy tokens through either backend.

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
from zili.kernels.mla_attention import mla_decode_absorbed  # noqa: E402


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [1, 7, 20])
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
