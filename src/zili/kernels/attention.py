"""Paged attention: the portable torch reference.

The KV cache of one layer is a single tensor of shape
    [2, num_blocks, block_size, num_kv_heads, head_dim]      (index 0: keys, 1: values)
A token's K/V lives at a flat *slot* = block_id * block_size + offset. A sequence's context is
the concatenation of the blocks listed in its block table.

One flat batch holds T tokens from B sequences. Sequence i owns query tokens
[query_start_loc[i], query_start_loc[i+1]) and, after this step, has seq_lens[i] tokens of
context (cached prefix + the new tokens), the new ones being the last.

Sliding-window attention (Mistral; Gemma's local layers): with `window` = W, the query at
absolute position p sees only keys at positions p - W < j <= p (HF's `sliding_window_overlay`).
The cache still holds the whole context (global layers of the same sequence read it), so a window
changes which positions are read, never which blocks are allocated.

This works on any device torch supports; faster backends keep the same signature.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from zili.kernels.cpu_attention import paged_decode
from zili.kernels.kv_quant import dequantize_rows, head_dim, is_quantized, quantize_rows

if TYPE_CHECKING:
    from zili.kernels.backends import AttentionBackend


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64 flat cache slot for each new token's K/V
    query_start_loc: torch.Tensor  # [B+1] int64 cumulative query lengths
    seq_lens: torch.Tensor  # [B] int64 context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    block_size: int
    # Host copies, for the per-sequence prefill loop. None on a compiled decode step, which must
    # read tensors only (a host value would be baked into the graph): one token per sequence,
    # every block-table column scanned and masked by seq_lens.
    query_lens_cpu: list[int] | None
    seq_lens_cpu: list[int] | None
    # The attention implementation this step runs (zili.kernels.backends), chosen by the runner that
    # built the metadata, so engines with different backends can share a process; None: the torch
    # reference.
    backend: AttentionBackend | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode_only(self) -> bool:
        return self.query_lens_cpu is None or all(q == 1 for q in self.query_lens_cpu)

    @classmethod
    def decode(cls, slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
               block_size: int, backend: AttentionBackend | None = None) -> "AttentionMetadata":
        """Tensor-only metadata for a decode step (one new token per sequence)."""
        return cls(slot_mapping, torch.empty(0, dtype=torch.long), seq_lens, block_tables, block_size, None, None,
                   backend)

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
              block_size: int, device: torch.device | str | None = None,
              backend: AttentionBackend | None = None) -> "AttentionMetadata":
        """Build metadata from host lists; slot mapping follows from the block tables. `device`
        None: torch's default device; `backend` None: the torch reference."""
        slots: list[int] = []
        for qlen, slen, table in zip(query_lens, seq_lens, block_tables):
            for pos in range(slen - qlen, slen):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=0) or 1
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            query_start_loc=torch.tensor(qsl, dtype=torch.long, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.long, device=device),
            block_tables=torch.tensor(padded, dtype=torch.long, device=device),
            block_size=block_size,
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
            backend=backend,
        )


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new keys/values [T, n_kv, d] at their slots (quantized per row on an int8 / fp8 cache,
    zili.kernels.kv_quant)."""
    _, num_blocks, block_size, n_kv, d = kv_cache.shape
    if is_quantized(kv_cache):  # packed rows, written as bytes (CPU float8 tensors have no index_copy_)
        k, v = (quantize_rows(t, kv_cache.dtype).view(torch.uint8) for t in (k, v))
        kv_cache = kv_cache.view(torch.uint8)
    flat = kv_cache.view(2, num_blocks * block_size, n_kv, d)
    if torch.compiler.is_compiling():
        # One index_put_, which Inductor performs in place; index_copy_ on the two halves would be
        # functionalized into a copy of the whole cache every step.
        which = torch.arange(2, device=kv_cache.device)[:, None]
        flat.index_put_((which, slot_mapping[None, :]), torch.stack([k, v]).to(kv_cache.dtype))
        return
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, window: int | None = None) -> torch.Tensor:
    """Causal attention of new tokens over their cached context.

    q: [T, n_heads, d]; k, v: [T, n_kv, d] (new tokens, written into the cache first).
    `window`: a sliding layer's window W (each query sees its last W positions, itself included);
    None for full attention. Returns [T, n_heads, d_v]. Runs the backend named by `meta.backend`
    (the runner's choice, `zili.kernels.backends`); the torch reference below when there is none.
    """
    if meta.backend is not None:
        # Plugin backends written before windows existed keep their six-argument call.
        if window:
            return meta.backend.paged_attention(q, k, v, kv_cache, meta, scale, window=window)
        return meta.backend.paged_attention(q, k, v, kv_cache, meta, scale)
    return sdpa_paged_attention(q, k, v, kv_cache, meta, scale, window)


def sdpa_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                         meta: AttentionMetadata, scale: float, window: int | None = None) -> torch.Tensor:
    """The torch reference (the "sdpa" backend): the cache write, then torch SDPA."""
    write_kv_cache(k, v, kv_cache, meta.slot_mapping)
    decode = functools.partial(_decode_attention, window=window)
    if meta.is_decode_only:
        return decode(q, kv_cache, meta, scale)
    return _mixed_attention(q, kv_cache, meta, scale, decode, window)


def cpu_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float, window: int | None = None) -> torch.Tensor:
    """The "cpp" backend: decode rows through zili's C++ kernel (reads the paged cache in place,
    quantized or not, applying the sliding window itself), multi-token chunks as the torch reference."""
    write_kv_cache(k, v, kv_cache, meta.slot_mapping)

    def decode(q, cache, m, s):
        # A float cache of another dtype than the model's (kv_cache_dtype bfloat16 on a float32 model):
        # the kernel reads queries of the cache's type.
        cast = not is_quantized(cache) and cache.dtype != q.dtype
        qk = q.to(cache.dtype) if cast else q
        out = paged_decode(qk, cache, m.block_tables, m.seq_lens, s, window) if window else \
            paged_decode(qk, cache, m.block_tables, m.seq_lens, s)
        return out.to(q.dtype) if cast else out

    if meta.is_decode_only:
        return decode(q, kv_cache, meta, scale)
    return _mixed_attention(q, kv_cache, meta, scale, decode, window)


def batch_invariant_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                                    meta: AttentionMetadata, scale: float, window: int | None = None,
                                    cpu_kernel: bool = True) -> torch.Tensor:
    """Attention whose every query row is computed alone, the same way whatever else the step holds
    (EngineConfig.deterministic; the batch-invariant attention of SGLang's deterministic inference and
    vLLM's batch-invariant mode).

    The step's keys and values are written first; then the query at absolute position p reads keys
    0..p (its last `window` on a sliding layer) from the paged cache, in one paged-decode call where
    each token is its own "sequence" of length p + 1. So a prompt token gets the same numbers whether
    it is computed in a whole prefill, a chunk of one, after a prefix-cache hit, or as a decode row,
    and beside any other rows. zili's C++ kernel (`paged_decode`: one work item per row, or per
    (row, KV head), each reduced in position order) runs with `cpu_kernel` (a CPU where it builds);
    else a loop of per-row torch calls. Shapes as `paged_attention`."""
    write_kv_cache(k, v, kv_cache, meta.slot_mapping)
    if meta.query_lens_cpu is None or meta.is_decode_only:  # one row per sequence already
        tables, lens = meta.block_tables, meta.seq_lens
    else:
        qlens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
        seq_of_row = torch.repeat_interleave(torch.arange(meta.num_seqs, device=q.device), qlens)
        first_pos = (meta.seq_lens - qlens).index_select(0, seq_of_row)
        offset = torch.arange(q.shape[0], device=q.device) - meta.query_start_loc.index_select(0, seq_of_row)
        tables, lens = meta.block_tables.index_select(0, seq_of_row), first_pos + offset + 1
    if cpu_kernel:
        cast = not is_quantized(kv_cache) and kv_cache.dtype != q.dtype
        out = paged_decode(q.to(kv_cache.dtype) if cast else q, kv_cache, tables, lens, scale, window)
        return out.to(q.dtype) if cast else out
    return _rows_attention_reference(q, kv_cache, tables, lens, scale, window)


def _rows_attention_reference(q: torch.Tensor, kv_cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                              scale: float, window: int | None) -> torch.Tensor:
    """Each row [n_heads, d] over its own context, one call per row (the shape of every operation
    depends on that row's length alone). Slow: the fallback where zili's C++ kernel is missing."""
    n_heads, d = q.shape[1], q.shape[2]
    n_kv = kv_cache.shape[3]
    out = torch.empty(q.shape[0], n_heads, head_dim(kv_cache), dtype=q.dtype, device=q.device)
    block_size = kv_cache.shape[2]
    for row, length in enumerate(lens.tolist()):
        first = max(0, length - window) if window else 0
        keys, values = _gather_context(kv_cache, tables[row], length, first // block_size)
        skip = first - (first // block_size) * block_size
        keys = dequantize_rows(keys[skip:], torch.float32)
        values = dequantize_rows(values[skip:], torch.float32)  # [S, n_kv, d]
        qg = q[row].float().view(n_kv, n_heads // n_kv, d)
        scores = torch.einsum("kgd,skd->kgs", qg, keys) * scale
        probs = torch.softmax(scores, dim=-1)
        out[row] = torch.einsum("kgs,skd->kgd", probs, values).reshape(n_heads, -1).to(q.dtype)
    return out


def _mixed_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                     decode, window: int | None = None) -> torch.Tensor:
    """A step mixing decodes and prefill chunks: the one-token rows in one batched `decode` call,
    each multi-token chunk on its own (a loop over every sequence costs a call per sequence and layer)."""
    # A mixed step always carries its host lengths (only a compiled decode step lacks them).
    assert meta.query_lens_cpu is not None and meta.seq_lens_cpu is not None
    out = torch.empty(q.shape[0], q.shape[1], head_dim(kv_cache), dtype=q.dtype, device=q.device)
    starts = [0]
    for qlen in meta.query_lens_cpu:
        starts.append(starts[-1] + qlen)
    singles = [i for i, qlen in enumerate(meta.query_lens_cpu) if qlen == 1]
    if len(singles) > 1:
        idx = torch.tensor(singles, dtype=torch.long, device=q.device)
        rows = torch.tensor([starts[i] for i in singles], dtype=torch.long, device=q.device)
        lens = [meta.seq_lens_cpu[i] for i in singles]
        width = -(-max(lens) // meta.block_size)
        qsl = torch.arange(len(singles) + 1, dtype=torch.long, device=q.device)
        sub = AttentionMetadata(meta.slot_mapping.index_select(0, rows), qsl,
                                meta.seq_lens.index_select(0, idx), meta.block_tables.index_select(0, idx)[:, :width],
                                meta.block_size, [1] * len(singles), lens)
        out.index_copy_(0, rows, decode(q.index_select(0, rows), kv_cache, sub, scale))
        done = set(singles)
    else:
        done = set()
    for i, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        if i not in done:
            start = starts[i]
            out[start:start + qlen] = _prefill_one(q[start:start + qlen], kv_cache, meta.block_tables[i], slen, scale,
                                                   window)
    return out


def _gather_context(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
                    first_block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [S', n_kv, d] of positions first_block * block_size .. seq_len - 1."""
    block_size = kv_cache.shape[2]
    nblocks = (seq_len + block_size - 1) // block_size
    ctx = gather_blocks(kv_cache, block_table[first_block:nblocks])  # [2, nb, bs, n_kv, d]
    ctx = ctx.reshape(2, (nblocks - first_block) * block_size, *kv_cache.shape[3:])
    ctx = ctx[:, :seq_len - first_block * block_size]
    return ctx[0], ctx[1]


def gather_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Copy the listed blocks' keys and values out: [2, *block_ids.shape, bs, n_kv, d].

    One index_select over whole blocks as rows: several times faster on CPU than advanced
    indexing, which copies element by element.
    """
    num_blocks = kv_cache.shape[1]
    rows = kv_cache.view(2 * num_blocks, -1)
    flat = block_ids.reshape(-1)
    out = rows.index_select(0, torch.cat([flat, flat + num_blocks]))
    return out.view(2, *block_ids.shape, *kv_cache.shape[2:])


def _prefill_one(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
                 scale: float, window: int | None = None) -> torch.Tensor:
    qlen, n_heads, _ = q.shape
    block_size = kv_cache.shape[2]
    # A window hides every position before the first query's window: those blocks are not read.
    first_block = max(0, seq_len - qlen - window + 1) // block_size if window else 0
    k, v = _gather_context(kv_cache, block_table, seq_len, first_block)  # [S', n_kv, d]
    n_kv = k.shape[1]
    # 4-D inputs: SDPA only takes its fused (flash) CPU kernel with a batch dimension; with 3-D
    # ones it falls back to the unfused math path, ~8x slower at 512 tokens.
    q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, dequantize_rows(k, q.dtype), dequantize_rows(v, q.dtype)))
    if qlen == seq_len and (not window or window >= seq_len):  # no cached prefix, nothing slides out
        out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale, enable_gqa=n_kv != n_heads)
    else:
        # Query i sits at absolute position seq_len - qlen + i and sees keys 0..that position
        # (only the last `window` of them on a sliding layer).
        q_pos = torch.arange(seq_len - qlen, seq_len, device=q.device)
        k_pos = torch.arange(first_block * block_size, seq_len, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]  # [qlen, S']
        if window:
            mask &= k_pos[None, :] > q_pos[:, None] - window
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale, enable_gqa=n_kv != n_heads)
    return out[0].transpose(0, 1)


def _decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                      window: int | None = None) -> torch.Tensor:
    """One query token per sequence, all sequences at once: gather each context, pad to the
    longest, and let SDPA's fused CPU/GPU kernel do the rest (2-3x faster than explicit einsums).
    On a sliding layer the blocks before every sequence's window are not gathered."""
    B, n_heads, d = q.shape
    block_size, n_kv = kv_cache.shape[2], kv_cache.shape[3]
    if meta.seq_lens_cpu is None:  # tensor-only (compiled) step: the whole, padded, block table
        return _decode_attention_in_place(q, kv_cache, meta, scale, window)
    nblocks = (max(meta.seq_lens_cpu) + block_size - 1) // block_size
    first = max(0, min(meta.seq_lens_cpu) - window) // block_size if window else 0
    ctx = gather_blocks(kv_cache, meta.block_tables[:, first:nblocks])  # [2, B, nb, bs, n_kv, d]
    ctx = dequantize_rows(ctx.view(2, B, (nblocks - first) * block_size, n_kv, -1), q.dtype)
    k, v = ctx[0].transpose(1, 2), ctx[1].transpose(1, 2)  # [B, n_kv, S, d]
    mask = None
    slides = bool(window and max(meta.seq_lens_cpu) - window > first * block_size)
    if min(meta.seq_lens_cpu) < nblocks * block_size or slides:
        positions = torch.arange(first * block_size, nblocks * block_size, device=q.device)
        visible = positions[None, :] < meta.seq_lens[:, None]
        if window:
            visible &= positions[None, :] >= meta.seq_lens[:, None] - window
        mask = visible[:, None, None, :]  # [B, 1, 1, S]
    out = F.scaled_dot_product_attention(q.view(B, n_heads, 1, d), k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=n_kv != n_heads)
    return out.view(B, n_heads, -1)


def _decode_attention_in_place(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                               scale: float, window: int | None = None) -> torch.Tensor:
    """Decode attention written as indexed loads and reductions, for torch.compile: Inductor fuses
    the block-table lookup into the score and output loops, so the context is read straight from
    the paged cache instead of being gathered into a copy first (and SDPA's per-call cost goes).
    Eagerly this would be slow; the compiled decode step is its only caller. Math in float32."""
    B, n_heads, d = q.shape
    block_size, n_kv = kv_cache.shape[2], kv_cache.shape[3]
    group = n_heads // n_kv
    pos = torch.arange(meta.block_tables.shape[1] * block_size, device=q.device)  # [S]
    blocks = meta.block_tables[:, pos // block_size]  # [B, S]
    offsets = (pos % block_size)[None, :]
    k = dequantize_rows(kv_cache[0][blocks, offsets], torch.float32)  # [B, S, n_kv, d] (fused into the loops below)
    v = dequantize_rows(kv_cache[1][blocks, offsets], torch.float32)
    qg = q.view(B, 1, n_kv, group, d).float()
    scores = (qg * k[:, :, :, None, :]).sum(-1) * scale  # [B, S, n_kv, group]
    visible = pos[None, :] < meta.seq_lens[:, None]
    if window:  # a constant of the layer, baked into the compiled graph
        visible = visible & (pos[None, :] >= meta.seq_lens[:, None] - window)
    visible = visible[:, :, None, None]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=1)
    out = (probs[..., None] * v[:, :, :, None, :]).sum(1)  # [B, n_kv, group, d]
    return out.reshape(B, n_heads, d).to(q.dtype)
