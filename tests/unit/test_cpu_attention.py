"""zili's C++ paged decode kernel against the torch reference (gather + SDPA), and the "cpp"
attention backend inside the engine: batched == alone, eager and compiled."""

from __future__ import annotations

import json

import pytest
import torch

from tests.tiny_models import write_tiny_llama
from zili import LLM, SamplingParams
from zili.engine.runner import kv_bytes_per_block
from zili.kernels import cpu_attention
from zili.kernels.attention import AttentionMetadata, sdpa_paged_attention


def test_kernel_builds_here():
    assert cpu_attention.available()  # gcc and ninja are part of the set-up


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (6, 2), (9, 3), (16, 2)])
@pytest.mark.parametrize("d", [32, 24])  # 32: the AVX-512 path (16-lane chunks); 24: the portable one
def test_decode_matches_reference(dtype, n_heads, n_kv, d):
    gen = torch.Generator().manual_seed(n_heads * 10 + n_kv)
    block_size, num_blocks = 4, 64
    lens = [1, 4, 5, 17, 40, 3]  # single token, exactly one block, block + 1, several blocks
    order, tables = torch.randperm(num_blocks, generator=gen).tolist(), []
    for n in lens:  # disjoint blocks in a random order
        tables.append(order[: -(-n // block_size)])
        order = order[len(tables[-1]):]
    meta = AttentionMetadata.build([1] * len(lens), lens, tables, block_size)
    cache = torch.randn(2, num_blocks, block_size, n_kv, d, generator=gen).to(dtype)
    q = torch.randn(len(lens), n_heads, d, generator=gen).to(dtype)
    k = torch.randn(len(lens), n_kv, d, generator=gen).to(dtype)
    v = torch.randn(len(lens), n_kv, d, generator=gen).to(dtype)
    want = sdpa_paged_attention(q, k, v, cache.clone(), meta, 0.2)
    cache_after = cache.clone()
    from zili.kernels.attention import cpu_paged_attention

    got = cpu_paged_attention(q, k, v, cache_after, meta, 0.2)  # writes k/v first, like the reference
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    slots = meta.slot_mapping
    flat = cache_after.view(2, -1, n_kv, d)
    assert torch.equal(flat[0, slots], k) and torch.equal(flat[1, slots], v)


def _gathered_reference(q, cache, tables, lens, scale):
    """fp64 attention over each sequence's gathered context: the oracle for the kernel."""
    out = []
    block_size = cache.shape[2]
    for b, n in enumerate(lens):
        slots = torch.tensor([tables[b][s // block_size] * block_size + s % block_size for s in range(n)])
        flat = cache.double().flatten(1, 2)  # [2, NB*BS, KVH, D]
        k, v = flat[0, slots], flat[1, slots]  # [n, KVH, D]
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[b].double() * scale, k), dim=-1)
        out.append(torch.einsum("hn,nhd->hd", w, v))
    return torch.stack(out)


@pytest.mark.parametrize("group", [1, 3, 4, 7, 8])
@pytest.mark.parametrize("d,block_size", [(64, 16), (128, 16), (64, 8), (64, 4)])
def test_bf16_specialised_kernel(group, d, block_size):
    """bf16 caches with D 64/128 and block sizes divisible by 8 take the specialised path (bf16
    dot-product scores, vector softmax, prefetch); block size 4 takes the generic one. Both must
    match fp64 attention on the same bf16 values, for contexts that are not a multiple of 8, with
    work split by sequence (the batch) and by KV head (one sequence)."""
    assert cpu_attention.available()
    gen = torch.Generator().manual_seed(group * 1000 + d + block_size)
    n_kv, num_blocks = 2, 96
    lens = [1, 7, 8, 9, 33, 200]
    order, tables = torch.randperm(num_blocks, generator=gen).tolist(), []
    for n in lens:
        tables.append(order[: -(-n // block_size)])
        order = order[len(tables[-1]):]
    width = max(len(t) for t in tables)
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    cache = (torch.randn(2, num_blocks, block_size, n_kv, d, generator=gen) * 2).to(torch.bfloat16)
    q = (torch.randn(len(lens), n_kv * group, d, generator=gen) * 2).to(torch.bfloat16)
    scale = d ** -0.5  # not a power of two at d=128: the scale is applied to fp32 scores
    for rows in (slice(None), slice(0, 1)):  # the whole batch, and one sequence (split over KV heads)
        got = cpu_attention.paged_decode(q[rows], cache, table_t[rows], torch.tensor(lens)[rows], scale)
        want = _gathered_reference(q[rows], cache, tables[rows], lens[rows], scale)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)


def test_vector_softmax_handles_extreme_scores():
    """Scores spread over hundreds of units (exp underflows for most) and exact ties: the output is
    the value row(s) the softmax selects, with no NaN."""
    assert cpu_attention.available()
    d, block_size = 64, 16
    cache = torch.zeros(2, 4, block_size, 1, d, dtype=torch.bfloat16)
    q = torch.zeros(1, 1, d, dtype=torch.bfloat16)
    q[0, 0, 0] = 1.0
    keys = torch.linspace(-400, 0, 40)
    keys[17] = keys[23] = 100.0  # two equal winners
    flat = cache.view(2, -1, 1, d)
    flat[0, :40, 0, 0] = keys.to(torch.bfloat16)
    flat[1, :40, 0, 1] = torch.arange(40, dtype=torch.float32).to(torch.bfloat16)
    out = cpu_attention.paged_decode(q, cache, torch.tensor([[0, 1, 2]]), torch.tensor([40]), 1.0)
    assert torch.isfinite(out.float()).all()
    assert out[0, 0, 1].item() == pytest.approx(20.0, abs=0.2)  # the mean of positions 17 and 23


def test_padded_rows_are_zero():
    cache = torch.randn(2, 8, 4, 2, 16)
    q = torch.randn(2, 4, 16)
    out = cpu_attention.paged_decode(q, cache, torch.tensor([[1, 2], [0, 0]]), torch.tensor([6, 0]), 0.25)
    assert torch.equal(out[1], torch.zeros(4, 16))
    assert out[0].abs().sum() > 0


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-cpu-attn"))


@pytest.mark.parametrize("eager", [True, False])
def test_engine_batched_equals_alone_and_sdpa(tiny_dir, eager):
    from zili.kernels.backends import use_attention_backend
    from zili.models.hf_config import model_config_from_hf

    cfg = model_config_from_hf(json.loads((tiny_dir / "config.json").read_text()))
    prompts = ["Hello there", "The capital of France is", "def fib(n):", "你好，世界", "a b c d e f g h i j k"]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    mem = 128 * kv_bytes_per_block(cfg, 4, torch.float32)
    try:
        ref = LLM(str(tiny_dir), dtype="float32", block_size=4, kv_cache_memory=mem, attention_backend="sdpa")
        want = [o.outputs[0].token_ids for o in ref.generate(prompts, params)]
        llm = LLM(str(tiny_dir), dtype="float32", block_size=4, kv_cache_memory=mem, attention_backend="cpp",
                  enforce_eager=eager)
        assert llm.engine.attention_backend == "cpp"
        batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    finally:
        use_attention_backend("sdpa")  # the backend is per process: leave the default behind
    assert batched == alone == want


@pytest.mark.parametrize("backend", ["sdpa", "cpp"])
def test_mixed_step_matches_per_sequence_attention(backend):
    """Decode rows of a mixed step run batched; the result equals attending sequence by sequence."""
    from zili.kernels.attention import _prefill_one, cpu_paged_attention

    gen = torch.Generator().manual_seed(7)
    n_heads, n_kv, d, block_size, num_blocks = 6, 2, 16, 4, 64
    query_lens = [1, 5, 1, 1, 7, 1]  # decodes around two prefill chunks (one with a cached prefix)
    seq_lens = [9, 5, 3, 13, 11, 1]
    order, tables = torch.randperm(num_blocks, generator=gen).tolist(), []
    for n in seq_lens:
        tables.append(order[: -(-n // block_size)])
        order = order[len(tables[-1]):]
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size)
    T = sum(query_lens)
    cache = torch.randn(2, num_blocks, block_size, n_kv, d, generator=gen)
    q, k, v = (torch.randn(T, h, d, generator=gen) for h in (n_heads, n_kv, n_kv))
    attend = sdpa_paged_attention if backend == "sdpa" else cpu_paged_attention
    got = attend(q, k, v, cache, meta, 0.3)  # writes k/v, then attends
    start, want = 0, []
    for i, (qlen, slen) in enumerate(zip(query_lens, seq_lens)):
        want.append(_prefill_one(q[start:start + qlen], cache, meta.block_tables[i], slen, 0.3))
        start += qlen
    torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=1e-5)


def _windowed_reference(q, cache, tables, lens, scale, window):
    """fp64 attention with positions before the sliding window masked out (-inf scores)."""
    out = []
    block_size = cache.shape[2]
    flat = cache.double().flatten(1, 2)  # [2, NB*BS, KVH, D]
    for b, n in enumerate(lens):
        slots = torch.tensor([tables[b][s // block_size] * block_size + s % block_size for s in range(n)])
        k, v = flat[0, slots], flat[1, slots]
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].double() * scale, k)
        if window:
            scores[:, : max(0, n - window)] = float("-inf")
        out.append(torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), v))
    return torch.stack(out)


@pytest.mark.parametrize("dtype,d,block_size", [(torch.bfloat16, 64, 16),   # specialised bf16 path
                                                (torch.bfloat16, 64, 4),    # generic AVX-512 path
                                                (torch.float32, 32, 8),
                                                (torch.float32, 24, 4)])    # portable loop
@pytest.mark.parametrize("window", [0, 1, 5, 8, 13, 64])
def test_sliding_window_matches_masked_reference(dtype, d, block_size, window):
    """window > 0 attends to the last `window` positions only (window start not a multiple of 8 or
    of the block size, windows longer than the context); 0 is the whole context."""
    assert cpu_attention.available()
    gen = torch.Generator().manual_seed(window * 7 + d + block_size)
    n_kv, group, num_blocks = 2, 3, 128
    lens = [1, 6, 9, 17, 40, 77]
    order, tables = torch.randperm(num_blocks, generator=gen).tolist(), []
    for n in lens:
        tables.append(order[: -(-n // block_size)])
        order = order[len(tables[-1]):]
    width = max(len(t) for t in tables)
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    cache = (torch.randn(2, num_blocks, block_size, n_kv, d, generator=gen) * 2).to(dtype)
    q = (torch.randn(len(lens), n_kv * group, d, generator=gen) * 2).to(dtype)
    scale = d ** -0.5
    want = _windowed_reference(q, cache, tables, lens, scale, window)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for rows in (slice(None), slice(4, 5)):  # split by sequence, and by KV head (one sequence)
        got = cpu_attention.paged_decode(q[rows], cache, table_t[rows], torch.tensor(lens)[rows], scale,
                                         window=window or None)
        torch.testing.assert_close(got.double(), want[rows], atol=tol, rtol=tol)
    if window and window < 40:  # the window changes the answer where the context is longer
        full = cpu_attention.paged_decode(q, cache, table_t, torch.tensor(lens), scale)
        assert not torch.allclose(full[4].float(), want[4].float(), atol=tol, rtol=tol)


def test_negative_window_is_rejected():
    cache = torch.randn(2, 4, 4, 1, 16)
    with pytest.raises(ValueError, match="window"):
        cpu_attention.paged_decode(torch.randn(1, 1, 16), cache, torch.tensor([[0]]), torch.tensor([3]), 1.0,
                                   window=-1)
