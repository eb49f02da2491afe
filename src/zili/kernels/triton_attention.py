"""Paged attention in Triton: the GPU backend behind `zili.kernels.backends` ("triton").

Same cache layout and metadata as the torch reference (`zili.kernels.attention`):
    kv_cache [2, num_blocks, page, num_kv_heads, head_dim];  token at slot = block * page + offset.

Three kernels:
  write_kv_cache   one program per (token, kv head) copies its K and V row to its slot; slot -1
                   (a padded row of a captured graph) is skipped.
  paged_prefill    one program per (sequence, head, tile of BLOCK_M queries): flash attention of a
                   variable-length query chunk over the sequence's whole context, cached prefix
                   included; causal by absolute position (query i of a chunk of qlen over a context
                   of S sits at S - qlen + i). Also serves mixed batches (decode rows are qlen 1).
  paged_decode     one program per (sequence, kv head, split): all the query heads sharing a KV
                   head attend together, so each K/V tile is read once per group, not once per head.
                   Long contexts with few sequences split the context ("flash decoding") and a small
                   kernel combines the partial softmaxes. Nothing here reads host-side lengths, so a
                   decode step is safe to capture in a device graph.

A sliding-window layer passes WINDOW > 0 (a compile-time constant per layer): a query at position p
sees keys p - WINDOW < j <= p, and the loops start at the first tile any query of the program can
see, so the keys that slid out are never read.

Keys are visited in tiles of BLOCK_N tokens gathered through the block table, so the page size
need not match the tile. Softmax runs in base 2 (exp2) on fp32 accumulators.

A quantized cache (int8 / float8_e4m3fn, `zili.kernels.kv_quant`) has rows of head_dim one-byte
elements and the row's bf16 scale in the last two bytes (QUANT=True). The write kernel quantizes
each row as `kv_quant.quantize_rows` does (same roundings, so the stored bytes agree with the torch
reference's); the attention kernels load the one-byte tile, convert it exactly to the dot's type
and apply the row scales on the other side of the dot: a key's scale multiplies its score column,
a value's scale its probability column (P diag(s) V_q = P V), so no dequantized tile is built.

Tested on the CPU under TRITON_INTERPRET=1 against the torch reference. The interpreter computes
bf16 dots wrongly, and fp32 inputs want IEEE dots, so PRECISE mode upcasts dot operands there.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

# Launch configuration; `zili tune` measures candidates on a GPU and the engine installs the winners
# through `set_config`.
DEFAULT_CONFIG: dict[str, Any] = {
    "prefill_block_m": 64, "prefill_block_n": 64, "prefill_warps": 4, "prefill_stages": 2,
    "decode_block_n": 64, "decode_warps": 4, "decode_max_splits": 16,
    "mla_block_h": 16, "mla_block_n": 32, "mla_warps": 4, "mla_max_splits": 16,
}
CONFIG: dict[str, Any] = dict(DEFAULT_CONFIG)
_LOG2E = 1.4426950408889634


def set_config(overrides: dict[str, Any] | None) -> None:
    CONFIG.clear()
    CONFIG.update(DEFAULT_CONFIG)
    CONFIG.update({k: v for k, v in (overrides or {}).items() if k in DEFAULT_CONFIG})


def interpreting() -> bool:
    """Whether this module's kernels were built by the interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_dot, triton.runtime.JITFunction)


def _precise(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or interpreting()


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


@triton.jit
def _dot(a, b, PRECISE: tl.constexpr):
    if PRECISE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


# ---- quantized rows ------------------------------------------------------------------------------

_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}  # kv_quant's: int8's range, e4m3's largest finite


@triton.jit
def _load_quantized(row_ptrs, d, n_mask, d_mask, D: tl.constexpr):
    """A tile of quantized cache rows: their elements as fp32 (exact: int8 and e4m3 values are
    bf16 values too) [N, BLOCK_D], and each row's scale, the bf16 in bytes D, D + 1 (low byte
    first), as fp32 [N]. Both 0 where masked. The loads take no `other` (it cannot be cast to fp8)."""
    mask = n_mask[:, None] & d_mask[None, :]
    x = tl.where(mask, tl.load(row_ptrs[:, None] + d[None, :], mask=mask).to(tl.float32), 0.0)
    lo = tl.load(row_ptrs + D, mask=n_mask).to(tl.uint8, bitcast=True).to(tl.int32)
    hi = tl.load(row_ptrs + D + 1, mask=n_mask).to(tl.uint8, bitcast=True).to(tl.int32)
    scale = tl.where(n_mask, ((hi << 8 | lo) << 16).to(tl.float32, bitcast=True), 0.0)
    return x, scale


