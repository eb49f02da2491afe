"""Sliding-window attention over the paged cache, every CPU path against one reference: full
attention over the sequence's keys with the window applied as a mask (float64), over contexts
longer than the window, with cached prefixes (chunked prefill / prefix-cache hits) and decode rows
mixed into one batch. The Triton kernels' window cases are in test_triton_cases.py."""

from __future__ import annotations

import pytest
import torch

from zili.kernels import attention, cpu_attention
from zili.kernels.attention import AttentionMetadata, cpu_paged_attention, sdpa_paged_attention


def make_batch(query_lens, seq_lens, *, heads=4, kv_heads=2, head_dim=16, page=4, seed=0, dtype=torch.float32):
    """Random cache and new q/k/v; each sequence's blocks are a shuffled, non-contiguous set."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-s // page) for s in seq_lens) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for s in seq_lens:
        n = -(-s // page)
        tables.append(order[used:used + n])
        used += n
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, page)
    T = sum(query_lens)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    cache = rand(2, num_blocks, page, kv_heads, head_dim)
    return meta, cache, rand(T, heads, head_dim), rand(T, kv_heads, head_dim), rand(T, kv_heads, head_dim)


def reference(q, k, v, cache, meta, scale, window):
    """Write the new K/V, then per sequence: softmax over all its keys with the causal + window
    mask (key j visible from query position p iff p - window < j <= p), in float64."""
    cache = cache.clone()
    attention.write_kv_cache(k, v, cache, meta.slot_mapping)
    page, groups = cache.shape[2], q.shape[1] // cache.shape[3]
    out, start = [], 0
    for qlen, slen, table in zip(meta.query_lens_cpu, meta.seq_lens_cpu, meta.block_tables.tolist()):
        slots = torch.tensor([table[j // page] * page + j % page for j in range(slen)])
        keys = cache[0].reshape(-1, *cache.shape[3:])[slots].double().repeat_interleave(groups, 1)  # [S, H, d]
        vals = cache[1].reshape(-1, *cache.shape[3:])[slots].double().repeat_interleave(groups, 1)
        qs = q[start:start + qlen].double()
        scores = torch.einsum("qhd,shd->hqs", qs, keys) * scale
        q_pos = torch.arange(slen - qlen, slen)[:, None]
        j = torch.arange(slen)[None, :]
        visible = (j <= q_pos) & (j > q_pos - window if window else True)
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out.append(torch.einsum("hqs,shd->qhd", probs, vals))
        start += qlen
    return torch.cat(out)


BATCHES = {
    "decode": ([1, 1, 1, 1], [3, 9, 26, 40]),
    "prefill-from-scratch": ([23], [23]),
    "chunk-over-cached-prefix": ([6], [31]),
    "mixed": ([1, 7, 1, 12], [17, 7, 34, 29]),
}


@pytest.mark.parametrize("window", [None, 1, 5, 8, 13])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_sdpa_path_matches_masked_reference(batch, window):
    meta, cache, q, k, v = make_batch(*BATCHES[batch])
    expected = reference(q, k, v, cache, meta, 0.3, window)
    got = sdpa_paged_attention(q, k, v, cache.clone(), meta, 0.3, window=window)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 1, 5, 13])
def test_compiled_decode_form_matches_masked_reference(window):
    """The tensor-only decode (what the compiled and captured decode steps run: no host lengths,
    the whole padded block table scanned) applies the window from seq_lens alone."""
    meta, cache, q, k, v = make_batch(*BATCHES["decode"])
    expected = reference(q, k, v, cache, meta, 0.3, window)
    tensor_only = AttentionMetadata.decode(meta.slot_mapping, meta.block_tables, meta.seq_lens, meta.block_size)
    got = sdpa_paged_attention(q, k, v, cache.clone(), tensor_only, 0.3, window=window)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    if window != 5:  # one compile is enough to show Inductor keeps the mask (each costs seconds)
        return
    compiled = torch.compile(attention._decode_attention_in_place, fullgraph=True, dynamic=False)
    filled = cache.clone()
    attention.write_kv_cache(k, v, filled, meta.slot_mapping)
    torch.testing.assert_close(compiled(q, filled, tensor_only, 0.3, window).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not cpu_attention.available(), reason="the C++ kernel does not build here")
@pytest.mark.parametrize("window", [None, 1, 5, 13])
@pytest.mark.parametrize("batch", ["decode", "mixed"])
def test_cpp_backend_matches_masked_reference(batch, window):
    meta, cache, q, k, v = make_batch(*BATCHES[batch])
    expected = reference(q, k, v, cache, meta, 0.3, window)
    got = cpu_paged_attention(q, k, v, cache.clone(), meta, 0.3, window=window)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_window_at_least_the_context_equals_full_attention():
    meta, cache, q, k, v = make_batch(*BATCHES["mixed"])
    full = sdpa_paged_attention(q, k, v, cache.clone(), meta, 0.3)
    assert torch.equal(sdpa_paged_attention(q, k, v, cache.clone(), meta, 0.3, window=40), full)
