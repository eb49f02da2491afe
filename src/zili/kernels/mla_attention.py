"""Multi-head Latent Attention over a paged latent cache: the portable torch reference.

The cache of one layer holds, per token, one row of width C = kv_lora_rank + qk_rope_head_dim:
    [num_blocks, block_size, C]     row = [normalised compressed kv (r) | roped shared key (d_rope)]
Tokens are addressed by flat slot, exactly as in `zili.kernels.attention`, so the block manager,
prefix sharing, chunked prefill and preemption need nothing new.

kv_b_proj's weight, viewed per head as w_kv_b [H, d_nope + d_v, r], splits into W_UK [H, d_nope, r]
(latent -> key without position) and W_UV [H, d_v, r] (latent -> value). Two ways to attend:

  expanded (prefill): up-project the sequence's cached latents to per-head K = [W_UK c | k_rope]
      and V = W_UV c, then ordinary causal attention. Cheapest when many queries share one context.
  absorbed (decode):  fold W_UK into the query, q_lat = W_UK^T q_nope [H, r], and attend directly
      over the cached rows with the query [q_lat | q_rope]; the result is a latent per head, and
      W_UV turns it into the value. Per step it reads C values per context token instead of
      H * (d_nope + d_rope + d_v), which is what makes MLA decode cheap.

Both give the same numbers (up to rounding); a batch may mix them: sequences with one new token
attend absorbed, all in one batched pass; longer query chunks attend expanded, one at a time.

A quantized cache (int8 / float8_e4m3fn) stores each row as `kv_quant.quantize_latent_rows` packs it
(one-byte elements, a bf16 scale for the latent part and one for the rope part, C + 4 bytes); the
readers here dequantize what they gather. Decode runs the step's attention backend's `mla_decode`
(the Triton kernel on a GPU), this module's torch version when the step names none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zili.kernels.attention import AttentionMetadata
from zili.kernels.kv_quant import dequantize_latent_rows, is_quantized, quantize_latent_rows


def write_latent_cache(latent: torch.Tensor, k_rope: torch.Tensor, cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Store new rows [latent (r) | k_rope (d_rope)] of T tokens at their slots (packed with their
    two scales on an int8 / fp8 cache, kv_quant.quantize_latent_rows)."""
    num_blocks, block_size, width = cache.shape
    if is_quantized(cache):  # written as bytes (CPU float8 tensors have no index_copy_)
        rows = quantize_latent_rows(latent, k_rope, cache.dtype).view(torch.uint8)
        cache = cache.view(torch.uint8)
    else:
        rows = torch.cat((latent, k_rope), dim=-1).to(cache.dtype)  # [T, C]
    cache.view(num_blocks * block_size, width).index_copy_(0, slot_mapping, rows)


