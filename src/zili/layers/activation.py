"""Activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zili.layers import fused


class SiluAndMul(nn.Module):
    """SwiGLU on a fused gate|up projection: x [..., 2I] -> silu(gate) * up [..., I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.silu_mul(x)


class GeluTanhAndMul(nn.Module):
    """GeGLU on a fused gate|up projection: x [..., 2I] -> gelu_tanh(gate) * up [..., I] (Gemma's
    MLP; the tanh approximation of GELU, transformers' "gelu_pytorch_tanh")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


_ACT_AND_MUL = {"silu": SiluAndMul, "gelu_pytorch_tanh": GeluTanhAndMul}


def act_and_mul(hidden_act: str) -> nn.Module:
    """The gated activation for ModelConfig.hidden_act; ValueError naming the supported ones."""
    if hidden_act not in _ACT_AND_MUL:
        raise ValueError(f"hidden_act {hidden_act!r} is not supported; supported: {', '.join(_ACT_AND_MUL)}")
    return _ACT_AND_MUL[hidden_act]()
