"""Engine: one synchronous step at a time. schedule -> run the model -> sample -> update.

The engine is deterministic given seeds and has no threads, so it is tested without a server.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from dataclasses import dataclass

import torch

from zili.config import EngineConfig
from zili.engine.kv_cache import KVCacheManager
from zili.engine.request import Request, RequestOutput, Sequence, TokenLogprob
from zili.engine.runner import ModelRunner, StepInput, kv_bytes_per_block
from zili.engine.sampler import Sampler, sequence_seed
from zili.engine.scheduler import ScheduledBatch, Scheduler
from zili.kernels.backends import choose_attention_backend, use_attention_backend
from zili.models.registry import capabilities_of
from zili.platforms import current_platform
from zili.platforms.tuning import load_tuning, model_key
from zili.sampling import SamplingParams
from zili.tokenizer import IncrementalDetokenizer

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


class Engine:
    def __init__(self, config: EngineConfig, loaded=None) -> None:
        from zili.models.loader import load_model

        self.platform = current_platform()
        # -- tuning (zili tune; zili.platforms.tuning): tuned values fill what the config leaves default
        self.tuning = load_tuning(self.platform) if config.use_tune_cache else None
        self.platform.set_num_threads(config.threads or self._tuned("threads"))
        self.platform.prepare_host_allocator()
        backend = choose_attention_backend(config.attention_backend, self.platform, self._tuned("attention_backend"))
        self.attention_backend = use_attention_backend(backend, self._tuned("triton")).name
        # -- end tuning
        self.quantized: dict[str, int] = {}
        # Tensor parallelism (zili.distributed): this process is rank 0 and drives the workers.
        self.tp_executor = None
        if config.tensor_parallel_size > 1 or config.distributed_executor_backend == "mp":
            if loaded is not None:
                raise ValueError("a preloaded model runs on one device: tensor_parallel_size must be 1")
            from zili.distributed.executor import TensorParallelExecutor

            self.tp_executor = TensorParallelExecutor(config, self.attention_backend)  # workers load meanwhile
            loaded, self.quantized = self.tp_executor.load_shard()
            config = self._apply_model_tuning(config, loaded)
        elif loaded is None:
            loaded = load_model(config.model, dtype=config.dtype, device=self.platform.device,
                                load_format=config.load_format, seed=config.seed)
            config = self._apply_model_tuning(config, loaded)
            self.quantized = self._quantize(loaded, config.quantization, self._tuned("quant_max_rows"))
        else:
            config = self._apply_model_tuning(config, loaded)
        self.config = config
        self.model_config = mc = loaded.config
        self.tokenizer = loaded.tokenizer
        self.dtype = loaded.dtype
        # What this rank's KV cache holds (its own KV heads under tensor parallelism).
        self.cache_config = self.tp_executor.cache_config(mc) if self.tp_executor else mc
        try:
            self.max_model_len = self._resolve_max_model_len(config.max_model_len, mc.max_position_embeddings)
            num_blocks = self._num_kv_blocks()
            runner = ModelRunner(loaded.model, self.cache_config, num_blocks, config.block_size, self.dtype,
                                 self.tp_executor.device if self.tp_executor else self.platform.device)
            self.runner = self.tp_executor.attach(runner, num_blocks) if self.tp_executor else runner
        except BaseException:
            if self.tp_executor is not None:
                self.tp_executor.abort()
            raise
        # Decode-step speed-ups, none under tensor parallelism (its ranks run eagerly): a compiled
        # step (CPUs) or captured device graphs with fused elementwise kernels (GPUs).
        from zili.engine.compiled_decode import eager_by_default

        eager = self.tp_executor is not None or (
            config.enforce_eager if config.enforce_eager is not None else eager_by_default())
        self.fused_elementwise = not eager and self._fuse_elementwise()
        self.compile_seconds = None if eager else self._compile_decode(config, loaded.model)
        self.graph_batch_sizes = None if eager else self._capture_decode_graphs(config, loaded.model)
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv_cache, config.max_num_seqs, config.max_num_batched_tokens)
        self.sampler = Sampler(mc.vocab_size, config.seed)
        self.requests: dict[str, Request] = {}
        self._finished_outside_step: list[RequestOutput] = []
        # structured output: the grammar backend (built on first use) and the live constrained sequences
        self._grammar_backend = None
        self._grammar_lock = threading.Lock()
        self._constrained: set[Sequence] = set()
        self._ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, config.block_size,
                    num_blocks * kv_bytes_per_block(self.cache_config, config.block_size, self.dtype) / 2**20)

    # ---- set-up ----------------------------------------------------------------------------
    def _compile_decode(self, config: EngineConfig, model) -> float | None:
        """Compile the decode step unless unsupported here; the seconds it took."""
        from zili.engine.compiled_decode import CompiledDecode, unsupported_reason

        reason = unsupported_reason(model, self.platform, self.attention_backend, False)
        if reason is not None:
            logger.info("decode step stays eager: %s", reason)
            return None
        compiled = CompiledDecode(model, self.runner.kv_caches, config.block_size)
        # A graph per batch shape dynamo tells apart: 1, 2.., and past each quantized layer's row limit.
        limits = {m.quant.max_rows for m in model.modules() if getattr(m, "quant", None) is not None}
        sizes = sorted({b for b in [1, 2, *(r + 1 for r in limits)] if b <= config.max_num_seqs})
        logger.info("compiling the decode step for batch sizes %s (about 2 minutes on a first start, seconds "
                    "from Inductor's cache afterwards; --enforce-eager skips it)", sizes)
        try:
            seconds = compiled.warm_up(sizes, scratch_block=0)
        except Exception as exc:  # a torch/compiler limitation must not stop the engine
            logger.warning("decode step stays eager: compiling it failed (%s: %s)", type(exc).__name__, exc)
            return None
        self.runner.compiled_decode = compiled
        logger.info("compiled the decode step for batch sizes %s in %.1f s", sizes, seconds)
        return seconds

    def _fuse_elementwise(self) -> bool:
        """Compiled elementwise chains (zili.layers.fused) in the captured decode graphs, where the
        platform wants them."""
        from zili.layers import fused

        if not self.platform.fuses_elementwise() or not self.platform.supports_graph_capture():
            return False
        fused.enable_fusion()
        return True

    def _capture_decode_graphs(self, config: EngineConfig, model) -> list[int] | None:
        """Capture the decode forward as device graphs for a ladder of batch sizes where the platform
        can (zili.engine.cuda_graphs); the captured sizes, or None when decode steps stay eager."""
        from zili.engine.cuda_graphs import DecodeGraphs, batch_ladder
        from zili.kernels.backends import get_attention_backend

        if not self.platform.supports_graph_capture():
            return None
        if not get_attention_backend(self.attention_backend).graph_safe_decode:
            logger.info("decode graphs: off (attention backend %r reads host-side lengths)", self.attention_backend)
            return None
        if not capabilities_of(model).graph_safe_decode:
            logger.info("decode graphs: off (the %s family is not graph-safe: it routes on data)",
                        getattr(getattr(model, "config", None), "architecture", type(model).__name__))
            return None
        tuned = self._tuned("graph_batch_sizes")
        ladder = [s for s in tuned if s <= config.max_num_seqs] if tuned else batch_ladder(config.max_num_seqs)
        if not ladder:
            return None
        max_blocks = -(-self.max_model_len // config.block_size)
        start = time.perf_counter()
        try:
            graphs = DecodeGraphs(model, self.runner.kv_caches, self.platform, ladder, max_blocks, config.block_size,
                                  self.platform.device)
            graphs.capture(fused_ops=self.fused_elementwise)
        except Exception as exc:  # a capture the driver refuses must not stop the engine
            logger.warning("decode graphs: off, capture failed (%s: %s)", type(exc).__name__, exc)
            return None
        self.runner.decode_graphs = graphs
        logger.info("decode graphs: captured batch sizes %s%s in %.1f s", graphs.ladder,
                    " (tuned)" if tuned else "", time.perf_counter() - start)
        return graphs.ladder

    def _tuned(self, key: str):
        return self.tuning.get(key) if self.tuning is not None else None

    def _apply_model_tuning(self, config: EngineConfig, loaded) -> EngineConfig:
        """Pick this model's tuned entry and log what the tune cache supplies."""
        if self.tuning is None:
            return config
        key = model_key(loaded.config, loaded.dtype, config.quantization)
        self.tuning.select_model(key)
        block_size = self._tuned("block_size")
        if block_size and config.block_size == EngineConfig.block_size:  # left at its default
            config = dataclasses.replace(config, block_size=block_size)
        logger.info("tune cache %s: %s (model %s%s)", self.tuning.path, self.tuning.describe(), key,
                    "" if self.tuning.model else ": not tuned, device settings only")
        return config

    def _quantize(self, loaded, mode: str, max_rows: int | None = None) -> dict[str, int]:
        from zili.layers import onednn
        from zili.models.quantize import calibrate_max_rows, quantize_model, set_quant_max_rows
        from zili.models.loader import open_checkpoint

        if mode != "none" and self.platform.matmul_backend() != "cpu-packed":
            logger.info("weights: dense (%s has no packed int4/int8 matmul)", self.platform.name)
            return {}
        checkpoint = open_checkpoint(loaded.source) if mode != "none" and loaded.source.format == "gguf" else None
        counts = dict(quantize_model(loaded.model, mode, checkpoint))
        # Dense weights pre-packed for oneDNN (after quantizing, which reads them; before calibrating,
        # which races the packed path against the quantized one).
        if self.platform.matmul_backend() == "cpu-packed" and onednn.available(loaded.dtype):
            n = onednn.pack_dense_weights(loaded.model)
            logger.info("weights: %d dense projections pre-packed for oneDNN (bf16)", n)
        if counts.keys() - {"dense"}:
            if max_rows is None:
                rows, how = calibrate_max_rows(loaded.model), "measured"
            else:
                set_quant_max_rows(loaded.model, max_rows)
                rows, how = max_rows, "tuned"
            logger.info("weights: %s; quantized kernels used up to %d rows per step (%s)",
                        ", ".join(f"{n} {form}" for form, n in counts.items()), rows, how)
        return counts

    @staticmethod
    def _resolve_max_model_len(requested: int | None, model_len: int) -> int:
        if requested is None:
            return model_len
        if requested > model_len:
            raise ValueError(f"max_model_len={requested} exceeds the model's context length ({model_len})")
        return requested

    def _num_kv_blocks(self) -> int:
        per_block = kv_bytes_per_block(self.cache_config, self.config.block_size, self.dtype)
        mem = self.config.kv_cache_memory
        if mem is None or isinstance(mem, float):
            budget = int((mem or self.platform.default_kv_cache_fraction()) * self.platform.free_memory())
        else:
            budget = mem
        # More than every sequence at full length is never needed.
        ceiling = self.config.max_num_seqs * -(-self.max_model_len // self.config.block_size)
        num_blocks = min(budget // per_block, ceiling)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={mem!r} holds no KV block; one block needs {per_block} bytes")
        return num_blocks

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams | None = None) -> str:
        """Queue a request. Raises ValueError if it is malformed or can never fit."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, token_ids = self._prompt_tokens(prompt)
        max_tokens = self._check_fits(len(token_ids), params)
        grammar = self.compile_structured(params.structured) if params.structured is not None else None
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.tokenizer.eos_token_ids)
        req = Request(request_id, text, token_ids, params, max_tokens, frozenset(stop_ids))
        for i in range(params.n):
            seq = Sequence(f"{request_id}#{i}", req, i, list(token_ids),
                           detokenizer=IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
                           logprobs=[] if params.logprobs is not None else None)
            if params.seed is not None:
                seq.generator = torch.Generator().manual_seed(sequence_seed(params.seed, i))
            if grammar is not None:  # structured output: one matcher per sequence
                seq.grammar = self._grammar_backend.new_matcher(grammar)
                self._constrained.add(seq)
            req.sequences.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        self.prompt_tokens_total += len(token_ids)
        return request_id

    def _prompt_tokens(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
            text: str | None = prompt
        else:
            token_ids, text = list(prompt), None
            vocab = self.model_config.vocab_size
            bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        if not token_ids:
            raise ValueError("prompt is empty: it must contain at least one token")
        return text, token_ids

    def _check_fits(self, prompt_len: int, params: SamplingParams) -> int:
        limit = self.max_model_len
        if prompt_len >= limit:
            raise ValueError(f"the prompt has {prompt_len} tokens, but the maximum context length is {limit} "
                             f"tokens (prompt plus at least one generated token)")
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - prompt_len
        if prompt_len + max_tokens > limit:
            raise ValueError(f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) is {prompt_len + max_tokens}"
                             f" tokens, more than the maximum context length of {limit} tokens")
        need = self.kv_cache.blocks_needed(prompt_len + max_tokens)
        if need > self.kv_cache.num_blocks:
            raise ValueError(f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) needs {need} KV blocks, "
                             f"but the whole KV cache has {self.kv_cache.num_blocks}; raise kv_cache_memory or "
                             f"lower max_tokens")
        return max_tokens

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.sequences:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
            self._constrained.discard(seq)
        self._finished_outside_step.append(req.to_output())

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent; also runs at interpreter exit)."""
        if self.tp_executor is not None:
            self.tp_executor.close()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._finished_outside_step)

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._finished_outside_step = self._finished_outside_step, []
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        step_input, sampling = self._build_step(batch)
        logits = self.runner.execute(step_input)
        self.scheduler.on_step_done(batch)
        touched: dict[str, Request] = {}
        if sampling:
            grammar_mask = self._grammar_backend.build_mask(sampling) if self._constrained else None
            result = self.sampler(logits, sampling, grammar_mask)
            for seq, token_id, logprob in zip(sampling, result.token_ids, result.logprobs):
                self._append_token(seq, token_id, logprob)
                touched[seq.request.request_id] = seq.request
        for req in touched.values():
            outputs.append(req.to_output())
            if req.finished:
                del self.requests[req.request_id]
        return outputs

    def _build_step(self, batch: ScheduledBatch) -> tuple[StepInput, list[Sequence]]:
        token_ids, starts, tables, sample = [], [], [], []
        sampling: list[Sequence] = []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            token_ids.append(seq.token_ids[start:start + num_new])
            starts.append(start)
            tables.append(self.kv_cache.block_ids(seq.seq_id))
            samples = start + num_new == seq.num_tokens
            sample.append(samples)
            if samples:
                sampling.append(seq)
        return StepInput(token_ids, starts, tables, sample), sampling

    def _append_token(self, seq: Sequence, token_id: int, logprob: TokenLogprob | None) -> None:
        req, params = seq.request, seq.request.params
        seq.token_ids.append(token_id)
        self.generation_tokens_total += 1
        if logprob is not None and seq.logprobs is not None:
            seq.logprobs.append(logprob)
        if seq.grammar is not None and self._advance_grammar(seq, token_id):
            return
        if token_id in req.stop_token_ids:
            self._finish(seq, "stop", None if token_id in self.tokenizer.eos_token_ids and token_id
                         not in params.stop_token_ids else token_id)
            return
        seq.detokenizer.add(token_id)
        if params.stop and self._check_stop_strings(seq):
            return
        if seq.num_output_tokens >= req.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length", None)
            return
        self._release_stable_text(seq)

    def _check_stop_strings(self, seq: Sequence) -> bool:
        params = seq.request.params
        text = seq.detokenizer.text
        longest = max(len(s) for s in params.stop)
        window_start = max(0, len(seq.text) - longest)
        best: tuple[int, str] | None = None
        for stop in params.stop:
            idx = text.find(stop, window_start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return False
        idx, stop = best
        seq.text = text[:idx + len(stop)] if params.include_stop_str_in_output else text[:idx]
        self._finish(seq, "stop", stop, flush=False)
        return True

    def _release_stable_text(self, seq: Sequence) -> None:
        """Expose the detokenized text, holding back a tail that could still begin a stop string."""
        text = seq.detokenizer.text
        stops = seq.request.params.stop
        hold = max(len(s) for s in stops) - 1 if stops and not seq.request.params.include_stop_str_in_output else 0
        stable = text[:len(text) - hold] if hold else text
        if len(stable) > len(seq.text):
            seq.text = stable

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None, flush: bool = True) -> None:
        if flush:
            seq.detokenizer.flush()
            seq.text = seq.detokenizer.text
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)
        self._constrained.discard(seq)

    # ---- structured output (zili.structured) -------------------------------------------------
    def compile_structured(self, structured):
        """Compile a StructuredOutput for this model's vocabulary, or fetch it from the cache.

        ValueError names the problem. Thread-safe, so a server can compile off the engine thread
        and let add_request hit the cache."""
        with self._grammar_lock:
            if self._grammar_backend is None:
                from zili.structured.backend import GrammarBackend

                self._grammar_backend = GrammarBackend(self.tokenizer, self.model_config.vocab_size)
        return self._grammar_backend.compile(structured)

    def _advance_grammar(self, seq: Sequence, token_id: int) -> bool:
        """Feed the sampled token to the sequence's matcher; True when that finished the sequence."""
        if not seq.grammar.accept_token(token_id):  # only if the mask was overridden: end, don't crash
            logger.error("structured output: %s sampled token %d outside its grammar", seq.seq_id, token_id)
            self._finish(seq, "abort", None)
            return True
        if seq.grammar.is_terminated() and token_id not in seq.request.stop_token_ids:
            seq.detokenizer.add(token_id)  # the grammar's own end (e.g. EOS under ignore_eos)
            self._finish(seq, "stop", token_id)
            return True
        return False

    # ---- introspection -----------------------------------------------------------------------
    def stats(self) -> EngineStats:
        kv = self.kv_cache
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=kv.usage, prefix_cache_hit_rate=kv.prefix_hit_rate,
            num_free_blocks=kv.num_free_blocks, num_total_blocks=kv.num_blocks,
            prompt_tokens_total=self.prompt_tokens_total, generation_tokens_total=self.generation_tokens_total,
            num_preemptions=self.scheduler.num_preemptions,
        )
