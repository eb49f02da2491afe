"""Engine: one synchronous step at a time. schedule -> run the model -> sample -> process outputs.

The engine is deterministic given seeds and has no threads, so it is tested without a server.
It is built by `zili.engine.builder.build_engine(config)`; `Engine(parts)` only runs. Each step
returns deltas (`RequestDelta`): per touched request, only what is new since its last output.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from zili.config import SpeculativeConfig
from zili.engine.input_processor import InputProcessor, PreparedRequest
from zili.engine.jump_forward import JumpForward, JumpForwardStats
from zili.engine.kv_cache import KVCacheManager
from zili.engine.output_processor import OutputProcessor
from zili.engine.prompt_outputs import PromptScoring, StepExtras
from zili.engine.request import Request, RequestDelta, Sequence, TokenLogprob
from zili.engine.runner import StepInput
from zili.engine.sampler import Sampler, sequence_seed
from zili.engine.scheduler import ScheduledBatch, Scheduler
from zili.engine.spec_decode import (
    HiddenStateProposer,
    SpecDecodeStats,
    Speculator,
    TargetRows,
    VerifiedStep,
    expand_rows,
    grammar_rows,
)
from zili.engine.thinking import ThinkingOutputs
from zili.reasoning import resolve_reasoning_parser
from zili.sampling import PoolingParams, SamplingParams
from zili.structured.spec import StructuredOutput

if TYPE_CHECKING:
    from zili.engine.builder import EngineParts

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_hit_rate: float
    num_free_blocks: int
    num_total_blocks: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions: int
    # Speculative decoding (zili.engine.spec_decode), vLLM's spec_decode_* counters; 0 when it is off.
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    # Jump-forward structured decoding (zili.engine.jump_forward); 0 when it is off.
    jump_forward_num_jumps: int = 0
    jump_forward_num_forced_tokens: int = 0  # forced tokens that took no step of their own (steps saved)
    jump_forward_num_forced_draft_tokens: int = 0  # "verify" mode: forced tokens proposed as drafts
    num_steps: int = 0  # steps that ran a forward pass

    @property
    def spec_decode_acceptance_rate(self) -> float:
        """Accepted draft tokens / proposed draft tokens (0 before any proposal)."""
        n = self.spec_decode_num_draft_tokens
        return self.spec_decode_num_accepted_tokens / n if n else 0.0

    @property
    def spec_decode_mean_accepted_length(self) -> float:
        """Tokens a verify step yielded on average: 1 + accepted drafts per step with drafts."""
        n = self.spec_decode_num_drafts
        return 1.0 + self.spec_decode_num_accepted_tokens / n if n else 0.0


class Engine:
    """Runs requests on built parts (zili.engine.builder): scheduler, executor, sampler, output processor."""

    def __init__(self, parts: EngineParts) -> None:
        self.config = config = parts.config
        self.platform = parts.platform
        self.model_config, self.cache_config = parts.model_config, parts.cache_config
        self.tokenizer, self.dtype = parts.tokenizer, parts.dtype
        self.runner = parts.executor  # a ModelRunner, or the TensorParallelExecutor in front of one
        self.tp_executor = parts.tp_executor
        self.max_model_len = parts.max_model_len
        self.attention_backend = parts.attention_backend
        self.quantized = parts.quantized
        self.compile_seconds, self.graph_batch_sizes = parts.compile_seconds, parts.graph_batch_sizes
        self.fused_elementwise = parts.fused_elementwise
        # A proposer drafting from the target's hidden states (DeepSeek MTP) keeps its KV entries in these blocks.
        self.hidden_proposer = parts.proposer if isinstance(parts.proposer, HiddenStateProposer) else None
        self.kv_cache = KVCacheManager(parts.num_kv_blocks, config.block_size, config.enable_prefix_caching,
                                       recompute_last_hit_block=self.hidden_proposer is not None)
        if self.hidden_proposer is not None:
            self.hidden_proposer.bind_kv_cache(self.kv_cache)
        # The step token budget: the config's, else the platform's default for the model's dtype.
        self.max_num_batched_tokens = config.max_num_batched_tokens or \
            parts.platform.default_max_num_batched_tokens(parts.dtype)
        self.scheduler = Scheduler(self.kv_cache, config.max_num_seqs, self.max_num_batched_tokens,
                                   next_token_entries=self.hidden_proposer is not None)
        self.sampler = Sampler(parts.model_config.vocab_size, config.seed)
        self.inputs = InputProcessor(parts.tokenizer, parts.model_config.vocab_size, parts.max_model_len,
                                     parts.num_kv_blocks, config.block_size, config.structured_outputs_backend)
        # Reasoning models: thinking budgets and grammars that start after the thinking (zili.engine.thinking).
        self.reasoning_style = resolve_reasoning_parser(config.reasoning_parser, parts.tokenizer.chat_template)
        self.outputs = OutputProcessor(parts.tokenizer, parts.max_model_len,
                                       sequence_processor=ThinkingOutputs(parts.tokenizer, self.reasoning_style))
        # Speculative decoding (EngineConfig.speculative_config): drafts verified in the step, from n-gram
        # lookup or the proposer the builder made (a draft model).
        spec = config.speculative_config
        assert spec is None or isinstance(spec, SpeculativeConfig)  # EngineConfig parsed it
        # Jump-forward structured decoding (EngineConfig.enable_jump_forward): forced text in one step,
        # as verified drafts (the speculator's forced proposer) or appended after sampling.
        self.jump_forward = JumpForward(parts.tokenizer, lambda: self.inputs.grammar_backend,
                                        config.jump_forward_mode or "verify") if config.enable_jump_forward else None
        forced = self.jump_forward if self.jump_forward is not None and self.jump_forward.mode == "verify" else None
        self.speculator = Speculator(spec, parts.max_model_len, parts.proposer, forced) \
            if spec is not None or forced is not None else None
        self.num_steps = 0
        self.requests: dict[str, Request] = {}
        self._aborted: list[RequestDelta] = []  # final deltas of requests aborted between steps
        self._ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    # ---- requests --------------------------------------------------------------------------
    def prepare(self, prompt: str | list[int], params: SamplingParams | PoolingParams | None = None) -> PreparedRequest:
        """Validate a request (InputProcessor.prepare): InvalidRequestError naming the field if it
        can never run. PoolingParams make an embedding request. Thread-safe: the one Engine method
        that may be called off the engine's thread."""
        return self.inputs.prepare(prompt, params)

    def add_request(self, request_id: str | None, prompt: str | list[int] | PreparedRequest,
                    params: SamplingParams | PoolingParams | None = None) -> str:
        """Queue a request (a raw prompt, validated here, or one `prepare` already checked); returns
        its id. InvalidRequestError (a ValueError) if it is malformed or can never fit."""
        prepared = prompt if isinstance(prompt, PreparedRequest) else self.prepare(prompt, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        p = prepared.params
        req = Request(request_id, prepared.prompt, prepared.prompt_token_ids, p, prepared.max_tokens,
                      prepared.stop_token_ids, pooling=prepared.pooling)
        for i in range(p.n):
            seq = Sequence(f"{request_id}#{i}", req, i, list(prepared.prompt_token_ids))
            if p.seed is not None:
                seq.seed = sequence_seed(p.seed, i)
            if prepared.grammar is not None:  # structured output: one matcher per sequence
                seq.grammar = self.inputs.new_matcher(prepared.grammar)
            req.sequences.append(seq)
            self.outputs.add(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        self.prompt_tokens_total += req.num_prompt_tokens
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Drop a request and free its KV blocks now; its final delta ("abort") comes with the next step."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        unfinished = [s for s in req.sequences if not s.is_finished]
        for seq in unfinished:
            self.scheduler.finish(seq)
            if self.speculator is not None:
                self.speculator.release(seq)
        self._aborted.append(req.delta(self.outputs.abort(unfinished)))

    def close(self) -> None:
        """Stop the executor's workers, if any (idempotent; also runs at interpreter exit)."""
        self.runner.close()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._aborted)

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        """Run one step of continuous batching and return what it produced.

        Schedules a batch (decodes and prefill chunks within the token budget), runs the forward
        pass, samples one token for every sequence whose prompt is now fully computed, and turns
        those tokens into deltas (new ids, text, logprobs, finish). Finished sequences give back
        their KV blocks before this returns. The result holds one `RequestDelta` per request that
        changed (sampled a token, finished, or was aborted since the last step); requests that
        only advanced a prefill chunk are absent. Raises whatever the executor raises.
        """
        outputs, self._aborted = self._aborted, []
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        self.num_steps += 1
        step_input, sampling = self._build_step(batch)
        logits = self.runner.execute(step_input)
        if step_input.wants_extras:
            self._take_extras(batch, step_input, self.runner.step_extras())
        num_rejected: list[int] | None = None
        finished: list[Sequence] = []
        if sampling:
            verified, num_rejected = self._sample(logits, sampling, batch)
            if self.jump_forward is not None and self.jump_forward.mode == "append":
                verified = self.jump_forward.extend(verified)
            deltas, finished = self.outputs.process(verified.seqs, verified.token_ids, verified.logprobs)
            self.generation_tokens_total += sum(len(c.token_ids) for d in deltas for c in d.outputs)
            for delta in deltas:
                if delta.finished:
                    del self.requests[delta.request_id]
            outputs += deltas
        if self.hidden_proposer is not None:  # its KV entries for this step's positions, from the target's states
            extras = self.runner.step_extras()
            assert extras is not None and extras.hidden_states is not None
            self.hidden_proposer.observe(extras.hidden_states, self._target_rows(batch, num_rejected))
        # After the new tokens are appended (the prefix cache hashes them), before finished ones free blocks.
        self.scheduler.on_step_done(batch, num_rejected)
        for seq in finished:
            self.scheduler.finish(seq)
            if self.speculator is not None:
                self.speculator.release(seq)
        ended = [s for s in batch.seqs if s.request.prefill_only and s.num_computed_tokens == s.num_tokens]
        if ended:
            outputs += self._end_prefill_only(ended)
        return outputs

    def _sample(self, logits: torch.Tensor, sampling: list[Sequence],
                batch: ScheduledBatch) -> tuple[VerifiedStep, list[int] | None]:
        """Draw every logits row; with drafts in the step, accept them against those draws
        (zili.engine.spec_decode). Returns the tokens to append and, per batch entry, its rejected
        draft tokens (None when the step had no drafts)."""
        rows = Speculator.rows_of(sampling) if self.speculator is not None else sampling
        if len(rows) == len(sampling):
            sampled = self.sampler(logits, rows, self.inputs.grammar_mask(rows))
            return VerifiedStep(sampling, sampled.token_ids, sampled.logprobs), None
        assert self.speculator is not None
        masked, views = grammar_rows(sampling)  # constrained verify rows see the grammar after their drafts
        try:
            mask = self.inputs.grammar_mask(masked)  # type: ignore[arg-type]
        finally:
            for view in views:
                view.close()
        sampled = self.sampler(logits, rows, mask)
        verified, rejected = self.speculator.verify(sampled.token_ids, sampled.logprobs, sampling)
        by_seq = dict(zip(sampling, rejected))
        return verified, [by_seq.get(seq, 0) for seq in batch.seqs]

    def _build_step(self, batch: ScheduledBatch) -> tuple[StepInput, list[Sequence]]:
        token_ids, starts, tables, sample = [], [], [], []
        sampling: list[Sequence] = []
        scoring: list[PromptScoring | None] = []
        pools: list[str | None] = []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            if seq.draft_token_ids:  # verify: the last token and the drafts, one decode row each
                ids, rows_start, rows_table = expand_rows([seq.token_ids[start], *seq.draft_token_ids], start,
                                                          self.kv_cache.block_ids(seq.seq_id))
                token_ids += ids
                starts += rows_start
                tables += rows_table
                sample += [True] * len(ids)
                sampling.append(seq)
                scoring += [None] * len(ids)  # drafts come only after the prompt: nothing to score or pool
                pools += [None] * len(ids)
                continue
            token_ids.append(seq.token_ids[start:start + num_new])
            starts.append(start)
            tables.append(self.kv_cache.block_ids(seq.seq_id))
            samples = start + num_new == seq.num_tokens and not seq.request.prefill_only
            sample.append(samples)
            if samples:
                sampling.append(seq)
            scoring.append(_prompt_scoring(seq, start, num_new))
            pooling = seq.request.pooling
            pools.append(pooling.pooling if pooling is not None and seq.index == 0 and num_new else None)
        return StepInput(token_ids, starts, tables, sample, scoring if any(scoring) else None,
                         pools if any(pools) else None, keep_hidden=self.hidden_proposer is not None), sampling

    def _target_rows(self, batch: ScheduledBatch, num_rejected: list[int] | None) -> list[TargetRows]:
        """Per batch entry, the step rows the target kept whose next token is known (all but rejected
        verify rows and a prefill-only prompt's last row), for `HiddenStateProposer.observe`. Call it
        after the new tokens are appended, before `Scheduler.on_step_done` advances computed counts."""
        rows: list[TargetRows] = []
        first_row = 0
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            kept = num_new - (num_rejected[i] if num_rejected is not None else 0)
            num_rows = min(kept, len(seq.token_ids) - start - 1)
            if num_rows > 0 and seq.seq_id in self.kv_cache.tables:
                rows.append(TargetRows(seq, start, first_row, num_rows))
            first_row += num_new
        return rows

    # ---- scoring and pooling (zili.engine.prompt_outputs) -------------------------------------
    def _take_extras(self, batch: ScheduledBatch, step: StepInput, extras: StepExtras | None) -> None:
        """Fold a step's prompt logprobs and pooled states into their requests."""
        assert extras is not None, "the executor computed no prompt logprobs / pooled states"
        # Step entries are per sequence, except that a sequence verifying drafts has one entry per row.
        entry_seqs = [seq for seq in batch.seqs for _ in range(1 + len(seq.draft_token_ids or ()))]
        for i, rows in extras.prompt_logprobs.items():
            req = entry_seqs[i].request
            scoring = step.prompt_scoring[i] if step.prompt_scoring is not None else None
            assert req.prompt_logprobs is not None and scoring is not None
            req.prompt_logprobs.extend(
                TokenLogprob(t, chosen, list(zip(ids, vals))) for t, chosen, ids, vals in
                zip(scoring.target_ids, rows.logprobs.tolist(), rows.top_ids.tolist(), rows.top_logprobs.tolist()))
        for i, vector in extras.pooled.items():
            req, start = entry_seqs[i].request, step.start_positions[i]
            kind = req.pooling.pooling if req.pooling is not None else None
            if kind == "mean":  # a sum over chunks; a (re)computation from position 0 starts it afresh
                req.pooled = vector if start == 0 or req.pooled is None else req.pooled + vector
            elif kind == "last" or start == 0:  # "cls": the first chunk's first row
                req.pooled = vector

    def _end_prefill_only(self, seqs: list[Sequence]) -> list[RequestDelta]:
        """Finish requests that sample nothing (scoring with max_tokens 0, pooling) once their prompt is in."""
        deltas = []
        for seq in seqs:
            self.scheduler.finish(seq)
            req = seq.request
            deltas.append(req.delta(self.outputs.end([seq], "length")))
            del self.requests[req.request_id]
        return deltas

    # ---- structured output (zili.structured) -------------------------------------------------
    def compile_structured(self, structured: StructuredOutput) -> object:
        """Compile a StructuredOutput for this model's vocabulary (cached); SamplingParamsError
        ("structured") names the problem. Thread-safe."""
        return self.inputs.compile_structured(structured)

    # ---- introspection -----------------------------------------------------------------------
    def stats(self) -> EngineStats:
        kv = self.kv_cache
        jf = self.jump_forward.stats if self.jump_forward is not None else JumpForwardStats()
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=kv.usage, prefix_cache_hit_rate=kv.prefix_hit_rate,
            num_free_blocks=kv.num_free_blocks, num_total_blocks=kv.num_blocks,
            prompt_tokens_total=self.prompt_tokens_total, generation_tokens_total=self.generation_tokens_total,
            num_preemptions=self.scheduler.num_preemptions,
            **self._spec_stats(),
            jump_forward_num_jumps=jf.num_jumps, jump_forward_num_forced_tokens=jf.num_forced_tokens,
            jump_forward_num_forced_draft_tokens=jf.num_forced_draft_tokens,
            num_steps=self.num_steps,
        )

    def _spec_stats(self) -> dict[str, int]:
        s = self.speculator.stats if self.speculator is not None else SpecDecodeStats()
        return {"spec_decode_num_drafts": s.num_drafts, "spec_decode_num_draft_tokens": s.num_draft_tokens,
                "spec_decode_num_accepted_tokens": s.num_accepted_tokens}

def _prompt_scoring(seq: Sequence, start: int, num_new: int) -> PromptScoring | None:
    """The prompt logprobs a sequence's chunk [start, start + num_new) should compute: rows whose next
    prompt token has no logprob yet (row p predicts token p + 1; the last prompt row predicts the
    first generated token, which the sampler reports)."""
    req = seq.request
    if req.prompt_logprobs is None or seq.index != 0:
        return None
    first = max(start, req.num_scored_tokens - 1)
    end = min(start + num_new, req.num_prompt_tokens - 1)
    if first >= end:
        return None
    return PromptScoring(first - start, req.prompt_token_ids[first + 1:end + 1], req.params.prompt_logprobs or 0)
