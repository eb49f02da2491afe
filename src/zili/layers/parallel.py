"""Tensor-parallel layers: each rank holds a slice of a weight and the ranks combine their results.

    column-parallel  W's output rows are split: rank r computes y[:, its rows]; no communication
    row-parallel     W's input columns are split: rank r computes a partial x[:, its cols] W^T,
                     and an all-reduce sums the partials
    vocab embedding  each rank holds a range of the vocabulary, returns zeros for other ids,
                     and an all-reduce fills them in
    LM head          column-parallel over the vocabulary; the slices are gathered on rank 0,
                     the only rank that samples

A split that does not divide evenly is padded: every rank gets the same local size, and rows (or
columns) past the end of the real tensor are zero, so they contribute nothing. Attention heads are
split in units of KV heads (`split_heads`); when there are fewer KV heads than ranks and the ranks
are a multiple of them, each KV head is replicated on tp / num_kv ranks instead.

With one rank nothing here is used: the factories return the plain layers, so the single-device
forward pass is the same code as without tensor parallelism.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TypeGuard

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from zili.config import ModelConfig
from zili.layers.embedding import VocabEmbedding
from zili.layers.linear import Linear


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group (`group`: a torch.distributed process group)."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None

    def split(self, n: int) -> ShardRange:
        """An even split of n rows (padded so that every rank has the same local size)."""
        local = -(-n // self.size)
        start = min(self.rank * local, n)
        return ShardRange(start, min(start + local, n), local, n)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def gather_on_first(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's x along the last dim on rank 0; other ranks get their own x back."""
        x = x.contiguous()
        if self.rank != 0:
            dist.gather(x, None, dst=0, group=self.group)
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.gather(x, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=-1)


def active(tp: TensorParallel | None) -> TypeGuard[TensorParallel]:
    return tp is not None and tp.size > 1


