"""Block-scaled FP8 checkpoints (DeepSeek V3 format): dequantize on load.

A quantized linear weight W [N, K] is stored as `<name>.weight` in float8_e4m3fn plus
`<name>.weight_scale_inv` [ceil(N/bn), ceil(K/bk)] in float32, one scale per bn x bk block
(`quantization_config.weight_block_size`, 128 x 128 for DeepSeek V3):

    W[i, j] = weight[i, j] * weight_scale_inv[i // bn, j // bk]

Edge blocks may be partial. `quantize_block_fp8` is the inverse, for tests and tools.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK_SIZE = (128, 128)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def block_size_from_config(hf_config: dict[str, Any]) -> tuple[int, int]:
    """The (rows, cols) scale block of an HF config.json's fp8 quantization_config."""
    quant = hf_config.get("quantization_config") or {}
    method = quant.get("quant_method")
    if method not in (None, "fp8"):
        raise ValueError(f"quantization method {method!r} is not supported; supported: fp8 (block-scaled e4m3)")
    block = quant.get("weight_block_size") or DEFAULT_BLOCK_SIZE
    return int(block[0]), int(block[1])


def dequantize_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block_size: Sequence[int],
                         dtype: torch.dtype) -> torch.Tensor:
    """weight [N, K] fp8, scale_inv [ceil(N/bn), ceil(K/bk)] -> [N, K] in `dtype` (computed in float32)."""
    N, K = weight.shape
    bn, bk = block_size
    expected = (-(-N // bn), -(-K // bk))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv of a [{N}, {K}] weight in {bn}x{bk} blocks must have shape "
                         f"{list(expected)}, got {list(scale_inv.shape)}")
    scale = scale_inv.float().repeat_interleave(bn, dim=0)[:N].repeat_interleave(bk, dim=1)[:, :K]
    return (weight.float() * scale).to(dtype)


def quantize_block_fp8(weight: torch.Tensor, block_size: Sequence[int] = DEFAULT_BLOCK_SIZE
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (float8_e4m3fn [N, K], float32 weight_scale_inv [ceil(N/bn), ceil(K/bk)]), per-block absmax."""
    N, K = weight.shape
    bn, bk = block_size
    nb, kb = -(-N // bn), -(-K // bk)
    padded = torch.zeros(nb * bn, kb * bk, dtype=torch.float32, device=weight.device)
    padded[:N, :K] = weight.float()
    blocks = padded.view(nb, bn, kb, bk)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [nb, kb]
    scale_inv = amax / _E4M3_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(nb * bn, kb * bk)[:N, :K].contiguous(), scale_inv


class BlockFP8Dequantizer:
    """Finds each fp8 weight's scale (in whichever shard holds it) and dequantizes it."""

    def __init__(self, files: Sequence[Path], hf_config: dict[str, Any]) -> None:
        self.block_size = block_size_from_config(hf_config)
        self.files = list(files)
        self._scale_file: dict[str, Path] | None = None  # built on the first fp8 tensor
        self._open: dict[Path, Any] = {}

    def _scale_index(self) -> dict[str, Path]:
        if self._scale_file is None:
            self._scale_file = {}
            for file in self.files:
                with safe_open(str(file), framework="pt") as f:
                    self._scale_file.update((name, file) for name in f.keys() if name.endswith(SCALE_SUFFIX))
        return self._scale_file

    @staticmethod
    def is_scale(name: str) -> bool:
        return name.endswith(SCALE_SUFFIX)

    def __call__(self, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The tensor in `dtype`, dequantized when it is fp8 with a block scale; others pass unchanged."""
        if tensor.dtype not in FP8_DTYPES:
            return tensor
        scale_name = name + SCALE_SUFFIX
        file = self._scale_index().get(scale_name)
        if file is None:
            raise ValueError(f"fp8 tensor {name!r} has no {scale_name!r}; only block-scaled fp8 is supported")
        if file not in self._open:
            self._open[file] = safe_open(str(file), framework="pt")
        scale = self._open[file].get_tensor(scale_name)
        try:
            return dequantize_block_fp8(tensor, scale, self.block_size, dtype)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