def gather_latent_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Copy the listed blocks out: [*block_ids.shape, block_size, C]. One index_select over whole
    blocks as rows, much faster on CPU than advanced indexing."""
    num_blocks = cache.shape[0]
    out = cache.view(num_blocks, -1).index_select(0, block_ids.reshape(-1))
    return out.view(*block_ids.shape, *cache.shape[1:])


def gather_latent_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One sequence's cached rows, in position order: [seq_len, C]."""
    block_size = cache.shape[1]
    nblocks = -(-seq_len // block_size)
    return gather_latent_blocks(cache, block_table[:nblocks]).reshape(nblocks * block_size, -1)[:seq_len]


def mla_attention(q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                  cache: torch.Tensor, meta: AttentionMetadata, w_kv_b: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal MLA of T new tokens over their cached context; the new rows are written first.

    q_nope [T, H, d_nope]; q_rope [T, H, d_rope] (roped); latent [T, r] (normalised);
    k_rope [T, d_rope] (roped); w_kv_b [H, d_nope + d_v, r]. Returns [T, H, d_v].
    """
    write_latent_cache(latent, k_rope, cache, meta.slot_mapping)
    # MLA has no tensor-only (compiled) decode step: the host lengths are always there.
    assert meta.query_lens_cpu is not None and meta.seq_lens_cpu is not None
    decode = getattr(meta.backend, "mla_decode", None) or mla_decode_absorbed
    if meta.is_decode_only:
        return decode(q_nope, q_rope, cache, meta.block_tables, meta.seq_lens, max(meta.seq_lens_cpu), w_kv_b, scale)
    T, H, _ = q_nope.shape
    d_v = w_kv_b.shape[1] - q_nope.shape[-1]
    out = q_nope.new_empty(T, H, d_v)
    starts = meta.query_start_loc.tolist()
    singles = [i for i, q in enumerate(meta.query_lens_cpu) if q == 1]
    if singles:
        rows = torch.tensor([starts[i] for i in singles], dtype=torch.long, device=q_nope.device)
        seqs = torch.tensor(singles, dtype=torch.long, device=q_nope.device)
        out[rows] = decode(q_nope[rows], q_rope[rows], cache, meta.block_tables[seqs], meta.seq_lens[seqs],
                           max(meta.seq_lens_cpu[i] for i in singles), w_kv_b, scale)
    for i, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        if qlen > 1:
            s = starts[i]
            context = gather_latent_context(cache, meta.block_tables[i], slen)
            out[s:s + qlen] = mla_prefill_expanded(q_nope[s:s + qlen], q_rope[s:s + qlen], context, w_kv_b, scale)
    return out


def mla_prefill_expanded(q_nope: torch.Tensor, q_rope: torch.Tensor, context: torch.Tensor,
                         w_kv_b: torch.Tensor, scale: float) -> torch.Tensor:
    """The last qlen tokens of one sequence attend over its whole context [S, C] (cache rows, packed
    ones dequantized here), expanded to per-head keys and values. Returns [qlen, H, d_v]."""
    qlen, H, d_nope = q_nope.shape
    S = context.shape[0]
    r = w_kv_b.shape[-1]
    context = dequantize_latent_rows(context, r, q_nope.dtype)
    kv = torch.einsum("sr,hdr->hsd", context[:, :r], w_kv_b)  # [H, S, d_nope + d_v]
    k_nope, v = kv[..., :d_nope], kv[..., d_nope:]
    k = torch.cat((k_nope, context[None, :, r:].expand(H, S, -1)), dim=-1)  # [H, S, d_nope + d_rope]
    q = torch.cat((q_nope, q_rope), dim=-1).transpose(0, 1)  # [H, qlen, d_nope + d_rope]
    # Query i sits at position S - qlen + i and sees keys 0..that position.
    q_pos = torch.arange(S - qlen, S, device=q.device)
    mask = torch.arange(S, device=q.device)[None, :] <= q_pos[:, None]  # [qlen, S]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [H, qlen, d_v]
    return out.transpose(0, 1)


def mla_decode_absorbed(q_nope: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                        seq_lens: torch.Tensor, max_seq_len: int, w_kv_b: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence (B of them), attending over latents (a quantized cache's rows
    dequantized as gathered). Returns [B, H, d_v]."""
    B, H, d_nope = q_nope.shape
    block_size, width = cache.shape[1], cache.shape[2]
    r = w_kv_b.shape[-1]
    w_uk, w_uv = w_kv_b[:, :d_nope], w_kv_b[:, d_nope:]  # [H, d_nope, r], [H, d_v, r]
    q_latent = torch.einsum("bhd,hdr->bhr", q_nope, w_uk)
    query = torch.cat((q_latent, q_rope), dim=-1)  # [B, H, C]: the key is the cached row itself
    nblocks = -(-max_seq_len // block_size)
    context = gather_latent_blocks(cache, block_tables[:, :nblocks]).reshape(B, nblocks * block_size, width)
    context = dequantize_latent_rows(context, r, q_nope.dtype)  # [B, S, C]
    scores = torch.einsum("bhc,bsc->bhs", query, context) * scale  # [B, H, S]
    valid = torch.arange(nblocks * block_size, device=q_nope.device)[None, :] < seq_lens[:, None]  # [B, S]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q_nope.dtype)
    out_latent = torch.einsum("bhs,bsr->bhr", probs, context[..., :r])  # [B, H, r]
    return torch.einsum("bhr,hvr->bhv", out_latent, w_uv)