@dataclass(frozen=True)
class ShardRange:
    """Rows [start, stop) of a checkpoint dimension of length `full`, held in `size` local rows
    (rows past stop - start are zero padding)."""

    start: int
    stop: int
    size: int
    full: int

    @property
    def count(self) -> int:
        return self.stop - self.start

    def scaled(self, unit: int) -> ShardRange:
        """The same split counted in rows of `unit` (heads -> head_dim rows per head)."""
        return ShardRange(self.start * unit, self.stop * unit, self.size * unit, self.full * unit)

    def take(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of `tensor` along `dim`, unpadded. Accepts the full tensor or an
        already-sliced one (the sharded weight reader hands those over)."""
        length = tensor.shape[dim]
        if length == self.full:
            return tensor.narrow(dim, self.start, self.count)
        if length == self.count:
            return tensor
        raise ValueError(f"expected {self.full} (or this rank's {self.count}) along dim {dim}, got {length}")

    def copy_into(self, target: torch.Tensor, tensor: torch.Tensor, dim: int) -> None:
        """target (size along dim) = this rank's slice of tensor, zero-padded."""
        piece = self.take(tensor, dim)
        expected = list(target.shape)
        expected[dim] = piece.shape[dim]
        if list(piece.shape) != expected:
            raise ValueError(f"expected shape {self._full_shape(target, dim)}, got {list(tensor.shape)}")
        with torch.no_grad():
            target.narrow(dim, 0, self.count).copy_(piece)
            target.narrow(dim, self.count, self.size - self.count).zero_()

    def _full_shape(self, target: torch.Tensor, dim: int) -> list[int]:
        shape = list(target.shape)
        shape[dim] = self.full
        return shape


@dataclass(frozen=True)
class HeadSplit:
    """The attention heads one rank holds: query heads `q`, KV heads `kv` (counted in heads)."""

    q: ShardRange
    kv: ShardRange


def split_heads(num_heads: int, num_kv_heads: int, tp: TensorParallel | None) -> HeadSplit:
    """Query and KV heads for this rank. Query heads stay with their KV head (GQA groups).

    KV heads are split evenly, padded with zero heads when they do not divide; with fewer KV
    heads than ranks (and ranks a multiple of them) each KV head is replicated instead."""
    if not active(tp):
        return HeadSplit(ShardRange(0, num_heads, num_heads, num_heads),
                         ShardRange(0, num_kv_heads, num_kv_heads, num_kv_heads))
    group = num_heads // num_kv_heads
    if num_kv_heads < tp.size and tp.size % num_kv_heads == 0:
        replicas = tp.size // num_kv_heads
        if group % replicas:
            raise ValueError(f"tensor parallel size {tp.size} does not divide the {num_heads} attention heads "
                             f"({num_kv_heads} KV heads, replicated {replicas} times)")
        kv_head = tp.rank // replicas
        q_local = num_heads // tp.size
        return HeadSplit(ShardRange(tp.rank * q_local, (tp.rank + 1) * q_local, q_local, num_heads),
                         ShardRange(kv_head, kv_head + 1, 1, num_kv_heads))
    kv = tp.split(num_kv_heads)
    return HeadSplit(ShardRange(kv.start * group, kv.stop * group, kv.size * group, num_heads), kv)


# ---- layers --------------------------------------------------------------------------------------


class ColumnParallelLinear(Linear):
    """A `Linear` holding, for each fused part (q|k|v, gate|up), this rank's rows of it."""

    def __init__(self, in_features: int, ranges: Sequence[ShardRange], bias: bool = False) -> None:
        super().__init__(in_features, [r.size for r in ranges], bias=bias)
        self.ranges = list(ranges)

    def load(self, param_name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        param = getattr(self, param_name)
        offset = sum(self.output_sizes[:shard])
        rows = self.ranges[shard]
        if param_name == "weight" and tensor.dim() == 2 and tensor.shape[1] != self.in_features:
            raise ValueError(f"expected shape {[rows.full, self.in_features]}, got {list(tensor.shape)}")
        rows.copy_into(param.narrow(0, offset, rows.size), tensor, 0)


class RowParallelLinear(Linear):
    """A `Linear` holding this rank's input columns; the partial outputs are summed across ranks
    (unless `reduce` is False: the caller then sums several partials with one all-reduce)."""

    def __init__(self, cols: ShardRange, out_features: int, tp: TensorParallel, bias: bool = False,
                 reduce: bool = True) -> None:
        super().__init__(cols.size, out_features, bias=bias)
        if bias and not reduce:
            raise ValueError("a row-parallel layer with a bias must reduce its own output")
        self.cols, self.tp, self.reduce = cols, tp, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quant = self.quant
        if quant is not None and x.shape[0] <= quant.max_rows:
            y = quant.matmul(x)
        else:
            y = F.linear(x, self.weight)
        if self.reduce:
            self.tp.all_reduce(y)
        return y + self.bias if self.bias is not None else y  # the bias once, after the sum

    def load(self, param_name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        if param_name == "bias":
            return super().load(param_name, tensor, shard)
        if tensor.dim() != 2 or tensor.shape[0] != self.out_features:
            raise ValueError(f"expected shape {[self.out_features, self.cols.full]}, got {list(tensor.shape)}")
        self.cols.copy_into(self.weight, tensor, 1)


class VocabParallelEmbedding(VocabEmbedding):
    """This rank's rows of the embedding table; ids held by other ranks embed to zero here."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        self.rows = tp.split(vocab_size)
        super().__init__(self.rows.size, hidden_size)
        self.tp = tp
        # The models' generic parameter loader defers to this (see `param_loader`).
        setattr(self.weight, "load_from_checkpoint", lambda t: self.rows.copy_into(self.weight, t, 0))  # noqa: B010

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.rows.start
        outside = (local < 0) | (local >= self.rows.count)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(ColumnParallelLinear):
    """Column-parallel over the vocabulary; rank 0 gets the full logits, the others their slice."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TensorParallel) -> None:
        super().__init__(hidden_size, [tp.split(vocab_size)])
        self.tp, self.vocab_size = tp, vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.tp.gather_on_first(super().forward(x))
        return logits[:, :self.vocab_size] if self.tp.rank == 0 else logits


# ---- what the models call: the plain layer with one rank, the parallel one otherwise ------------


def column_linear(in_features: int, output_sizes: int | Sequence[int], tp: TensorParallel | None,
                  bias: bool = False, ranges: Sequence[ShardRange] | None = None) -> Linear:
    """Output rows split across ranks; `ranges` per fused part (default: an even split of each)."""
    if not active(tp):
        return Linear(in_features, output_sizes, bias=bias)
    sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
    return ColumnParallelLinear(in_features, ranges or [tp.split(s) for s in sizes], bias=bias)


def row_linear(in_features: int, out_features: int, tp: TensorParallel | None, bias: bool = False,
               cols: ShardRange | None = None, reduce: bool = True) -> Linear:
    """Input columns split across ranks (default: an even split), outputs summed."""
    if not active(tp):
        return Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(cols or tp.split(in_features), out_features, tp, bias=bias, reduce=reduce)


def vocab_embedding(vocab_size: int, hidden_size: int, tp: TensorParallel | None) -> VocabEmbedding:
    return VocabParallelEmbedding(vocab_size, hidden_size, tp) if active(tp) else VocabEmbedding(vocab_size,
                                                                                                 hidden_size)


def lm_head(hidden_size: int, vocab_size: int, tp: TensorParallel | None) -> Linear:
    return ParallelLMHead(hidden_size, vocab_size, tp) if active(tp) else Linear(hidden_size, vocab_size)


def param_loader(param: nn.Parameter):
    """The loader a sharded parameter carries, or None for an ordinary one."""
    return getattr(param, "load_from_checkpoint", None)


def rank_cache_config(config: ModelConfig, tp: TensorParallel | None) -> ModelConfig:
    """The ModelConfig this rank's KV cache is shaped by: its own query and KV heads (MLA's latent
    cache is replicated, so it keeps the full config)."""
    if not active(tp) or config.use_mla:
        return config
    heads = split_heads(config.num_attention_heads, config.num_key_value_heads, tp)
    return replace(config, num_attention_heads=heads.q.size, num_key_value_heads=heads.kv.size)
