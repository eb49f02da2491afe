"""Device-graph capture of the decode step, for a ladder of batch sizes.

Written against the platform's graph API (`Platform.new_graph`, `graph_capture`, `graph_pool`; CUDA
graphs on NVIDIA). CI has no GPU: the ladder logic is tested on the CPU, the capture and replay by
tests_gpu/ (`make test-gpu`) on an H100.

A decode step launches hundreds of small kernels; at small batches launching them costs more than
running them. Capturing the model forward once per batch size in a ladder (1, 2, 4, 8, ...) and
replaying it removes that cost. A batch of b sequences runs the graph of the smallest ladder size
s >= b: rows b..s-1 are padding, with slot -1 (the cache write skips them) and context length 0 (the
attention kernel returns zeros for them). Every input lives in a static buffer the graph reads;
`run` copies the step's values in and replays.

It needs an attention backend whose decode reads no host-side lengths (`graph_safe_decode`, the
Triton one) and a model whose forward has no host syncs (true of the dense Llama/Qwen path).
Hook (in ModelRunner.execute, decode-only steps where every sequence samples):
    logits = graphs.run(input_ids, positions, meta)   # None: no graph fits; run eagerly
"""

from __future__ import annotations

import bisect
import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from zili.kernels.attention import AttentionMetadata
from zili.layers import fused
from zili.platforms.interface import Platform

logger = logging.getLogger(__name__)

DEFAULT_LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def batch_ladder(max_batch: int, candidates: tuple[int, ...] = DEFAULT_LADDER) -> list[int]:
    """Ladder sizes up to max_batch (max_batch itself included, so every batch has a graph)."""
    sizes = [s for s in candidates if s < max_batch]
    return sizes + [max_batch]


def graph_size_for(batch: int, ladder: list[int]) -> int | None:
    """The smallest captured size holding `batch`, or None when the batch is larger than all."""
    i = bisect.bisect_left(ladder, batch)
    return ladder[i] if i < len(ladder) else None


@dataclass
class _StaticInputs:
    input_ids: torch.Tensor  # [S]
    positions: torch.Tensor  # [S]
    slot_mapping: torch.Tensor  # [S], -1 on padded rows
    seq_lens: torch.Tensor  # [S], 0 on padded rows
    block_tables: torch.Tensor  # [S, max_blocks]
    query_start_loc: torch.Tensor  # [S + 1] = 0..S (one token per sequence)

    @classmethod
    def allocate(cls, size: int, max_blocks: int, device: torch.device) -> "_StaticInputs":
        as_long = dict(dtype=torch.long, device=device)
        return cls(torch.zeros(size, **as_long), torch.zeros(size, **as_long), torch.full((size,), -1, **as_long),
                   torch.zeros(size, **as_long), torch.zeros(size, max_blocks, **as_long),
                   torch.arange(size + 1, **as_long))

    def fill(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, size: int) -> None:
        """Copy one step's inputs in; rows beyond the batch become padding."""
        b, width = input_ids.shape[0], meta.block_tables.shape[1]
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.slot_mapping[:b].copy_(meta.slot_mapping)
        self.seq_lens[:b].copy_(meta.seq_lens)
        self.block_tables[:b, :width].copy_(meta.block_tables)
        self.block_tables[:b, width:].zero_()
        self.slot_mapping[b:size].fill_(-1)
        self.seq_lens[b:size].zero_()
        self.input_ids[b:size].zero_()
        self.positions[b:size].zero_()

    def meta(self, size: int, block_size: int) -> AttentionMetadata:
        # Host-side lists only tell the backend this is a decode step; the kernels read the tensors.
        return AttentionMetadata(self.slot_mapping[:size], self.query_start_loc[:size + 1], self.seq_lens[:size],
                                 self.block_tables[:size], block_size, [1] * size, [1] * size)


class DecodeGraphs:
    """Captured decode forwards, one per ladder size; `run` replays the right one."""

    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], platform: Platform, ladder: list[int],
                 max_blocks_per_seq: int, block_size: int, device: torch.device) -> None:
        if not platform.supports_graph_capture():
            raise ValueError(f"{platform.name} does not support graph capture")
        self.model, self.kv_caches, self.platform = model, kv_caches, platform
        self.ladder = sorted(set(ladder))
        self.block_size = block_size
        self.max_blocks = max_blocks_per_seq
        self.inputs = _StaticInputs.allocate(self.ladder[-1], max_blocks_per_seq, device)
        self.graphs: dict[int, object] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def capture(self, warmup: int = 2, fused_ops: bool = False) -> None:
        """Capture every ladder size, largest first (so the smaller ones reuse its memory pool).
        A graph holds the whole decode step up to float32 logits (forward and LM head); fused_ops
        captures the compiled elementwise kernels of zili.layers.fused instead of the eager chains."""
        pool = self.platform.graph_pool()
        ops = fused.compiled_ops() if fused_ops else contextlib.nullcontext()
        with ops:
            for size in reversed(self.ladder):
                meta = self.inputs.meta(size, self.block_size)
                args = (self.inputs.input_ids[:size], self.inputs.positions[:size], self.kv_caches, meta)
                for _ in range(warmup):  # compile kernels and settle the allocator outside the capture
                    self._step(args)
                self.platform.synchronize()
                graph = self.platform.new_graph()
                with self.platform.graph_capture(graph, pool=pool):
                    self.outputs[size] = self._step(args)
                self.graphs[size] = graph
        self.platform.synchronize()
        logger.info("captured decode graphs for batch sizes %s", self.ladder)

    def _step(self, args) -> torch.Tensor:
        return self.model.compute_logits(self.model(*args)).float()

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        """Replay the decode step for this batch: float32 logits [batch, vocab] (a view of the
        graph's output, valid until the next replay). None when it has no graph (not decode-only,
        too large, or a block table wider than captured): the caller runs eagerly."""
        batch = input_ids.shape[0]
        size = graph_size_for(batch, self.ladder)
        if size is None or size not in self.graphs or not meta.is_decode_only or \
                meta.block_tables.shape[1] > self.max_blocks:
            return None
        self.inputs.fill(input_ids, positions, meta, size)
        self.graphs[size].replay()
        return self.outputs[size][:batch]
