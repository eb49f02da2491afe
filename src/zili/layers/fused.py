"""The elementwise chains of a decoder layer, each behind one function a platform may fuse.

Eagerly, an RMSNorm is eight kernels (upcast, square, mean, add, rsqrt, scale, downcast, weight), a
rotary embedding seven per tensor, SwiGLU three. On a GPU each kernel costs a few microseconds
however small its work, so in a batch-1 decode step of an 8B model these chains (~30 launches per
layer) cost about half as much time as reading the weights. `enable_fusion` prepares each
function's torch.compile'd form (one generated kernel per function, for any number of tokens) and
`compiled_ops()` runs them, around the capture of decode graphs; the models call the functions
below and never know which form runs. The plain forms are the
reference: they match HF transformers' arithmetic, casts included.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from zili import envs

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
    return F.silu(gate).mul_(up)  # in place: one [tokens, I] temporary fewer (6 MiB per 2,048 SmolLM2 tokens)


REFERENCE: dict[str, Callable] = {"rms_norm": _rms_norm, "add_rms_norm": _add_rms_norm, "rotary": _rotary,
                                  "rotary_qk": _rotary_qk, "silu_mul": _silu_mul}
_compiled: dict[str, Callable] = {}
_active: dict[str, Callable] = REFERENCE  # swapped for _compiled inside `compiled_ops()`


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


def allow_recompiles(limit: int) -> None:
    """Let torch.compile keep up to `limit` graphs per compiled function (dynamo's default is 8, after
    which a fullgraph compile fails hard). Only ever raises the limit; process-wide, as dynamo's config is."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))


def enable_fusion() -> None:
    """Prepare the compiled forms (each builds its kernel on its first call, for any token count).
    They run only inside `compiled_ops()`: a compiled function costs ~100+ us of host time per call
    (guards, dispatch), more than the eager chain it replaces, so it pays only where the host is out
    of the loop, in a captured device graph that replays the kernels."""
    if _compiled:
        return
    import torch._inductor.config as inductor_config

    envs.use_zili_inductor_cache()
    # Round where the reference rounds (the bf16 cast before the norm's weight multiply): the fused
    # kernels then give the eager results bit for bit on the CPU, to the last bit or so on GPUs.
    inductor_config.emulate_precision_casts = True
    # A process may hold models of several dtypes and norm widths: one graph each, not a hard stop.
    allow_recompiles(64)
    for name, fn in REFERENCE.items():
        _compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    logger.info("fused elementwise ops ready: %s (torch.compile, used in captured decode graphs)",
                ", ".join(REFERENCE))


@contextlib.contextmanager
def compiled_ops() -> Iterator[None]:
    """Run the compiled forms within (a no-op before `enable_fusion`)."""
    global _active
    previous = _active
    _active = _compiled if _compiled else REFERENCE
    try:
        yield
    finally:
        _active = previous
