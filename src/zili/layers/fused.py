"""The elementwise chains of a decoder layer, each behind one function a platform may fuse.

Eagerly, an RMSNorm is eight kernels (upcast, square, mean, add, rsqrt, scale, downcast, weight), a
rotary embedding seven per tensor, SwiGLU three. On a GPU each kernel costs a few microseconds
however small its work, so in a batch-1 decode step of an 8B model these chains (~30 launches per
layer) cost about half as much time as reading the weights. `enable_fusion` swaps every function
here for its torch.compile'd form (one generated kernel per function, for any number of tokens);
the models call the functions below and never know which form runs. The plain forms are the
reference: they match HF transformers' arithmetic, casts included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    # HF casts back before the weight multiply; doing the same keeps bf16 results identical.
    return weight * x32.to(dtype)


def _add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)): a residual add and the norm that reads it."""
    x = x + delta
    return x, _rms_norm(x, weight, eps)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotary(q, cos, sin), _rotary(k, cos, sin)


def _silu_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


REFERENCE: dict[str, Callable] = {"rms_norm": _rms_norm, "add_rms_norm": _add_rms_norm, "rotary": _rotary,
                                  "rotary_qk": _rotary_qk, "silu_mul": _silu_mul}
_active: dict[str, Callable] = dict(REFERENCE)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _active["rms_norm"](x, weight, eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return _active["add_rms_norm"](x, delta, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _active["rotary"](x, cos, sin)


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    return _active["rotary_qk"](q, k, cos, sin)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    return _active["silu_mul"](x)


def enable_fusion() -> None:
    """Compile each function once for any token count (the first call of each builds its kernel)."""
    if fusion_enabled():
        return
    import torch._inductor.config as inductor_config

    from zili.engine.compiled_decode import _inductor_cache_dir

    _inductor_cache_dir()
    # Round where the reference rounds (the bf16 cast before the norm's weight multiply): the fused
    # kernels then give the eager results bit for bit on the CPU, to the last bit or so on GPUs.
    inductor_config.emulate_precision_casts = True
    for name, fn in REFERENCE.items():
        _active[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    logger.info("fused elementwise ops: %s (torch.compile)", ", ".join(REFERENCE))


def disable_fusion() -> None:
    _active.update(REFERENCE)


def fusion_enabled() -> bool:
    return _active["rms_norm"] is not REFERENCE["rms_norm"]
