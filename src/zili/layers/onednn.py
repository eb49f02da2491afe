"""Dense bf16 weights pre-packed once for oneDNN's CPU matmul (AMX / AVX512-BF16 tiles).

`F.linear` on a CPU hands oneDNN a plain [N, K] weight, and oneDNN re-blocks it into the layout
its AMX kernel reads on every call. For one small model's decode step at 64 sequences that
re-blocking is half the matmul time: on the 2-core Sapphire Rapids VM a [64, 576] x [576, 3072]
product takes 297 us through `F.linear` and 149 us from a pre-packed weight, the LM head 4.6 ms
and 2.2 ms (`benchmarks/notes/cpu-speed.md`). The results are bitwise the same (one oneDNN
kernel, same accumulation), so packing changes speed only.

The packed tensor is opaque (mkldnn layout), which torch.compile cannot take as a graph input.
So the layer holds an integer handle into this module's registry and calls the operator
`zili_onednn::linear(x, handle, out_features, bias)`, which Inductor treats as an opaque call with
a known output shape: the same code runs eagerly (prefill) and inside the compiled decode step.

`pack_dense_weights` packs every plain `Linear` with a bf16 weight. A layer's dense weight is then
released unless something else reads it (the LM head's fp32 refinement, tied embeddings, a
model's own list): the packed copy replaces it, it does not sit beside it.
ZILI_ONEDNN=0 turns packing off (for comparisons).
"""

from __future__ import annotations

import itertools
import threading
import weakref

import torch
from torch import nn

from zili import envs
from zili.layers.linear import Linear, dense_weight_keeper

# handle -> packed weight; an entry lives as long as its PackedDense (dropped when that is collected,
# so a discarded engine's weights do not stay behind in this registry).
_PACKED: dict[int, torch.Tensor] = {}
_handles = itertools.count()
_lock = threading.Lock()
_lib: torch.library.Library | None = None


def available(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU run oneDNN's bf16 matmul on packed weights."""
    if not envs.onednn_enabled() or dtype != torch.bfloat16:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _register_op() -> None:
    global _lib
    with _lock:
        if _lib is not None:
            return
        lib = torch.library.Library("zili_onednn", "DEF")
        lib.define("linear(Tensor x, int handle, int out_features, Tensor? bias) -> Tensor")

        def _linear(x: torch.Tensor, handle: int, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(x, _PACKED[handle], bias, "none", [], "")

        def _fake(x: torch.Tensor, handle: int, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
            return x.new_empty(*x.shape[:-1], out_features)

        lib.impl("linear", _linear, "CPU")
        torch.library.register_fake("zili_onednn::linear", _fake, lib=lib)
        _lib = lib


class PackedDense:
    """One weight [N, K] in oneDNN's blocked layout; `matmul(x, bias)` = F.linear(x, weight, bias)."""

    def __init__(self, weight: torch.Tensor, batch_hint: int = 64) -> None:
        _register_op()
        self.out_features, self.in_features = weight.shape
        self.handle = next(_handles)
        _PACKED[self.handle] = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_hint)
        weakref.finalize(self, _PACKED.pop, self.handle, None)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            return torch.ops.zili_onednn.linear(x.to(torch.bfloat16), self.handle, self.out_features,
                                                bias).to(x.dtype)
        return torch.ops.zili_onednn.linear(x, self.handle, self.out_features, bias)

    def nbytes(self) -> int:
        return self.out_features * self.in_features * 2


def packed_only_bytes(model: nn.Module) -> int:
    """Bytes of weights held only in packed form (their dense `weight` was released)."""
    return sum(m.packed.nbytes() for m in model.modules()
               if isinstance(m, Linear) and m.packed is not None and m.weight.numel() == 0)


def pack_dense_weights(model: nn.Module) -> int:
    """Pack every plain `Linear` with a bf16 weight (the caller checked `available`); returns how
    many were packed. Dense weights are released afterwards except for the model's
    `dense_weight_readers` and weights shared with another module (tied embeddings)."""
    keeps = dense_weight_keeper(model)
    count = 0
    for name, module in model.named_modules():
        if type(module) is not Linear or module.weight.dtype != torch.bfloat16 or module.weight.numel() == 0:
            continue
        module.packed = PackedDense(module.weight)
        count += 1
        if keeps(name, module):
            continue
        module.weight.data = torch.empty(0, dtype=module.weight.dtype)  # the packed copy replaces it
    return count
