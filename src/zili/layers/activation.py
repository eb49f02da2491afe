"""Activations."""

from __future__ import annotations

import torch
from torch import nn

from zili.layers import fused


class SiluAndMul(nn.Module):
    """SwiGLU on a fused gate|up projection: x [..., 2I] -> silu(gate) * up [..., I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.silu_mul(x)
