"""RMSNorm, computed in float32 like HF's LlamaRMSNorm so low-precision models match it."""

from __future__ import annotations

import torch
from torch import nn

from zili.layers import fused


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), normalised over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, self(x + delta)), one kernel where the platform fuses."""
        return fused.add_rms_norm(x, delta, self.weight, self.eps)
