"""What every causal LM here shares: the engine-facing forward / compute_logits, and loading
HF-named checkpoint tensors into fused, possibly tensor-parallel, modules.

A family subclass builds `self.model` and `self.lm_head`, names its fused projections in
`fused_projections`, and may skip names (`_skipped`) or claim modules that load differently
(`_module_targets`, e.g. stacked experts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from zili.config import ModelConfig
from zili.kernels.attention import AttentionMetadata
from zili.layers.linear import NOT_LOADED, Linear
from zili.layers.parallel import param_loader

Loader = Callable[[torch.Tensor], object]

# Checkpoint buffers that are not parameters (recomputed here).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


# top_k_indices' chunk width: the k chunks with the largest maxima hold the k largest values.
TOP_K_CHUNK = 64


def top_k_indices(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [N, k] of each row's k largest values of `logits` [N, V] (the values torch.topk finds;
    among equal values, possibly other indices). Two stages: the maximum of every TOP_K_CHUNK-wide chunk,
    the k chunks with the largest maxima, then the top k of those chunks' elements (and of the last
    V % TOP_K_CHUNK, always candidates). Each of the k largest values lies in one of those chunks: a chunk
    left out has k chunk maxima at least as large as all of its elements. torch's topk over a 49,152-wide
    row took ~300 us of a ~8 ms single-stream decode step on one core; this reads the row once."""
    n, vocab = logits.shape
    k = min(k, vocab)
    chunks = vocab // TOP_K_CHUNK
    if chunks < 4 * k:
        return logits.topk(k, dim=-1).indices
    body = chunks * TOP_K_CHUNK
    maxima = logits[:, :body].reshape(n, chunks, TOP_K_CHUNK).amax(-1)  # [N, chunks]
    best = maxima.topk(k, dim=-1).indices  # [N, k]
    lanes = torch.arange(TOP_K_CHUNK, device=logits.device)
    candidates = (best.unsqueeze(-1) * TOP_K_CHUNK + lanes).reshape(n, k * TOP_K_CHUNK)
    if body < vocab:
        tail = torch.arange(body, vocab, device=logits.device).expand(n, vocab - body)
        candidates = torch.cat([candidates, tail], dim=1)
    top = logits.gather(1, candidates).topk(k, dim=-1).indices
    return candidates.gather(1, top)


def refine_top_logits(logits: torch.Tensor, hidden: torch.Tensor,
                      weight: torch.Tensor | Callable[[torch.Tensor, torch.dtype], torch.Tensor], k: int,
                      bias: torch.Tensor | None = None, batch_invariant: bool = False) -> None:
    """Overwrite, in place, each row's k largest logits with fp32 dot products against `weight`
    ([vocab, H], or a function (ids, dtype) -> those rows: a packed copy's `rows`).
    `batch_invariant`: one [k, H] x [H] product per row, whose result cannot depend on N (a batched
    product's blocking does)."""
    top = top_k_indices(logits, k)  # [N, k]
    rows = weight.detach()[top].float() if isinstance(weight, torch.Tensor) else weight(top, torch.float32)  # [N, k, H]
    if batch_invariant:
        states = hidden.float()
        exact = torch.stack([torch.mv(rows[i], states[i]) for i in range(rows.shape[0])]) if rows.shape[0] else \
            rows.new_zeros(0, rows.shape[1])
    else:
        exact = torch.bmm(rows, hidden.float().unsqueeze(-1)).squeeze(-1)
    if bias is not None:
        exact += bias.detach()[top].float()
    logits.scatter_(1, top, exact)


class CausalLM(nn.Module):
    family = "model"
    # Fused module name -> the HF projection names it concatenates, in row order.
    fused_projections: dict[str, tuple[str, ...]] = {}
    config: ModelConfig
    model: nn.Module
    lm_head: nn.Module

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [T] -> hidden [T, H]."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    # How many of the highest logits are recomputed exactly when the head's matmul is lossy.
    refine_top_k = 8
    # Modules (names or leaf names) whose dense `weight` the forward reads directly, so a packed
    # copy (zili.layers.onednn) must not replace it: the head's top-k refinement reads its rows.
    dense_weight_readers: tuple[str, ...] = ("lm_head",)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, vocab] float32.

        A bf16 head rounds logits to 8 mantissa bits (0.125 apart near 20) and an int8 head adds
        its own requantization error, enough to flip near-tied argmaxes. The leading candidates
        are therefore recomputed in fp32 from the dense weight, which makes greedy decoding and
        the top of every distribution exact for a fraction of a millisecond per step."""
        logits = self.lm_head(hidden).float()
        head = self.lm_head
        if self.refine_top_k and type(head) is Linear and (hidden.dtype != torch.float32 or head.quant is not None):
            # A tied head whose dense table was released reads its rows from the packed int8 copy.
            packed_rows = getattr(head.quant, "rows", None) if head.weight.numel() == 0 else None
            refine_top_logits(logits, hidden, packed_rows or head.weight, self.refine_top_k, head.bias,
                              head.row_tile is not None)
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in. ValueError on a missing, unexpected or mis-shaped tensor."""
        targets = self._weight_targets()
        pending = set(targets)
        for name, tensor in weights:
            if self._skipped(name):
                continue
            load = targets.get(name)
            if load is None:
                raise ValueError(f"unexpected tensor {name!r} for {self.config.hf_architecture or self.family} model")
            try:
                load(tensor)
            except ValueError as e:
                raise ValueError(f"tensor {name!r}: {e}") from None
            pending.discard(name)
        if pending:
            shown = ", ".join(sorted(pending)[:8]) + (", ..." if len(pending) > 8 else "")
            raise ValueError(f"checkpoint is missing {len(pending)} tensor(s): {shown}")

    def _skipped(self, name: str) -> bool:
        return name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and self.config.tie_word_embeddings)

    def _module_targets(self, module_name: str, module: nn.Module) -> dict[str, Loader] | None:
        """Targets for a module that does not load parameter by parameter; None for the default."""
        return None

    def _weight_targets(self) -> dict[str, Loader]:
        """HF tensor name -> function copying that tensor into this model."""
        targets: dict[str, Loader] = {}
        for module_name, module in self.named_modules():
            if module_name == "lm_head" and self.config.tie_word_embeddings:
                continue
            special = self._module_targets(module_name, module)
            if special is not None:
                targets.update(special)
                continue
            prefix, _, leaf = module_name.rpartition(".")
            for param_name, param in module.named_parameters(recurse=False):
                if isinstance(module, Linear):
                    for shard, hf_leaf in enumerate(self.fused_projections.get(leaf, (leaf,))):
                        hf_name = f"{prefix}.{hf_leaf}.{param_name}" if prefix else f"{hf_leaf}.{param_name}"
                        targets[hf_name] = _linear_loader(module, param_name, shard)
                else:
                    targets[f"{module_name}.{param_name}" if module_name else param_name] = _param_loader(param)
        return targets


def _linear_loader(module: Linear, param_name: str, shard: int) -> Loader:
    return lambda t: module.load(param_name, t, shard)


def _param_loader(param: nn.Parameter) -> Loader:
    sharded = param_loader(param)  # a tensor-parallel shard slices the checkpoint tensor itself
    if sharded is not None:
        return sharded

    def load(tensor: torch.Tensor) -> None:
        if tensor is NOT_LOADED:  # deferred by the loader through the Linear sharing it (a tied LM head)
            if param.numel() != 0:
                raise ValueError("this parameter was not deferred but came unread")
            return
        if tensor.shape != param.shape:
            raise ValueError(f"expected shape {list(param.shape)}, got {list(tensor.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
    return load
