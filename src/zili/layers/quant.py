"""Weights kept quantized in memory, and the matmuls that consume them.

Two packed forms:
  int4: 4-bit codes with a (scale, min) pair per group of 32 input features, w = q * scale + min.
  int8: 8-bit codes, w = q * scale (one scale per block of 32 on zili's kernels, per row otherwise).

On CPUs where zili's ISA-dispatched kernels build (`zili.kernels.cpu_isa`: avx512 / avx2 /
portable, chosen from the CPU at load time) both run there: activations quantized to int8 per
32-block inside the kernel and integer dot products (llama.cpp's Q8 activation scheme), fp32 or
bf16 activations in and out; no emulated bf16 on CPUs without it. Elsewhere (no compiler,
ZILI_CPU_KERNELS=0) torch's own kernels run: `aten._weight_int4pack_mm_for_cpu` and
`_weight_int8pack_mm`, fed bf16 activations (with fp32 input they fall onto a path 10-80x slower).

GGUF Q4_0, Q4_1 and Q4_K blocks map onto int4 without touching the codes: each 32-element group
has w = q * d + m (float16 scales on zili's kernels: exact for Q4_0/Q4_1, Q4_K's sub-block products
d * sc and dmin * m rounded to within 2^-11; bf16 on torch's).
Q8_0, Q5_K and Q6_K, whose codes do not fit in 4 bits, become int8. Float checkpoints can be
quantized on load to either form.

Quantized kernels win at small row counts (decode); at larger ones (prefill, big batches) the
dense matmul is faster, so a layer switches by row count. Past the limit a layer on zili's kernels
dequantizes its codes into a scratch buffer for the dense matmul (`dense_matmul`: no dense copy
held, ZILI_DENSE_WEIGHTS=dequant, the default); one on torch's kernels, or with ZILI_DENSE_WEIGHTS=copy,
keeps a dense copy. Which packed kernel each layer shape runs, and up to which row count, is
measured per machine (zili.layers.quant_calibration).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from zili import envs
from zili.kernels import cpu_isa
from zili.kernels.cpu_quant import PACK_CHUNK_ROWS, Q8Packed, pack_q4, pack_q8, pack_q8_codes, q8_rows

GROUP = 32
# Row counts up to which the quantized kernel beats dense bf16 (measured on AVX512 CPUs; the
# tuner can override it per machine).
DEFAULT_MAX_ROWS = 16


@dataclass
class GroupQuant:
    """4-bit codes [N, K] (int32, 0..15) with per-group scale and min [N, K/GROUP]: w = q*scale + min."""

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor


def _kernel_level(isa: str | None) -> str | None:
    """The zili kernel level to pack for, or None for torch's kernels. `isa`: a level, "torch", or
    None: what ZILI_PACKED_KERNELS forces ("zili": the selected level), else torch's. The engine
    passes the level measured per layer shape (zili.layers.quant_calibration); None is for direct use."""
    if isa == "torch" or not cpu_isa.enabled():
        return None
    if isa is None and (envs.get_str(envs.ZILI_PACKED_KERNELS) or "").lower() != "zili":
        return None
    level = isa or cpu_isa.selected()
    return level if cpu_isa.load(level) else None


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.dtype in (torch.float32, torch.bfloat16) else x.float()


class Int4Weight:
    """A [N, K] weight as 4-bit codes per group of 32 (`GroupQuant`); `matmul(x)` = x @ W^T for
    x [..., K] float32/bfloat16, in x's dtype. `isa` picks a kernel level (default: the CPU's;
    "torch": torch's int4 kernel)."""

    def __init__(self, gq: GroupQuant, max_rows: int = DEFAULT_MAX_ROWS, isa: str | None = None) -> None:
        self.out_features, self.in_features = gq.codes.shape
        self.max_rows = max_rows
        self.isa = _kernel_level(isa)
        # zili's kernels compute each activation row alone (its own int8 quantization, the same
        # block loop), so a row's result does not depend on the row count; torch's are not checked.
        self.row_invariant = self.isa is not None
        if self.isa is not None:
            self.q4 = pack_q4(gq.codes, gq.scale, gq.minimum)
            self._gemm = cpu_isa.ops(self.isa).q4_gemm
            return
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(gq.codes.to(torch.int32), 2)
        zero = gq.minimum + 8 * gq.scale
        # [K/GROUP, N, 2] bf16, the layout the kernel reads.
        self.scales_zeros = torch.stack([gq.scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.isa is not None:
            y = self._gemm(_rows(x), self.q4.qs, self.q4.dm, self.out_features)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP, self.scales_zeros)
        return y.to(x.dtype)

    @property
    def dequantizes(self) -> bool:
        """Whether `dense_matmul` runs here (zili's kernels: their build has the dequantize op)."""
        return self.isa is not None

    def dense_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T like `matmul`, by the dense matmul (oneDNN / MKL) on the weight dequantized a few MiB
        at a time into a per-thread scratch buffer: for row counts past `max_rows`, where the dense
        product is faster, without holding a dense copy. zili's kernels only (`dequantizes`)."""
        y = cpu_isa.ops(self.isa).q4_dequant_linear(_rows(x), self.q4.qs, self.q4.dm, self.out_features)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def nbytes(self) -> int:
        if self.isa is not None:
            return self.q4.nbytes()
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2


class Int8Weight:
    """A [N, K] float weight as 8-bit codes: per block of 32 with a float16 scale on zili's kernels
    (GGUF Q8_0's layout, so a dequantized Q8_0 tensor keeps its codes), per row on torch's."""

    def __init__(self, weight: torch.Tensor, max_rows: int = DEFAULT_MAX_ROWS, isa: str | None = None,
                 q8: Q8Packed | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.max_rows = max_rows
        self.isa = _kernel_level(isa)
        # zili's kernels compute each activation row alone (its own int8 quantization, the same
        # block loop), so a row's result does not depend on the row count; torch's are not checked.
        self.row_invariant = self.isa is not None
        # Whether the codes are a checkpoint's own (Q8_0 blocks), so `rows` returns its exact values.
        self.exact = q8 is not None and self.isa is not None
        if self.isa is not None:
            self.q8 = q8 if q8 is not None else pack_q8(weight.detach())
            self._gemm = cpu_isa.ops(self.isa).q8_gemm
            return
        # Per row, PACK_CHUNK_ROWS rows at a time: float32 temporaries of a few MiB, not of the
        # whole weight (a 262k-token LM head is 671 MB in fp32).
        n = weight.shape[0]
        self.qweight = torch.empty(weight.shape, dtype=torch.int8)
        self.scales = torch.empty(n, dtype=torch.bfloat16)
        for start in range(0, n, PACK_CHUNK_ROWS):
            w = weight[start:start + PACK_CHUNK_ROWS].detach().float()
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            self.qweight[start:start + len(w)] = torch.round(w / scale[:, None]).clamp(-127, 127)
            self.scales[start:start + len(w)] = scale

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.isa is not None:
            y = self._gemm(_rows(x), self.q8.qs, self.q8.d, self.out_features)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scales).to(x.dtype)

    @property
    def dequantizes(self) -> bool:
        """Whether `dense_matmul` runs here (zili's kernels: their build has the dequantize op)."""
        return self.isa is not None

    def dense_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T by the dense matmul on the weight dequantized into a scratch buffer (see
        `Int4Weight.dense_matmul`). zili's kernels only (`dequantizes`)."""
        y = cpu_isa.ops(self.isa).q8_dequant_linear(_rows(x), self.q8.qs, self.q8.d, self.out_features)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    @classmethod
    def from_q8_0(cls, codes: torch.Tensor, d: torch.Tensor, max_rows: int = DEFAULT_MAX_ROWS,
                  isa: str | None = None) -> Int8Weight:
        """GGUF Q8_0 blocks as stored (int8 codes [N, K], float16 scales [N, K/32]): zili's kernels
        take the codes unchanged (no float round trip, so `rows` gives the file's exact values);
        torch's kernel gets them requantized per row from the dequantized weight."""
        if _kernel_level(isa) is not None:
            return cls(torch.empty(codes.shape, device="meta"), max_rows, isa, pack_q8_codes(codes, d))
        n, k = codes.shape
        weight = (codes.float().reshape(n, k // GROUP, GROUP) * d.float()[..., None]).reshape(n, k)
        return cls(weight, max_rows, isa)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the weight, dequantized: [*ids.shape, K] in `dtype` (zili's kernels only;
        the checkpoint's exact values where `exact`)."""
        return q8_rows(self.q8, ids, dtype)

    def nbytes(self) -> int:
        if self.isa is not None:
            return self.q8.nbytes()
        return self.qweight.numel() + self.scales.numel() * 2


# ---- GGUF blocks -> group quantization -------------------------------------------------------

INT4_GGUF_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q4_K)


def _f16(block: np.ndarray, start: int) -> np.ndarray:
    return block[:, start:start + 2].copy().view(np.float16).astype(np.float32)[:, 0]


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 codes: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def gguf_group_quant(data: np.ndarray, qtype: QT, shape: tuple[int, int]) -> GroupQuant:
    """Decode Q4_0 / Q4_1 / Q4_K rows (uint8 [N, bytes_per_row]) into codes, scales and mins."""
    n, k = shape
    if qtype in (QT.Q4_0, QT.Q4_1):
        size = 18 if qtype == QT.Q4_0 else 20
        blocks = data.reshape(n * (k // 32), size)
        d = _f16(blocks, 0)
        m = -8.0 * d if qtype == QT.Q4_0 else _f16(blocks, 2)
        codes = _nibbles_32(blocks[:, size - 16:])
        scale, minimum = d, m
    elif qtype == QT.Q4_K:
        blocks = data.reshape(n * (k // 256), 144)
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, mn = _unpack_k4_scales(blocks[:, 4:16])  # [B, 8] each
        qs = blocks[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 64 elements
        codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)  # sub-block 2j: low, 2j+1: high
        scale = (d[:, None] * sc).reshape(-1)
        minimum = (-dmin[:, None] * mn).reshape(-1)
        codes = codes.reshape(-1, 32)
    else:
        raise ValueError(f"GGUF type {qtype.name} has no 4-bit group form; supported: Q4_0, Q4_1, Q4_K")
    groups = k // GROUP
    return GroupQuant(
        codes=torch.from_numpy(codes.astype(np.int32).reshape(n, k)),
        scale=torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(n, groups)),
        minimum=torch.from_numpy(np.ascontiguousarray(minimum, dtype=np.float32).reshape(n, groups)),
    )


def _unpack_k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K packs eight 6-bit scales and eight 6-bit mins into 12 bytes."""
    s = s.astype(np.uint16)
    sc = np.empty((s.shape[0], 8), dtype=np.float32)
    mn = np.empty((s.shape[0], 8), dtype=np.float32)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def float_group_quant(weight: torch.Tensor) -> GroupQuant:
    """Asymmetric 4-bit quantization per group of 32 input features (for float checkpoints)."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // GROUP, GROUP)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    codes = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return GroupQuant(codes.reshape(n, k), scale, lo)


def dequantize_group(gq: GroupQuant) -> torch.Tensor:
    n, k = gq.codes.shape
    w = gq.codes.reshape(n, k // GROUP, GROUP).float() * gq.scale[..., None] + gq.minimum[..., None]
    return w.reshape(n, k)


def concat_group_quants(parts: list[GroupQuant]) -> GroupQuant:
    return GroupQuant(*(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scale", "minimum")))