@triton.jit
def _load_kv_tile(cache_ptr, table_ptr, head_off, n, n_mask, d, d_mask, stride_ckv, stride_cblk, stride_cslot,
                  PAGE: tl.constexpr, D: tl.constexpr, QUANT: tl.constexpr):
    """The key and value rows of positions n [N] (n_mask: which are real) of one sequence and KV head,
    gathered through the sequence's block-table row `table_ptr`; `head_off` is the KV head's offset in
    a cache row. Returns k, k_scale, v, v_scale: the rows [N, BLOCK_D] in the cache's type, or as fp32
    elements of a quantized cache (QUANT, see _load_quantized), and each row's scale [N] (1 for a
    float cache), all 0 where masked. _dot_qk and _dot_pv apply the scales."""
    blk = tl.load(table_ptr + n // PAGE, mask=n_mask, other=0)
    # Integer offsets first, one pointer add last: the compiler then fuses the products into
    # multiply-adds (pointer-first arithmetic cost 5-10% more sm_90 instructions in these kernels).
    row = blk * stride_cblk + (n % PAGE) * stride_cslot + head_off
    if QUANT:
        k, k_scale = _load_quantized(cache_ptr + row, d, n_mask, d_mask, D)
        v, v_scale = _load_quantized(cache_ptr + stride_ckv + row, d, n_mask, d_mask, D)
    else:
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(cache_ptr + stride_ckv + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        k_scale = n_mask.to(tl.float32)
        v_scale = k_scale
    return k, k_scale, v, v_scale


@triton.jit
def _dot_qk(q, k, k_scale, qk_scale, PRECISE: tl.constexpr, QUANT: tl.constexpr):
    """Scores q [M, BLOCK_D] . k [N, BLOCK_D]^T * qk_scale [M, N]; a quantized tile's row scales
    k_scale [N] multiply their score columns."""
    s = _dot(q, tl.trans(k.to(q.dtype)), PRECISE) * qk_scale
    if QUANT:
        s = s * k_scale[None, :]
    return s


@triton.jit
def _dot_pv(p, v, v_scale, q, PRECISE: tl.constexpr, QUANT: tl.constexpr):
    """p [M, N] (fp32 weights) times the value tile v [N, BLOCK_D]: [M, BLOCK_D] in fp32. A quantized
    tile's row scales v_scale [N] weigh the columns of p (P diag(s) V_q = P V) and the dot runs in the
    query q's type; a float tile's in its own type. For an fp16 query the scales are divided by the
    tile's largest first and the product multiplied by it after: p (<= 1) times a small value scale
    (|v| / 127) falls below fp16's normal range (6e-5) and loses its bits, while p times a scale ratio
    (<= 1) loses only where that row's term is negligible beside the tile's largest; this keeps fp16's
    11-bit mantissa, which bf16 operands (fp32's range, 8 bits) would not. The int8 / e4m3 codes are
    exact in fp16."""
    if QUANT:
        if q.dtype == tl.float16:
            top = tl.max(v_scale, 0)
            top = tl.where(top > 0.0, top, 1.0)  # an all-masked tile: scales 0
            return _dot((p * (v_scale / top)[None, :]).to(q.dtype), v.to(q.dtype), PRECISE) * top
        return _dot((p * v_scale[None, :]).to(q.dtype), v.to(q.dtype), PRECISE)
    else:
        return _dot(p.to(v.dtype), v, PRECISE)


@triton.jit
def _store_quantized_row(row_ptr, x, d, slot, D: tl.constexpr, QMAX: tl.constexpr, INT8: tl.constexpr):
    """Quantize one row x [BLOCK_D] (lanes >= D hold 0) as kv_quant.quantize_rows and store its D
    elements and bf16 scale at row_ptr; nothing when `slot` < 0 (a padded row). Every rounding is
    spelled out (IEEE divisions, round-half-even on the bit patterns), so the stored bytes equal the
    torch reference's on the GPU and under the interpreter, whose float conversions truncate."""
    xf = x.to(tl.float32)
    scale_bits = tl.div_rn(tl.max(tl.abs(xf), 0), QMAX).to(tl.int32, bitcast=True)  # >= 0
    scale_bits = (scale_bits + 0x7FFF + ((scale_bits >> 16) & 1)) & -65536  # to bf16, ties to even
    scale = scale_bits.to(tl.float32, bitcast=True)
    scaled = tl.div_rn(xf, tl.maximum(scale, 1.1754943508222875e-38))  # float32's tiny: zero rows stay 0
    if INT8:
        # Adding and removing 1.5 * 2**23 rounds to an integer, half to even (|scaled| <= 127.5).
        rounded = (scaled + 12582912.0) - 12582912.0
        q = tl.minimum(tl.maximum(rounded, -127.0), 127.0).to(tl.int8)
    else:
        # Round |x| to e4m3's grid first, so the conversion below is exact: 3 mantissa bits for normal
        # values (|x| >= 2**-6), steps of 2**-9 below (1.5 * 2**14 added to and removed). The sign goes
        # back on the byte (torch keeps -0.0; float negation of a zero did not survive sm_90's compiler).
        mag = tl.minimum(tl.abs(scaled), QMAX)
        bits = mag.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        small = (mag + 24576.0) - 24576.0
        byte = tl.where(mag < 0.015625, small, normal).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        sign = (scaled.to(tl.int32, bitcast=True) >> 24) & 0x80
        q = (byte | sign.to(tl.uint8)).to(row_ptr.dtype.element_ty, bitcast=True)
    tl.store(row_ptr + d, q, mask=(d < D) & (d * 0 + slot >= 0))
    two = tl.arange(0, 2)
    byte = tl.where(two == 0, (scale_bits >> 16) & 0xFF, scale_bits >> 24).to(tl.uint8)
    tl.store(row_ptr + D + two, byte.to(row_ptr.dtype.element_ty, bitcast=True), mask=two * 0 + slot >= 0)


# ---- writing the cache -----------------------------------------------------------------------

@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_ckv, stride_cblk, stride_cslot, stride_chead,
                     PAGE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr = False,
                     QMAX: tl.constexpr = 127.0, INT8: tl.constexpr = True):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    d = tl.arange(0, BLOCK_D)
    mask = (d < D) & (d * 0 + slot >= 0)  # broadcast the scalar test (the interpreter needs a block)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask, other=0.0)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask, other=0.0)
    row = cache_ptr + (slot // PAGE) * stride_cblk + (slot % PAGE) * stride_cslot + h * stride_chead
    if QUANT:
        _store_quantized_row(row, k, d, slot, D, QMAX, INT8)
        _store_quantized_row(row + stride_ckv, v, d, slot, D, QMAX, INT8)
    else:
        tl.store(row + d, k.to(cache_ptr.dtype.element_ty), mask=mask)
        tl.store(row + stride_ckv + d, v.to(cache_ptr.dtype.element_ty), mask=mask)


def _quant_args(cache: torch.Tensor) -> dict[str, Any]:
    """The compile-time constants saying whether (and how) a cache's rows are quantized."""
    if cache.dtype not in _QMAX:
        return {"QUANT": False}
    return {"QUANT": True, "QMAX": _QMAX[cache.dtype], "INT8": cache.dtype == torch.int8}


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new keys/values [T, n_kv, d] at their slots (slot < 0: skipped); on an int8 / fp8
    cache ([..., d + 2]) each row is quantized with its own scale (zili.kernels.kv_quant)."""
    T, n_kv, d = k.shape
    if T == 0:
        return
    k, v = _last_contiguous(k), _last_contiguous(v)
    _write_kv_kernel[(T, n_kv)](
        k, v, kv_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        PAGE=kv_cache.shape[2], D=d, BLOCK_D=triton.next_power_of_2(d), **_quant_args(kv_cache))


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ---- prefill (and mixed batches) ---------------------------------------------------------------

@triton.jit
def _prefill_kernel(q_ptr, cache_ptr, out_ptr, tables_ptr, qsl_ptr, seq_lens_ptr, qk_scale,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_ckv, stride_cblk, stride_cslot, stride_chead, stride_tb,
                    PAGE: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISE: tl.constexpr, WINDOW: tl.constexpr,
                    QUANT: tl.constexpr = False):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    qlen = tl.load(qsl_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= qlen:
        return
    ctx = tl.load(seq_lens_ptr + seq)
    prefix = ctx - qlen
    m = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the chunk
    d = tl.arange(0, BLOCK_D)
    m_mask = m < qlen
    d_mask = d < D
    q_pos = prefix + m
    q = tl.load(q_ptr + (q_start + m)[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    kv_head = head // GROUP
    head_off = kv_head * stride_chead
    table_ptr = tables_ptr + seq * stride_tb
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = prefix + tl.minimum((tile + 1) * BLOCK_M, qlen)  # the last query of the tile sees keys < hi
    lo = 0
    if WINDOW > 0:  # the tile's first query sees nothing before its window
        lo = tl.maximum(prefix + tile * BLOCK_M - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < hi
        k, k_scale, v, v_scale = _load_kv_tile(cache_ptr, table_ptr, head_off, n, n_mask, d, d_mask, stride_ckv,
                                               stride_cblk, stride_cslot, PAGE, D, QUANT)
        s = _dot_qk(q, k, k_scale, qk_scale, PRECISE, QUANT)  # [BLOCK_M, BLOCK_N], log2 units
        visible = (n[None, :] <= q_pos[:, None]) & n_mask[None, :]
        if WINDOW > 0:
            visible = visible & (n[None, :] > q_pos[:, None] - WINDOW)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded query rows see nothing
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot_pv(p, v, v_scale, q, PRECISE, QUANT)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (q_start + m)[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def paged_prefill(q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                  block_tables: torch.Tensor, max_query_len: int, scale: float,
                  block_m: int | None = None, block_n: int | None = None, window: int | None = None) -> torch.Tensor:
    """q [T, H, d] of B variable-length chunks; returns [T, H, d]. The cache already holds them.
    `window`: sliding-window size (None or 0: full causal attention)."""
    T, H, d = q.shape
    n_kv = kv_cache.shape[3]
    q = _last_contiguous(q)
    out = torch.empty_like(q)
    block_m = block_m or CONFIG["prefill_block_m"]
    block_n = block_n or CONFIG["prefill_block_n"]
    grid = (seq_lens.shape[0], H, triton.cdiv(max_query_len, block_m))
    _prefill_kernel[grid](
        q, kv_cache, out, block_tables, query_start_loc, seq_lens, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        PAGE=kv_cache.shape[2], GROUP=H // n_kv, D=d, BLOCK_D=_pow2(d), BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISE=_precise(q.dtype), WINDOW=int(window or 0), QUANT=kv_cache.dtype in _QMAX,
        num_warps=CONFIG["prefill_warps"], num_stages=CONFIG["prefill_stages"])
    return out


# ---- decode --------------------------------------------------------------------------------

@triton.jit
def _decode_kernel(q_ptr, cache_ptr, tables_ptr, seq_lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr, qk_scale,
                   stride_qb, stride_qh, stride_ob, stride_oh,
                   stride_ckv, stride_cblk, stride_cslot, stride_chead, stride_tb,
                   PAGE: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, PRECISE: tl.constexpr,
                   WINDOW: tl.constexpr, QUANT: tl.constexpr = False):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(seq_lens_ptr + seq)
    first = 0
    if WINDOW > 0:  # only the last WINDOW positions, split among the programs
        first = tl.maximum(ctx - WINDOW, 0)
    per_split = tl.cdiv(tl.cdiv(ctx - first, BLOCK_N), SPLITS) * BLOCK_N
    lo = first + split * per_split
    hi = tl.minimum(lo + per_split, ctx)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    g_mask = g < GROUP
    d_mask = d < D
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    head_off = kv_head * stride_chead
    table_ptr = tables_ptr + seq * stride_tb
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < hi
        k, k_scale, v, v_scale = _load_kv_tile(cache_ptr, table_ptr, head_off, n, n_mask, d, d_mask, stride_ckv,
                                               stride_cblk, stride_cslot, PAGE, D, QUANT)
        s = _dot_qk(q, k, k_scale, qk_scale, PRECISE, QUANT)  # [BLOCK_G, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds a valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot_pv(p, v, v_scale, q, PRECISE, QUANT)
        m_i = m_new
    _finish_split(acc, m_i, l_i, seq, heads, g_mask, d, d_mask, split, tl.num_programs(1) * GROUP,
                  out_ptr, stride_ob, stride_oh, part_acc_ptr, part_ml_ptr, BLOCK_D, SPLITS)


@triton.jit
def _finish_split(acc, m_i, l_i, seq, heads, h_mask, d, d_mask, split, H, out_ptr, stride_ob, stride_oh,
                  part_acc_ptr, part_ml_ptr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
    """One split: normalise and store (SPLITS == 1), or keep the partial for _combine_kernel."""
    if SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])
    else:
        part = (seq * H + heads) * SPLITS + split
        tl.store(part_acc_ptr + part[:, None] * BLOCK_D + d[None, :], acc, mask=h_mask[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=h_mask)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=h_mask)


@triton.jit
def _combine_kernel(part_acc_ptr, part_ml_ptr, out_ptr, H, stride_ob, stride_oh,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
    """Merge the per-split softmax partials of one (sequence, head)."""
    row = tl.program_id(0)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, BLOCK_D)
    m = tl.load(part_ml_ptr + (row * SPLITS + s) * 2)
    l_s = tl.load(part_ml_ptr + (row * SPLITS + s) * 2 + 1)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # an empty context (padded row)
    w = tl.exp2(m - m_max)
    total = tl.sum(w * l_s, 0)
    acc = tl.load(part_acc_ptr + (row * SPLITS + s)[:, None] * BLOCK_D + d[None, :])
    out = tl.sum(w[:, None] * acc, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + (row // H) * stride_ob + (row % H) * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < D)


def num_splits(programs: int, max_tokens: int, block_n: int, max_splits: int) -> int:
    """Split the context when too few programs would fill the device, keeping each split at least
    two tiles long. Depends only on static shapes, so a captured graph stays valid."""
    sms = _multiprocessor_count()
    if sms is None:
        return 1
    want = triton.cdiv(2 * sms, max(programs, 1))
    longest = max(1, max_tokens // (2 * block_n))
    splits = min(want, longest, max_splits)
    return 1 << (max(splits, 1).bit_length() - 1)  # a power of two, for the combine kernel


_SM_COUNT: list[int | None] = []


def _multiprocessor_count() -> int | None:
    if not _SM_COUNT:
        count = None
        if not interpreting():
            try:
                driver = triton.runtime.driver.active
                count = driver.utils.get_device_properties(driver.get_current_device())["multiprocessor_count"]
            except Exception:
                count = None
        _SM_COUNT.append(count)
    return _SM_COUNT[0]


def _split_buffers(B: int, H: int, splits: int, block_d: int, device: torch.device):
    if splits == 1:
        return None, None
    acc = torch.empty(B * H * splits, block_d, dtype=torch.float32, device=device)
    ml = torch.empty(B * H * splits, 2, dtype=torch.float32, device=device)
    return acc, ml


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float, splits: int | None = None, block_n: int | None = None,
                 window: int | None = None) -> torch.Tensor:
    """One query token per sequence: q [B, H, d] -> [B, H, d]. A sequence of length 0 (a padded
    graph row) gets zeros. `window`: sliding-window size (None or 0: the whole context)."""
    B, H, d = q.shape
    page, n_kv = kv_cache.shape[2], kv_cache.shape[3]
    group = H // n_kv
    q = _last_contiguous(q)
    out = torch.empty_like(q)
    block_n = block_n or CONFIG["decode_block_n"]
    block_d = _pow2(d)
    if splits is None:
        longest = block_tables.shape[1] * page
        splits = num_splits(B * n_kv, min(longest, window) if window else longest, block_n,
                            CONFIG["decode_max_splits"])
    part_acc, part_ml = _split_buffers(B, H, splits, block_d, q.device)
    _decode_kernel[(B, n_kv, splits)](
        q, kv_cache, block_tables, seq_lens, out, part_acc, part_ml, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        PAGE=page, GROUP=group, BLOCK_G=_pow2(group), D=d, BLOCK_D=block_d, BLOCK_N=block_n, SPLITS=splits,
        PRECISE=_precise(q.dtype), WINDOW=int(window or 0), QUANT=kv_cache.dtype in _QMAX,
        num_warps=CONFIG["decode_warps"])
    if splits > 1:
        _combine_kernel[(B * H,)](part_acc, part_ml, out, H, out.stride(0), out.stride(1),
                                  D=d, BLOCK_D=block_d, SPLITS=splits)
    return out


# ---- the backend entry point -------------------------------------------------------------------

def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta,
                    scale: float, window: int | None = None) -> torch.Tensor:
    """Same contract as `zili.kernels.attention.paged_attention`: q [T, H, d], k/v [T, n_kv, d]."""
    write_kv_cache(k, v, kv_cache, meta.slot_mapping)
    if meta.is_decode_only:
        return paged_decode(q, kv_cache, meta.block_tables, meta.seq_lens, scale, window=window)
    return paged_prefill(q, kv_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                         max(meta.query_lens_cpu), scale, window=window)
