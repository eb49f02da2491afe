"""Packed 4-bit / 8-bit weight matmuls on zili's ISA-dispatched CPU kernels (csrc/quant_gemm_cpu.cpp).

Weights are packed once (`pack_q4`, `pack_q8`) into the blocks the kernels read; activations are
quantized to int8 per 32-block inside the kernel and the products run as integer dot products
(llama.cpp's Q8 activation scheme), on every level (avx512, avx2, neon, portable: `zili.kernels.cpu_isa`).
The level is chosen from the CPU at load time; `isa=` picks one explicitly (tests).

Formats (rows in interleaved groups of R = 16, N padded to a multiple of 16, K to KB = ceil(K/32)
blocks of 32; see the header of quant_gemm_cpu.cpp):
  Q4Packed: qs uint8 [NG, KB, 4, 16, 4] (octet o, row, byte t = code 8o+t | code 8o+4+t << 4),
            dm float16 [NG, KB, 2, 16] = scales then mins per block: w = scale * code + min.
  Q8Packed: qs uint8 [NG, KB, 8, 16, 4] = code + 128 (quad j: codes 4j..4j+3), d float16 [NG, KB, 16]:
            w = d * code.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from zili import envs
from zili.kernels import cpu_isa

GROUP = 32


@dataclass
class Q4Packed:
    qs: torch.Tensor
    dm: torch.Tensor
    out_features: int
    in_features: int

    def nbytes(self) -> int:
        return self.qs.numel() + self.dm.numel() * 2


@dataclass
class Q8Packed:
    qs: torch.Tensor
    d: torch.Tensor
    out_features: int
    in_features: int

    def nbytes(self) -> int:
        return self.qs.numel() + self.d.numel() * 2


ROWS = 16  # interleaved output rows

HUGE_PAGE = 2 << 20
ARENA_CHUNK_BYTES = 64 << 20
_ALIGN = 64


class HugePageArena:
    """Host memory for a model's packed weights, in anonymous mappings advised MADV_HUGEPAGE (Linux
    transparent huge pages, madvise(2)): a decode step streams every weight byte once, and with 4 KiB
    pages each 4 KiB of it is another TLB miss and a page walk; with 2 MiB pages, 512 times fewer. On a
    Zen 3 (AVX2, 2 threads) a SmolLM2-135M step's products took 3-10% less time this way
    (benchmarks/notes/cpu-isa.md). Tensors are bump-allocated at 64-byte alignment from chunks of
    ARENA_CHUNK_BYTES (or one tensor's size, rounded up to 2 MiB, if larger); a chunk's pages are
    resident only once written, and a chunk is unmapped when the arena and every tensor in it are
    gone (each tensor's storage holds its mapping). Nothing here is freed tensor by tensor: it is for
    weights that live as long as their model."""

    def __init__(self, chunk_bytes: int = ARENA_CHUNK_BYTES) -> None:
        if chunk_bytes <= 0 or chunk_bytes % HUGE_PAGE:
            raise ValueError(f"chunk_bytes must be a positive multiple of {HUGE_PAGE}, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        self._chunk: mmap.mmap | None = None
        self._used = 0
        self.mapped_bytes = 0
        self.placed_bytes = 0  # of tensors handed out
        self.advised = True  # False once the kernel refused MADV_HUGEPAGE (no THP support)

    @staticmethod
    def supported() -> bool:
        """Whether this OS has anonymous mappings that can be advised MADV_HUGEPAGE (Linux)."""
        return hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS")

    def empty(self, shape: tuple[int, ...] | list[int] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous CPU tensor of `shape` and `dtype` in the arena."""
        numel = 1
        for n in shape:
            numel *= int(n)
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if numel == 0:
            return torch.empty(tuple(shape), dtype=dtype)
        if self._chunk is None or self._used + nbytes > len(self._chunk):
            size = max(self.chunk_bytes, -(-nbytes // HUGE_PAGE) * HUGE_PAGE)
            # A fresh anonymous mapping is page-aligned; the kernel places huge pages at 2 MiB-aligned
            # virtual addresses inside it, so all but the first and last partial 2 MiB get them.
            chunk = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            try:
                chunk.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # a kernel built without transparent huge pages: plain pages, same bytes
                self.advised = False
            self._chunk, self._used = chunk, 0
            self.mapped_bytes += size
        t = torch.frombuffer(self._chunk, dtype=dtype, count=numel, offset=self._used).view(tuple(shape))
        self._used += -(-nbytes // _ALIGN) * _ALIGN
        self.placed_bytes += nbytes
        return t


_arena: list[HugePageArena] = []


@contextlib.contextmanager
def huge_page_weights(enabled: bool | None = None) -> Iterator[HugePageArena | None]:
    """Within the block, `pack_q4` / `pack_q8` / `pack_q8_codes` write their packed tensors into a
    `HugePageArena` (yielded; None where it is off or unsupported). `enabled` None: ZILI_HUGEPAGE_WEIGHTS
    (default on). Not reentrant across threads: a model load packs on one thread."""
    if enabled is None:
        enabled = envs.hugepage_weights_enabled()
    if not enabled or not HugePageArena.supported() or _arena:
        yield _arena[-1] if _arena else None
        return
    arena = HugePageArena()
    _arena.append(arena)
    try:
        yield arena
    finally:
        _arena.pop()


def _packed_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return _arena[-1].empty(shape, dtype) if _arena else torch.empty(shape, dtype=dtype)


def _pad(t: torch.Tensor, rows: int, cols: int, value: float = 0) -> torch.Tensor:
    """Pad a 2-D tensor at the end of both dimensions up to [rows, cols]."""
    if tuple(t.shape) == (rows, cols):
        return t
    return torch.nn.functional.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]), value=value)


def pack_q4(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> Q4Packed:
    """codes [N, K] (integers 0..15), scale and minimum [N, ceil(K/32)] (w = code * scale + minimum
    per group of 32 input features) -> the kernel's blocks. Scales and mins are stored as float16 (GGUF's
    own type for Q4_0/Q4_1 scales and mins: exact for those). Q4_K's are products of a float16 super-block
    scale and a 6-bit integer (up to 17 significant bits): rounded here, within 2^-11 of each (relative),
    so its weights are not the file's bit for bit. ValueError on codes outside 0..15 or shapes that do
    not agree."""
    n, k = codes.shape
    kb, ng = -(-k // GROUP), -(-n // ROWS)
    if scale.shape != (n, kb) or minimum.shape != (n, kb):
        raise ValueError(f"scale and minimum must be [{n}, {kb}], got {list(scale.shape)} and {list(minimum.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("4-bit codes must lie in 0..15")
    c = _pad(codes.to(torch.uint8), ng * ROWS, kb * GROUP).reshape(ng, ROWS, kb, 4, 8).permute(0, 2, 3, 1, 4)
    qs = _packed_empty((ng, kb, 4, ROWS, 4), torch.uint8)
    torch.bitwise_or(c[..., :4], c[..., 4:] << 4, out=qs)
    parts = [_pad(t.float(), ng * ROWS, kb).reshape(ng, ROWS, kb).permute(0, 2, 1) for t in (scale, minimum)]
    dm = _packed_empty((ng, kb, 2, ROWS), torch.float16)
    dm.copy_(torch.stack(parts, dim=2))  # [NG, KB, 2, 16]
    return Q4Packed(qs, dm, n, k)


# Rows packed at once by `pack_q8` (a multiple of ROWS): bounds its float32 temporaries to a few
# MiB per chunk instead of several copies of the whole weight (a 262k-token LM head is 671 MB in fp32).
PACK_CHUNK_ROWS = 2048


def pack_q8(weight: torch.Tensor) -> Q8Packed:
    """A float weight [N, K] -> int8 codes with one float16 scale per row and block of 32
    (symmetric, d = max|w| / 127: GGUF Q8_0's rule, so a dequantized Q8_0 tensor gets its own codes
    back). Packed PACK_CHUNK_ROWS rows at a time."""
    n, k = weight.shape
    kb, ng = -(-k // GROUP), -(-n // ROWS)
    qs = _packed_empty((ng, kb, 8, ROWS, 4), torch.uint8)
    d_out = _packed_empty((ng, kb, ROWS), torch.float16)
    for start in range(0, ng * ROWS, PACK_CHUNK_ROWS):
        rows = min(PACK_CHUNK_ROWS, ng * ROWS - start)
        w = _pad(weight[start:start + rows].float(), rows, kb * GROUP).reshape(rows, kb, GROUP)
        d = (w.abs().amax(dim=-1) / 127.0).to(torch.float16)
        inv = torch.where(d.float() > 0, 1.0 / d.float(), torch.zeros_like(d, dtype=torch.float32))
        codes = torch.round(w * inv[..., None]).clamp(-127, 127).to(torch.int8)
        _place_q8(qs, d_out, start, codes, d)
    return Q8Packed(qs, d_out, n, k)


def pack_q8_codes(codes: torch.Tensor, d: torch.Tensor) -> Q8Packed:
    """Int8 codes [N, K] with float16 scales [N, K/32] (GGUF Q8_0 blocks as they are stored:
    w = d * code) -> the kernel's blocks, without going through floats. ValueError on shapes that
    do not agree or K not a multiple of 32."""
    n, k = codes.shape
    if k % GROUP or tuple(d.shape) != (n, k // GROUP):
        raise ValueError(f"Q8_0 codes [N, K] need K a multiple of {GROUP} and scales [N, K/{GROUP}]; "
                         f"got {list(codes.shape)} and {list(d.shape)}")
    kb, ng = k // GROUP, -(-n // ROWS)
    qs = _packed_empty((ng, kb, 8, ROWS, 4), torch.uint8)
    d_out = _packed_empty((ng, kb, ROWS), torch.float16)
    for start in range(0, ng * ROWS, PACK_CHUNK_ROWS):
        rows = min(PACK_CHUNK_ROWS, ng * ROWS - start)
        c = _pad(codes[start:start + rows].to(torch.int8), rows, k).reshape(rows, kb, GROUP)
        _place_q8(qs, d_out, start, c, _pad(d[start:start + rows].to(torch.float16), rows, kb))
    return Q8Packed(qs, d_out, n, k)


def _place_q8(qs: torch.Tensor, d_out: torch.Tensor, start: int, codes: torch.Tensor, d: torch.Tensor) -> None:
    """Write rows start.. (a multiple of ROWS) of int8 codes [rows, KB, 32] and scales [rows, KB]
    into the packed qs [NG, KB, 8, 16, 4] (code + 128) and d [NG, KB, 16]."""
    rows, kb = d.shape
    g0, g = start // ROWS, rows // ROWS
    biased = (codes.to(torch.int16) + 128).to(torch.uint8)
    qs[g0:g0 + g] = biased.reshape(g, ROWS, kb, 8, 4).permute(0, 2, 3, 1, 4)
    d_out[g0:g0 + g] = d.reshape(g, ROWS, kb).permute(0, 2, 1)


def q8_rows(p: Q8Packed, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows `ids` (int64, any shape) of the weight, dequantized: [*ids.shape, K] in `dtype`, each
    element d * code computed in float32 (so rows of a Q8_0 tensor are its exact values). Serves an
    embedding lookup and the LM head's top-k refinement from the packed copy alone."""
    flat = ids.reshape(-1)
    g, r = flat // ROWS, flat % ROWS
    codes = p.qs[g, :, :, r, :].reshape(flat.shape[0], -1, GROUP).to(torch.int16) - 128  # [T, KB, 32]
    scales = p.d[g, :, r].float()  # [T, KB]
    w = (codes.float() * scales[..., None]).reshape(flat.shape[0], -1)[:, : p.in_features]
    return w.to(dtype).reshape(*ids.shape, p.in_features)


def dequantize_q4(p: Q4Packed) -> torch.Tensor:
    """The float32 weight [N, K] the kernel multiplies by (for references and tests)."""
    ng, kb = p.qs.shape[:2]
    c = torch.cat([p.qs & 0x0F, p.qs >> 4], dim=-1)  # [NG, KB, 4, 16, 8]
    codes = c.permute(0, 3, 1, 2, 4).reshape(ng * ROWS, kb, GROUP).float()
    dm = p.dm.float().permute(0, 3, 1, 2).reshape(ng * ROWS, kb, 2)
    w = codes * dm[..., 0:1] + dm[..., 1:2]
    return w.reshape(ng * ROWS, kb * GROUP)[: p.out_features, : p.in_features]


def dequantize_q8(p: Q8Packed) -> torch.Tensor:
    ng, kb = p.qs.shape[:2]
    codes = p.qs.permute(0, 3, 1, 2, 4).reshape(ng * ROWS, kb, GROUP).float() - 128
    w = codes * p.d.float().permute(0, 2, 1).reshape(ng * ROWS, kb, 1)
    return w.reshape(ng * ROWS, kb * GROUP)[: p.out_features, : p.in_features]


def q4_matmul(x: torch.Tensor, w: Q4Packed, isa: str | None = None) -> torch.Tensor:
    """x [M, K] float32/bfloat16 -> x @ W^T [M, N] in x's dtype, on the given (default: selected) level."""
    return cpu_isa.ops(isa).q4_gemm(x, w.qs, w.dm, w.out_features)


def q8_matmul(x: torch.Tensor, w: Q8Packed, isa: str | None = None) -> torch.Tensor:
    """x [M, K] float32/bfloat16 -> x @ W^T [M, N] in x's dtype, on the given (default: selected) level."""
    return cpu_isa.ops(isa).q8_gemm(x, w.qs, w.d, w.out_features)
