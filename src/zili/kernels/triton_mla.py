"""MLA decode over the paged latent cache, in Triton (the GPU path of `mla_decode_absorbed`).

Cache of one layer: [num_blocks, page, C], each row [latent (r) | roped shared key (d_rope)]; see
`zili.kernels.mla_attention` for the algebra. With W_UK folded into the query, every head attends
over the same rows, so one program takes BLOCK_H heads of one sequence and reads each latent tile
once for all of them: scores = q_lat . lat + q_rope . k_rope, out_latent = softmax . lat. That shared
read is what makes MLA decode cheap; the kernel is built around it. W_UV turns the latent output
into values afterwards (a batched matmul in torch).

Splitting long contexts and combining the partials works as in `triton_attention.paged_decode`.

A quantized cache (int8 / float8_e4m3fn) holds rows packed by `kv_quant.quantize_latent_rows`:
[q(latent) r | q(k_rope) d_rope | scale(latent) bf16 | scale(k_rope) bf16] (QUANT=True). The kernel
loads the one-byte tiles and applies the scales beside the dots: the latent scale to its score
term and to the probabilities that weigh the latent, the rope scale to the rope score term.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zili.kernels.triton_attention import (
    _LOG2E,
    _QMAX,
    CONFIG,
    _combine_kernel,
    _dot,
    _dot_pv,
    _finish_split,
    _load_quantized,
    _pow2,
    _precise,
    _split_buffers,
    num_splits,
)


@triton.jit
def _mla_decode_kernel(ql_ptr, qr_ptr, cache_ptr, tables_ptr, seq_lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
                       qk_scale, H, stride_qlb, stride_qlh, stride_qrb, stride_qrh, stride_ob, stride_oh,
                       stride_cblk, stride_cslot, stride_tb,
                       PAGE: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, DR: tl.constexpr,
                       BLOCK_DR: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                       PRECISE: tl.constexpr, QUANT: tl.constexpr = False):
    seq = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    ctx = tl.load(seq_lens_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(ctx, BLOCK_N), SPLITS) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, ctx)
    r = tl.arange(0, BLOCK_R)
    e = tl.arange(0, BLOCK_DR)
    h_mask = heads < H
    r_mask = r < R
    e_mask = e < DR
    q_lat = tl.load(ql_ptr + seq * stride_qlb + heads[:, None] * stride_qlh + r[None, :],
                    mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    q_rope = tl.load(qr_ptr + seq * stride_qrb + heads[:, None] * stride_qrh + e[None, :],
                     mask=h_mask[:, None] & e_mask[None, :], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < hi
        blk = tl.load(tables_ptr + seq * stride_tb + n // PAGE, mask=n_mask, other=0)
        row = cache_ptr + blk * stride_cblk + (n % PAGE) * stride_cslot
        if QUANT:  # scale bytes: the latent's at R + DR, the rope part's at R + DR + 2
            lat, lat_scale = _load_quantized(row, r, n_mask, r_mask, R + DR)
            k_rope, rope_scale = _load_quantized(row + R, e, n_mask, e_mask, DR + 2)
            s = _dot(q_lat, tl.trans(lat.to(q_lat.dtype)), PRECISE) * lat_scale[None, :]
            s += _dot(q_rope, tl.trans(k_rope.to(q_rope.dtype)), PRECISE) * rope_scale[None, :]
        else:
            lat = tl.load(row[:, None] + r[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            k_rope = tl.load(row[:, None] + R + e[None, :], mask=n_mask[:, None] & e_mask[None, :], other=0.0)
            s = _dot(q_lat, tl.trans(lat.to(q_lat.dtype)), PRECISE)
            s += _dot(q_rope, tl.trans(k_rope.to(q_rope.dtype)), PRECISE)
        s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))  # [BLOCK_H, BLOCK_N], log2 units
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if QUANT:
            acc = acc * alpha[:, None] + _dot_pv(p, lat, lat_scale, q_lat, PRECISE, QUANT)
        else:
            acc = acc * alpha[:, None] + _dot(p.to(lat.dtype), lat, PRECISE)
        m_i = m_new
    _finish_split(acc, m_i, l_i, seq, heads, h_mask, r, r_mask, split, H, out_ptr, stride_ob, stride_oh,
                  part_acc_ptr, part_ml_ptr, BLOCK_R, SPLITS)


def mla_decode_latent(q_latent: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, scale: float, splits: int | None = None,
                      block_h: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """q_latent [B, H, r], q_rope [B, H, d_rope] -> the attended latent per head [B, H, r]. `cache`
    [num_blocks, page, r + d_rope] (float) or [.., r + d_rope + 4] (int8 / fp8 rows with their scales)."""
    B, H, R = q_latent.shape
    DR = q_rope.shape[-1]
    page = cache.shape[1]
    q_latent, q_rope = q_latent.contiguous(), q_rope.contiguous()
    out = torch.empty_like(q_latent)
    block_h = block_h or CONFIG["mla_block_h"]
    block_n = block_n or CONFIG["mla_block_n"]
    block_r = _pow2(R)
    head_blocks = triton.cdiv(H, block_h)
    if splits is None:
        splits = num_splits(B * head_blocks, block_tables.shape[1] * page, block_n, CONFIG["mla_max_splits"])
    part_acc, part_ml = _split_buffers(B, H, splits, block_r, q_latent.device)
    _mla_decode_kernel[(B, head_blocks, splits)](
        q_latent, q_rope, cache, block_tables, seq_lens, out, part_acc, part_ml, scale * _LOG2E, H,
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1), out.stride(0), out.stride(1),
        cache.stride(0), cache.stride(1), block_tables.stride(0),
        PAGE=page, R=R, BLOCK_R=block_r, DR=DR, BLOCK_DR=_pow2(DR), BLOCK_H=block_h, BLOCK_N=block_n,
        SPLITS=splits, PRECISE=_precise(q_latent.dtype), QUANT=cache.dtype in _QMAX, num_warps=CONFIG["mla_warps"])
    if splits > 1:
        _combine_kernel[(B * H,)](part_acc, part_ml, out, H, out.stride(0), out.stride(1),
                                  D=R, BLOCK_D=block_r, SPLITS=splits)
    return out


def mla_decode(q_nope: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
               seq_lens: torch.Tensor, max_seq_len: int, w_kv_b: torch.Tensor, scale: float) -> torch.Tensor:
    """Drop-in for `mla_attention.mla_decode_absorbed`: [B, H, d_v]. `max_seq_len` is unused (the
    kernel reads lengths on the device, which keeps the step capturable)."""
    d_nope = q_nope.shape[-1]
    w_uk, w_uv = w_kv_b[:, :d_nope], w_kv_b[:, d_nope:]  # [H, d_nope, r], [H, d_v, r]
    q_latent = torch.einsum("bhd,hdr->bhr", q_nope, w_uk)
    out_latent = mla_decode_latent(q_latent, q_rope, cache, block_tables, seq_lens, scale)
    return torch.einsum("bhr,hvr->bhv", out_latent, w_uv)
