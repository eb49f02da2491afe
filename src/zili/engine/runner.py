"""ModelRunner: owns the model, its paged KV cache and its attention backend; turns a step plan
into logits.

It knows nothing of requests or scheduling: it receives, per sequence, the new token ids, the
position of the first of them, the sequence's block table, and whether the sequence samples
this step (its last new token is the end of what it has). It implements `Executor`
(zili.engine.executor), as the tensor-parallel executor does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from zili.config import ModelConfig
from zili.engine.prompt_outputs import PromptScoring, StepExtras, compute_step_extras
from zili.kernels.attention import AttentionMetadata
from zili.kernels.backends import AttentionBackend
from zili.models.base import CausalLM
from zili.platforms import current_platform

if TYPE_CHECKING:
    from zili.engine.aot_decode import AOTDecode
    from zili.engine.compiled_decode import CompiledDecode
    from zili.engine.cuda_graphs import DecodeGraphs

logger = logging.getLogger(__name__)

# A step with at least this many prefill tokens hands its freed activations back to the OS
# (Platform.release_host_memory; CPUs: malloc_trim) once it is done. Prefill steps of varying lengths
# otherwise fragment the host heap, which then grows past the largest step's live memory: 24 prompts of
# 65-2,048 tokens took an engine's resident memory 592 -> 755 MiB, 617 MiB with the trim (peak 679;
# benchmarks/notes/memory.md). Decode and verify rows (one token each), whose buffers repeat from step to
# step, do not count.
HOST_TRIM_MIN_TOKENS = 256


@dataclass
class StepInput:
    token_ids: list[list[int]]  # new tokens of each sequence
    start_positions: list[int]  # position of each sequence's first new token (= tokens already cached)
    block_tables: list[list[int]]
    sample: list[bool]  # whether each sequence needs logits for its last new token
    # Per sequence, or None for the whole step: prompt logprobs to compute from its rows, and how to
    # pool its rows' hidden states ("mean", "cls", "last"); the results come from `ModelRunner.step_extras()`.
    prompt_scoring: list[PromptScoring | None] | None = None
    pooling: list[str | None] | None = None
    # Keep the step's final hidden states (`StepExtras.hidden_states`, every row, no copy) for a proposer
    # that drafts from them (DeepSeek MTP, zili.engine.mtp). Off: nothing is kept.
    keep_hidden: bool = False

    @property
    def wants_extras(self) -> bool:
        return self.prompt_scoring is not None or self.pooling is not None or self.keep_hidden


def kv_row_align(attention: AttentionBackend | None) -> int:
    """The byte multiple quantized cache rows are padded to for this backend (1: packed)."""
    return attention.kv_row_align if attention is not None else 1


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, row_align: int = 1) -> int:
    """Bytes one KV block takes across all layers (ModelConfig.kv_bytes_per_token, MLA-aware); `dtype` is the
    cache's element type (int8 / float8_e4m3fn count their per-row scales and `row_align` padding)."""
    return config.kv_bytes_per_token(dtype, row_align) * block_size


class ModelRunner:
    """One device's model and KV cache. `attention`: the backend every step of this runner uses
    (None: the torch reference); it travels in each step's AttentionMetadata, never process-wide."""

    def __init__(self, model: CausalLM, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, attention: AttentionBackend | None = None,
                 kv_cache_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.config = config
        self.block_size = block_size
        self.device = device
        self.attention = attention
        # `kv_cache_dtype`: the cache's element type when it differs from the model's (EngineConfig.kv_cache_dtype:
        # bf16, or int8 / fp8 rows with their scales, zili.kernels.kv_quant).
        cache_dtype = kv_cache_dtype or dtype
        shape = config.kv_cache_shape(num_blocks, block_size, cache_dtype, kv_row_align(attention))
        width = config.kv_cache_shape(1, 1, cache_dtype)[-1]  # a padded row's used bytes (ModelConfig.kv_cache_shape)
        # Zero-filled (not empty): masked-out slots are multiplied by zero weights in attention,
        # and uninitialised memory may hold NaNs.
        self.kv_caches = [torch.zeros(shape, dtype=cache_dtype, device=device)[..., :width]
                          for _ in range(config.num_hidden_layers)]
        # Set by the builder: decode-only steps run compiled (CPUs) or replay captured device graphs.
        self.compiled_decode: CompiledDecode | AOTDecode | None = None
        self.decode_graphs: DecodeGraphs | None = None
        self._step_extras: StepExtras | None = None  # what the last step computed besides logits

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor:
        """Run one forward pass. Returns float32 logits [num sampling sequences, vocab]. When the step
        asks for prompt logprobs or pooled states (`step.wants_extras`), `step_extras()` returns them
        until the next call."""
        self._step_extras = None
        if (self.decode_graphs is not None and not step.wants_extras and all(step.sample)
                and all(len(t) == 1 for t in step.token_ids)):
            logits = self.decode_graphs.run_host([t[0] for t in step.token_ids], step.start_positions,
                                                 step.block_tables)
            if logits is not None:  # None: no captured graph fits this batch
                return logits
        query_lens = [len(t) for t in step.token_ids]
        seq_lens = [s + q for s, q in zip(step.start_positions, query_lens)]
        flat_ids = [t for chunk in step.token_ids for t in chunk]
        positions = [p for s, q in zip(step.start_positions, query_lens) for p in range(s, s + q)]
        meta = AttentionMetadata.build(query_lens, seq_lens, step.block_tables, self.block_size, self.device,
                                       self.attention)
        input_ids = torch.tensor(flat_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        if self.compiled_decode is not None and meta.is_decode_only and all(step.sample) and not step.wants_extras:
            try:
                return self.compiled_decode(input_ids, pos, meta)
            except Exception:  # e.g. a recompile the compiler cannot finish: stay correct, go eager
                logger.exception("compiled decode step failed; running eagerly from now on")
                self.compiled_decode = None  # the eager forward below rewrites the same KV slots
        logits = self._forward(input_ids, pos, meta, step, query_lens)
        if sum(q for q in query_lens if q > 1) >= HOST_TRIM_MIN_TOKENS:  # its activations are freed by now
            current_platform().release_host_memory()
        return logits

    def _forward(self, input_ids: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata, step: StepInput,
                 query_lens: list[int]) -> torch.Tensor:
        hidden = self.model(input_ids, pos, self.kv_caches, meta)
        if step.wants_extras:
            self._step_extras = compute_step_extras(self.model, hidden, query_lens, step.prompt_scoring, step.pooling)
            if step.keep_hidden:
                self._step_extras.hidden_states = hidden
        last_rows, end = [], 0
        for q, sample in zip(query_lens, step.sample):
            end += q
            if sample:
                last_rows.append(end - 1)
        if not last_rows:
            return torch.empty(0, self.config.vocab_size)
        rows = torch.tensor(last_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows)).float()

    def step_extras(self) -> StepExtras | None:
        """The prompt logprobs and pooled states of the last step, when it asked for them (else None)."""
        return self._step_extras

    def close(self) -> None:
        """Nothing to release in a single process (the Executor protocol's end of life)."""
