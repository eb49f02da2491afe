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
    logits = graphs.run_host(token_ids, positions, block_tables)   # None: no graph fits; run eagerly
"""

from __future__ import annotations

import bisect
import contextlib
import logging

import torch

from zili.kernels.attention import AttentionMetadata
from zili.kernels.backends import AttentionBackend
from zili.layers import fused
from zili.models.base import CausalLM
from zili.platforms.interface import DeviceGraph, Platform

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


class _StaticInputs:
    """One graph size's inputs: a single flat int64 device buffer, [ids | positions | slots | seq_lens
    | block table rows], so that a step's inputs arrive in one host-to-device copy from a pinned
    mirror (each small pageable copy otherwise costs tens of microseconds of host time)."""

    def __init__(self, size: int, max_blocks: int, device: torch.device, pinned: bool = False) -> None:
        self.size, self.width = size, max_blocks
        n = size * (4 + max_blocks)
        self.buffer = torch.zeros(n, dtype=torch.long, device=device)
        self.host = torch.zeros(n, dtype=torch.long, pin_memory=pinned)
        self.host_np = self.host.numpy()
        self.input_ids, self.positions, self.slot_mapping, self.seq_lens = self.buffer[:4 * size].view(4, size)
        self.block_tables = self.buffer[4 * size:].view(size, max_blocks)
        self.query_start_loc = torch.arange(size + 1, dtype=torch.long, device=device)
        self._pad()
        self.buffer.copy_(self.host)

    def _pad(self, batch: int = 0) -> None:
        """Rows batch.. of the host mirror become padding: slot -1 (no cache write), length 0."""
        h, s = self.host_np, self.size
        h[batch:s] = 0
        h[s + batch:2 * s] = 0
        h[2 * s + batch:3 * s] = -1
        h[3 * s + batch:4 * s] = 0

    def fill_from_host(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]],
                       block_size: int) -> None:
        """Stage one decode step (one new token per sequence) and send it in one copy."""
        h, s, w = self.host_np, self.size, self.width
        b = len(token_ids)
        h[:b] = token_ids
        h[s:s + b] = positions
        tables = h[4 * s:].reshape(s, w)
        tables[:] = 0
        for i, (pos, table) in enumerate(zip(positions, block_tables)):
            h[2 * s + i] = table[pos // block_size] * block_size + pos % block_size
            h[3 * s + i] = pos + 1
            tables[i, :len(table)] = table
        self._pad(b)
        self.buffer.copy_(self.host, non_blocking=True)  # the host mirror is rewritten only after a sync

    def meta(self, block_size: int, attention: AttentionBackend | None = None) -> AttentionMetadata:
        # Host-side lists only tell the backend this is a decode step; the kernels read the tensors.
        return AttentionMetadata(self.slot_mapping, self.query_start_loc, self.seq_lens, self.block_tables, block_size,
                                 [1] * self.size, [1] * self.size, attention)


class DecodeGraphs:
    """Captured decode forwards, one per ladder size; `run` replays the right one."""

    def __init__(self, model: CausalLM, kv_caches: list[torch.Tensor], platform: Platform, ladder: list[int],
                 max_blocks_per_seq: int, block_size: int, device: torch.device,
                 attention: AttentionBackend | None = None) -> None:
        if not platform.supports_graph_capture():
            raise ValueError(f"{platform.name} does not support graph capture")
        self.model, self.kv_caches, self.platform = model, kv_caches, platform
        self.attention = attention  # the runner's backend (graph-safe), captured into every graph
        self.ladder = sorted(set(ladder))
        self.block_size = block_size
        self.max_blocks = max_blocks_per_seq
        pinned = platform.pins_host_memory()
        self.inputs = {size: _StaticInputs(size, max_blocks_per_seq, device, pinned) for size in self.ladder}
        self.graphs: dict[int, DeviceGraph] = {}
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
                inputs = self.inputs[size]
                meta = inputs.meta(self.block_size, self.attention)
                args = (inputs.input_ids, inputs.positions, self.kv_caches, meta)
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

    def run_host(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]]
                 ) -> torch.Tensor | None:
        """Replay the decode step (one new token per sequence, given as host lists) for this batch:
        float32 logits [batch, vocab], a view of the graph's output valid until the next replay. The
        inputs travel in one copy straight into the graph's buffer. None when no graph fits (too
        many sequences, or a block table wider than captured): the caller runs eagerly."""
        batch = len(token_ids)
        size = graph_size_for(batch, self.ladder)
        if size is None or size not in self.graphs or max(len(t) for t in block_tables) > self.max_blocks:
            return None
        self.inputs[size].fill_from_host(token_ids, positions, block_tables, self.block_size)
        self.graphs[size].replay()
        return self.outputs[size][:batch]
