"""Building an engine: everything that happens once, before the first step.

`build_engine(config)` sets host threads and the allocator, reads the tune cache, picks the
attention backend, starts tensor-parallel workers, loads (or adopts) the model, quantizes it with
the packed kernel per layer shape the tune cache names (or a bounded calibration measures now and
caches), sizes the KV pool, creates the runner (which owns its attention backend), and
compiles or captures the decode step. What it built goes to `Engine(parts)`, which only runs.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from zili import envs
from zili.config import QUANTIZED_KV_DTYPES, EngineConfig, ModelConfig, kv_cache_torch_dtype
from zili.distributed.executor import TensorParallelExecutor
from zili.engine import aot_decode
from zili.engine.compiled_decode import CompiledDecode, compiles_in_background, eager_by_default, unsupported_reason
from zili.engine.cuda_graphs import DecodeGraphs, batch_ladder
from zili.engine.draft_model import DraftModelProposer, check_same_vocab
from zili.engine.engine import Engine
from zili.engine.executor import Executor
from zili.engine.kv_cache import KVCacheManager
from zili.engine.mtp import MTPProposer
from zili.engine.runner import ModelRunner, kv_bytes_per_block, kv_row_align
from zili.engine.spec_decode import MAX_FORCED_DRAFT_TOKENS, Proposer
from zili.kernels.backends import (
    AttentionBackend,
    batch_invariant,
    choose_attention_backend,
    is_installed,
    use_attention_backend,
)
from zili.layers import fused
from zili.layers.linear import Linear, set_batch_invariant
from zili.layers.quant_calibration import KernelChoice
from zili.models.deepseek import DeepseekForCausalLM, DeepseekMTP
from zili.models.loader import LoadedModel, load_model, open_checkpoint
from zili.models.quantize import quantize_and_calibrate
from zili.models.registry import capabilities_of, default_dtype
from zili.platforms import current_platform
from zili.platforms.interface import Platform
from zili.platforms.tuning import TuneCache, TunedSettings, load_tuning, model_key
from zili.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class EngineParts:
    """What `Engine` runs with; made by `build_engine_parts`."""

    config: EngineConfig  # with the tune cache's block size applied
    platform: Platform
    model_config: ModelConfig
    cache_config: ModelConfig  # what this rank's KV cache holds (its own KV heads under tensor parallelism)
    tokenizer: Tokenizer
    dtype: torch.dtype
    executor: Executor  # the ModelRunner, or the TensorParallelExecutor driving it and the workers
    tp_executor: TensorParallelExecutor | None
    num_kv_blocks: int
    max_model_len: int
    attention_backend: str
    quantized: dict[str, int]  # layers per weight form ("int4", "int8", "dense")
    compile_seconds: float | None = None  # the decode step compiled (CPUs), or None: eager
    graph_batch_sizes: list[int] | None = None  # captured decode graphs (GPUs), or None
    fused_elementwise: bool = False
    proposer: Proposer | None = None  # speculative decoding's draft maker, when not the default n-gram lookup


def build_engine(config: EngineConfig, loaded: LoadedModel | None = None) -> Engine:
    """A ready engine for `config` (on `loaded` when given: a model already in memory, one device).
    ValueError for settings that cannot work here; TensorParallelError when a worker fails to start."""
    return Engine(build_engine_parts(config, loaded))


def build_engine_parts(config: EngineConfig, loaded: LoadedModel | None = None) -> EngineParts:
    """Everything `build_engine` does except constructing the Engine."""
    platform = current_platform()
    tuning = load_tuning(platform) if config.use_tune_cache else None
    platform.set_num_threads(config.threads or _tuned(tuning, "threads"))
    platform.prepare_host_allocator()
    name = choose_attention_backend(config.attention_backend, platform, _tuned(tuning, "attention_backend"))
    attention = use_attention_backend(name, _tuned(tuning, "triton"))
    if config.deterministic:
        if config.tensor_parallel_size > 1 or config.distributed_executor_backend == "mp":
            raise ValueError("EngineConfig.deterministic is not supported with tensor parallelism yet")
        attention = batch_invariant(attention, "cpp" in platform.attention_backends() and is_installed("cpp"))
    tp_executor = None
    if config.tensor_parallel_size > 1 or config.distributed_executor_backend == "mp":
        if loaded is not None:
            raise ValueError("a preloaded model runs on one device: tensor_parallel_size must be 1")
        tp_executor = TensorParallelExecutor(config, attention.name)  # workers load meanwhile
        loaded, quantized = tp_executor.load_shard()
        config = _apply_model_tuning(config, tuning, loaded)
    elif loaded is None:
        # Projections packed from a GGUF's codes are not loaded dense first (the build's peak memory).
        defer = config.quantization if platform.matmul_backend() == "cpu-packed" else None
        loaded = load_model(config.model, dtype=config.dtype, device=platform.device,
                            load_format=config.load_format, seed=config.seed, defer_packed=defer)
        config = _apply_model_tuning(config, tuning, loaded)
        source = loaded.source
        report = quantize_and_calibrate(loaded.model, config.quantization, loaded.dtype, platform.matmul_backend(),
                                        (lambda: open_checkpoint(source)) if source.format == "gguf" else None,
                                        _tuned(tuning, "quant_max_rows"), _tuned_kernels(tuning), config.calibrate,
                                        row_invariant=config.deterministic)
        quantized = report.counts
        if report.measured and config.use_tune_cache:
            _cache_kernel_choices(platform, report.measured)
        platform.release_host_memory()  # the loader's and the packing's temporaries
    else:
        config, quantized = _apply_model_tuning(config, tuning, loaded), {}
    mc = loaded.config
    if config.deterministic:
        _make_batch_invariant(loaded.model, mc)
    cache_config = tp_executor.cache_config(mc) if tp_executor is not None else mc
    spec = config.speculative_config
    mtp = spec is not None and not isinstance(spec, (str, dict)) and spec.method == "deepseek_mtp"
    try:
        if mtp:
            _check_mtp(config, loaded, tp_executor is not None)
        max_model_len = resolve_max_model_len(config.max_model_len, mc.max_position_embeddings)
        kv_dtype = kv_cache_dtype(config, mc, attention, tp_executor is not None, loaded.dtype, platform)
        num_blocks = num_kv_blocks(config, platform, cache_config, kv_dtype, max_model_len, extra_layers=int(mtp),
                                   row_align=kv_row_align(attention))
        runner = ModelRunner(loaded.model, cache_config, num_blocks, config.block_size, loaded.dtype,
                             tp_executor.device if tp_executor is not None else platform.device, attention, kv_dtype)
        executor: Executor = tp_executor.attach(runner, num_blocks) if tp_executor is not None else runner
    except BaseException:
        if tp_executor is not None:
            tp_executor.abort()
        raise
    parts = EngineParts(config, platform, mc, cache_config, loaded.tokenizer, loaded.dtype, executor, tp_executor,
                        num_blocks, max_model_len, attention.name, quantized)
    if spec is not None and not isinstance(spec, (str, dict)) and spec.method == "draft_model":
        parts.proposer = _draft_model_proposer(config, platform, attention, loaded, num_blocks, max_model_len,
                                               tp_executor is not None)
    if mtp:
        parts.proposer = _mtp_proposer(config, platform, loaded, runner)
    # Decode-step speed-ups, none under tensor parallelism (its ranks run eagerly): a compiled step
    # (CPUs) or captured device graphs with fused elementwise kernels (GPUs).
    eager = tp_executor is not None or config.deterministic or (config.enforce_eager if config.enforce_eager is not None
                                        else eager_by_default() or _tuned(tuning, "compiled_decode") is False)
    if eager and config.enforce_eager is None and not eager_by_default() and tp_executor is None:
        logger.info("decode step stays eager: `zili tune` measured the compiled step no faster on this device")
    if not eager:
        parts.fused_elementwise = _fuse_elementwise(platform)
        parts.compile_seconds = _compile_decode(runner, platform, attention, config)
        parts.graph_batch_sizes = _capture_decode_graphs(runner, platform, attention, config, max_model_len,
                                                         _tuned(tuning, "graph_batch_sizes"), parts.fused_elementwise)
    logger.info("KV cache: %d blocks of %d tokens (%.1f MiB, %s)", num_blocks, config.block_size,
                num_blocks * kv_bytes_per_block(cache_config, config.block_size, kv_dtype, kv_row_align(attention)) / 2**20,
                kv_dtype)
    return parts


def _draft_model_proposer(config: EngineConfig, platform: Platform, attention: AttentionBackend, target: LoadedModel,
                          num_blocks: int, max_model_len: int, tensor_parallel: bool) -> DraftModelProposer:
    """Load speculative_config.model beside the target with its own KV pool (zili.engine.draft_model).
    Its pool holds what the target's does plus k + 1 block(s) per sequence for the drafts. ValueError
    naming the field for a draft that cannot serve this target."""
    spec = config.speculative_config
    assert spec is not None and not isinstance(spec, (str, dict)) and spec.model is not None
    field = "EngineConfig.speculative_config.model"
    if tensor_parallel:
        raise ValueError(f"{field}: a draft model does not run under tensor parallelism yet; "
                         "use tensor_parallel_size=1 or method 'ngram'")
    try:
        draft = load_model(spec.model, dtype=target.dtype, device=platform.device, load_format=config.load_format,
                           seed=config.seed)
    except (ValueError, OSError) as exc:  # not found, unsupported, unreadable: the field was wrong
        raise ValueError(f"{field}={spec.model!r}: {exc}") from exc
    check_same_vocab(target.tokenizer, draft.tokenizer, field)
    quantize_and_calibrate(draft.model, config.quantization, draft.dtype, platform.matmul_backend(),
                           (lambda: open_checkpoint(draft.source)) if draft.source.format == "gguf" else None,
                           calibrate=False)
    blocks = num_blocks + config.max_num_seqs * (1 + -(-spec.num_speculative_tokens // config.block_size))
    runner = ModelRunner(draft.model, draft.config, blocks, config.block_size, draft.dtype, platform.device, attention)
    logger.info("draft model %s: %d KV blocks (%.1f MiB), proposes %d token(s) a step", spec.model, blocks,
                blocks * kv_bytes_per_block(draft.config, config.block_size, draft.dtype) / 2**20,
                spec.num_speculative_tokens)
    return DraftModelProposer(runner, KVCacheManager(blocks, config.block_size, config.enable_prefix_caching),
                              target.config.vocab_size, min(max_model_len, draft.config.max_position_embeddings))


MTP_FIELD = "EngineConfig.speculative_config.method"


def _check_mtp(config: EngineConfig, target: LoadedModel, tensor_parallel: bool) -> None:
    """ValueError naming speculative_config.method where DeepSeek MTP cannot propose for this target."""
    mc = target.config
    name = f"{MTP_FIELD}='deepseek_mtp'"
    if not isinstance(target.model, DeepseekForCausalLM) or mc.num_nextn_predict_layers < 1:
        raise ValueError(f"{name}: the checkpoint ({mc.hf_architecture or mc.architecture}) has no multi-token-"
                         "prediction layer (num_nextn_predict_layers is 0 or absent in its HF config.json; GGUF files are "
                         "read without it); "
                         "use method 'ngram' or 'draft_model'")
    if tensor_parallel:
        raise ValueError(f"{name} does not run under tensor parallelism yet; use tensor_parallel_size=1 or "
                         "method 'ngram'")
    if config.load_format == "dummy":
        raise ValueError(f"{name} needs the MTP layer's weights from the checkpoint, not load_format='dummy'")


def _mtp_proposer(config: EngineConfig, platform: Platform, target: LoadedModel, runner: ModelRunner) -> MTPProposer:
    """The checkpoint's first MTP layer (DeepseekMTP, sharing the target's embedding) with a latent cache
    of the target pool's blocks (zili.engine.mtp); `_check_mtp` has passed. ValueError naming
    speculative_config.method when its tensors are missing or mis-shaped."""
    assert isinstance(target.model, DeepseekForCausalLM)
    mc = target.config
    embed = target.model.model.embed_tokens
    assert isinstance(embed, nn.Module)
    with torch.device(platform.device), default_dtype(target.dtype):
        mtp = DeepseekMTP(mc, embed, 1)
    mtp.requires_grad_(False).eval()
    try:
        with torch.no_grad():
            mtp.load_weights(open_checkpoint(target.source).tensors(target.dtype, keep=mtp.wants))
    except ValueError as exc:
        raise ValueError(f"{MTP_FIELD}='deepseek_mtp': the checkpoint's MTP layer "
                         f"(model.layers.{mc.num_hidden_layers}) cannot be loaded: {exc}") from exc
    quantize_and_calibrate(mtp, config.quantization, target.dtype, platform.matmul_backend(), None, calibrate=False)
    cache = torch.zeros_like(runner.kv_caches[0])
    logger.info("DeepSeek MTP: layer %d proposes %d token(s) a step (its latent cache: %.1f MiB in the target's "
                "blocks)", mc.num_hidden_layers, config.speculative_config.num_speculative_tokens,  # type: ignore[union-attr]
                cache.numel() * cache.element_size() / 2**20)
    return MTPProposer(mtp, cache, runner.attention, config.block_size, mc.vocab_size)


# ---- batch-invariant mode (EngineConfig.deterministic) ------------------------------------------

# Rows per matmul call in batch-invariant mode: the kernels' blocking (and so each row's summation
# order) is fixed by this row count; decode batches pad up to it, prefills loop over it. 16 keeps a
# small decode batch's padding cheap (a decode matmul is bound by reading the weights).
BATCH_INVARIANT_ROW_TILE = 16


def _make_batch_invariant(model: torch.nn.Module, mc: ModelConfig) -> None:
    """Every projection at one kernel and row tile (the attention backend was wrapped before loading;
    the decode step stays eager: Inductor's generated kernels are not checked for batch invariance).
    ValueError for the families it does not cover yet: MoE routes each expert a varying number of
    rows, MLA attends through its own absorbed kernels."""
    if mc.use_mla or mc.n_routed_experts:
        raise ValueError(f"EngineConfig.deterministic is not supported for {mc.architecture} "
                         "(MLA attention and Mixture-of-Experts layers are not batch-invariant yet)")
    layers = set_batch_invariant(model, BATCH_INVARIANT_ROW_TILE)
    logger.info("deterministic: %d projections in batch-invariant mode (row tile %d), per-row attention, "
                "eager decode", layers, BATCH_INVARIANT_ROW_TILE)


# ---- tuning (zili tune; zili.platforms.tuning): tuned values fill what the config leaves default ----


def _tuned(tuning: TunedSettings | None, key: str):  # noqa: ANN202 - the cache holds JSON values
    return tuning.get(key) if tuning is not None else None


def _tuned_kernels(tuning: TunedSettings | None) -> dict[str, KernelChoice]:
    """The tune cache's packed-matmul choice per layer shape (malformed entries dropped)."""
    raw = _tuned(tuning, "quant_kernels")
    if not isinstance(raw, dict):
        return {}
    choices = {key: KernelChoice.from_json(value) for key, value in raw.items()}
    return {key: choice for key, choice in choices.items() if choice is not None}


def _cache_kernel_choices(platform: Platform, measured: dict[str, KernelChoice]) -> None:
    """Keep the start-up calibration's choices, so the next start on this device reads them."""
    try:
        path = TuneCache().merge_device_entries(platform, "quant_kernels",
                                                {key: choice.to_json() for key, choice in measured.items()})
    except OSError as exc:  # a read-only home: calibrate again next time
        logger.warning("could not save the packed-matmul choices to the tune cache: %s", exc)
        return
    logger.info("tune cache %s: saved the packed-matmul choices for %d layer shape(s)", path, len(measured))


def _apply_model_tuning(config: EngineConfig, tuning: TunedSettings | None, loaded: LoadedModel) -> EngineConfig:
    """Select this model's tuned entry, apply its block size when the config left the default, log."""
    if tuning is None:
        return config
    key = model_key(loaded.config, loaded.dtype, config.quantization)
    tuning.select_model(key)
    block_size = tuning.get("block_size")
    if block_size and config.block_size == EngineConfig.block_size:  # left at its default
        config = dataclasses.replace(config, block_size=block_size)
    logger.info("tune cache %s: %s (model %s%s)", tuning.path, tuning.describe(), key,
                "" if tuning.model else ": not tuned, device settings only")
    return config


# ---- sizes -------------------------------------------------------------------------------------


def resolve_max_model_len(requested: int | None, model_len: int) -> int:
    """The context length to serve: the model's, or a smaller requested one. ValueError if larger."""
    if requested is None:
        return model_len
    if requested > model_len:
        raise ValueError(f"max_model_len={requested} exceeds the model's context length ({model_len})")
    return requested


def kv_cache_dtype(config: EngineConfig, model_config: ModelConfig, attention: AttentionBackend,
                   tensor_parallel: bool, model_dtype: torch.dtype, platform: Platform | None = None) -> torch.dtype:
    """The KV cache's element type for EngineConfig.kv_cache_dtype; ValueError naming the field where a
    quantized cache cannot run (a backend without kernels for it, or for MLA's latent rows; tensor parallelism).
    "auto" (`kv_cache_torch_dtype`) takes the platform's storage type for the model's dtype
    (`Platform.default_kv_cache_dtype`) when the model's dtype was "auto" too, on one device, outside MLA."""
    platform_default = platform.default_kv_cache_dtype(model_dtype) \
        if config.dtype == "auto" and platform is not None and not model_config.use_mla and not tensor_parallel else None
    dtype = kv_cache_torch_dtype(config.kv_cache_dtype, model_dtype, platform_default)
    if dtype not in QUANTIZED_KV_DTYPES:
        return dtype
    name = f"EngineConfig.kv_cache_dtype={config.kv_cache_dtype!r}"
    if model_config.use_mla:
        if config.kv_cache_dtype not in attention.mla_kv_cache_dtypes:
            supported = ", ".join(attention.mla_kv_cache_dtypes) or "none"
            raise ValueError(f"{name} is not supported for MLA models ({model_config.architecture}'s latent cache) "
                             f"by the {attention.name!r} attention backend (its quantized latent caches: "
                             f"{supported}); choose another attention_backend or kv_cache_dtype='auto'")
    elif config.kv_cache_dtype not in attention.kv_cache_dtypes:
        supported = ", ".join(attention.kv_cache_dtypes) or "none"
        raise ValueError(f"{name} is not supported by the {attention.name!r} attention backend (its quantized "
                         f"caches: {supported}); choose another attention_backend or kv_cache_dtype='auto'")
    if tensor_parallel:
        raise ValueError(f"{name} is not supported with tensor parallelism yet; use kv_cache_dtype='auto'")
    return dtype


def num_kv_blocks(config: EngineConfig, platform: Platform, cache_config: ModelConfig, dtype: torch.dtype,
                  max_model_len: int, extra_layers: int = 0, row_align: int = 1) -> int:
    """KV blocks the pool gets: `kv_cache_memory` bytes (an int), or that fraction of free memory
    (a float; default: the platform's share), never more than every sequence at full length needs.
    `extra_layers`: caches of that many more layers share the pool's blocks (DeepSeek MTP's), counted
    in the budget; `row_align`: the backend's quantized-row padding (ModelConfig.kv_cache_shape). ValueError
    when not even one block fits."""
    per_block = kv_bytes_per_block(cache_config, config.block_size, dtype, row_align)
    per_block += per_block * extra_layers // cache_config.num_hidden_layers
    mem = config.kv_cache_memory
    assert not isinstance(mem, str)  # EngineConfig parsed a size string into bytes
    if mem is None or isinstance(mem, float):
        budget = int((mem or platform.default_kv_cache_fraction()) * platform.free_memory())
    else:
        budget = mem
    ceiling = config.max_num_seqs * -(-max_model_len // config.block_size)
    num_blocks = min(budget // per_block, ceiling)
    if num_blocks < 1:
        raise ValueError(f"kv_cache_memory={mem!r} holds no KV block; one block needs {per_block} bytes")
    return num_blocks


# ---- decode-step speed-ups -----------------------------------------------------------------------


def _fuse_elementwise(platform: Platform) -> bool:
    """Compiled elementwise chains (zili.layers.fused) in captured decode graphs, where the platform
    wants them."""
    if not platform.fuses_elementwise() or not platform.supports_graph_capture():
        return False
    fused.enable_fusion()
    return True


MAX_GRAPH_ROWS = 256  # the largest decode graph captured for verify steps (device memory per graph grows with it)


def max_decode_rows(config: EngineConfig) -> int:
    """The most input rows a decode-only step can have: one per running sequence, and with
    speculative decoding 1 + num_speculative_tokens per verifying sequence (zili.engine.spec_decode),
    unless proposals stop at `disable_by_batch_size` sequences; jump-forward's forced drafts ("verify"
    mode) add up to MAX_FORCED_DRAFT_TOKENS per sequence, in steps of any size."""
    spec = config.speculative_config
    forced = MAX_FORCED_DRAFT_TOKENS if config.enable_jump_forward and config.jump_forward_mode == "verify" else 0
    if spec is None or isinstance(spec, (str, dict)):
        return config.max_num_seqs * (1 + forced)
    verifying = config.max_num_seqs
    if spec.disable_by_batch_size is not None:
        verifying = min(verifying, spec.disable_by_batch_size - 1)
    return max(config.max_num_seqs * (1 + forced), verifying * (1 + forced + spec.num_speculative_tokens))


def decode_batch_sizes(model: nn.Module, config: EngineConfig) -> list[int]:
    """The batch sizes that start a compiled decode graph: 1, 2 and one past each quantized layer's
    row limit (zili.layers.quant switches to the dense path there), up to `max_decode_rows`."""
    limits = {m.quant.max_rows for m in model.modules() if isinstance(m, Linear) and m.quant is not None}
    return sorted({b for b in [1, 2, *(r + 1 for r in limits)] if b <= max_decode_rows(config)})


def aot_decode_plan(runner: ModelRunner, config: EngineConfig, attention_name: str) -> tuple[str, list[tuple[int, int]]]:
    """The AOT decode package key of this engine and the batch ranges it covers (zili.engine.aot_decode)."""
    ranges = aot_decode.batch_ranges(decode_batch_sizes(runner.model, config), max_decode_rows(config))
    kv = {id(c) for c in runner.kv_caches}
    slots = [s for s in aot_decode.weight_slots(runner.model) if id(s.tensor) not in kv]
    key = aot_decode.package_key(str(config.model), runner.model, slots, runner.kv_caches, config.block_size,
                                 attention_name, ranges)
    return key, ranges


def _compile_decode(runner: ModelRunner, platform: Platform, attention: AttentionBackend,
                    config: EngineConfig) -> float | None:
    """Compile the decode step unless unsupported here (zili.engine.compiled_decode); the seconds it took."""
    model = runner.model
    reason = unsupported_reason(model, platform, attention.name, False)
    if reason is not None:
        logger.info("decode step stays eager: %s", reason)
        return None
    # A graph per batch shape dynamo tells apart: 1, 2.., and past each quantized layer's row limit,
    # up to the most rows a decode step can have (verify steps included: each one not built here
    # would compile on the first request that reaches it, stalling every stream for seconds).
    sizes = decode_batch_sizes(model, config)
    if compiles_in_background():  # serve eagerly now, switch when the graphs are built
        def switch(ready: CompiledDecode) -> None:
            runner.compiled_decode = ready
            platform.release_host_memory()  # what compiling freed

        def compile_here() -> None:  # CompiledDecode imports torch._dynamo: only built where used
            logger.info("serving eagerly while the decode step compiles in the background for batch sizes %s", sizes)
            CompiledDecode(model, runner.kv_caches, config.block_size, attention).start_in_background(sizes, switch)

        if envs.aot_decode():
            return _start_aot_decode(runner, attention, config, compile_here)
        compile_here()
        return None
    if envs.aot_decode():  # a package cached by an earlier server: no compiler in this process
        loaded_in = _load_cached_aot_decode(runner, *aot_decode_plan(runner, config, attention.name))
        if loaded_in is not None:
            return loaded_in
    logger.info("compiling the decode step for batch sizes %s (about 2 minutes on a first start, seconds "
                "from Inductor's cache afterwards; --enforce-eager skips it)", sizes)
    compiled = CompiledDecode(model, runner.kv_caches, config.block_size, attention)
    try:
        seconds = compiled.warm_up(sizes, scratch_block=0)
    except Exception as exc:  # a torch/compiler limitation must not stop the engine
        logger.warning("decode step stays eager: compiling it failed (%s: %s)", type(exc).__name__, exc)
        return None
    runner.compiled_decode = compiled
    platform.release_host_memory()
    logger.info("compiled the decode step for batch sizes %s in %.1f s", sizes, seconds)
    return seconds


def _load_cached_aot_decode(runner: ModelRunner, key: str, ranges: list[tuple[int, int]]) -> float | None:
    """Switch `runner` to the AOTInductor package cached under `key`: the seconds the load took, or
    None when no valid package is cached (a rejected one is removed by aot_decode.try_load_cached)."""
    start = time.perf_counter()
    loaded = aot_decode.try_load_cached(key, runner.model, runner.kv_caches)
    if loaded is None:
        return None
    runner.compiled_decode = loaded
    seconds = time.perf_counter() - start
    logger.info("decode step: AOTInductor package %s loaded in %.2f s (batch ranges %s)", key, seconds, ranges)
    return seconds


def _start_aot_decode(runner: ModelRunner, attention: AttentionBackend, config: EngineConfig,
                      compile_here: Callable[[], None]) -> float | None:
    """The decode step from a cached AOTInductor package (zili.engine.aot_decode): loaded now when
    cached (the seconds it took), else built by a child process while the engine serves eagerly and
    loaded when ready (None). Where the package cannot be built or loaded, `compile_here` falls back
    to the in-process background torch.compile."""
    model = runner.model
    key, ranges = aot_decode_plan(runner, config, attention.name)
    loaded_in = _load_cached_aot_decode(runner, key, ranges)
    if loaded_in is not None:
        return loaded_in
    marker = aot_decode.failed_marker(key)
    if marker.exists():
        logger.warning("AOT decode: an earlier build of package %s failed (%s); compiling in this process "
                       "instead (delete %s to retry the build)", key, marker.read_text(errors="replace").strip(),
                       marker)
        compile_here()
        return None
    try:
        blob = pickle.dumps(config)
    except Exception as exc:  # a config holding something unpicklable (a callable): no child build
        logger.warning("AOT decode: cannot hand this engine's settings to a build process (%s); compiling "
                       "in this process instead", exc)
        compile_here()
        return None

    def done(code: int) -> None:
        ready = aot_decode.try_load_cached(key, model, runner.kv_caches) if code == 0 else None
        if ready is None:
            logger.warning("AOT decode: no package (build exit code %d); falling back to torch.compile in this "
                           "process", code)
            compile_here()
            return
        runner.compiled_decode = ready
        logger.info("decode step: AOTInductor package %s built and loaded; decode steps run compiled from now on",
                    key)

    logger.info("serving eagerly while a child process builds the AOT decode package %s (batch ranges %s)",
                key, ranges)
    aot_decode.start_child_build(blob, key, ranges, done)
    return None


def _capture_decode_graphs(runner: ModelRunner, platform: Platform, attention: AttentionBackend,
                           config: EngineConfig, max_model_len: int, tuned: list[int] | None,
                           fused_ops: bool) -> list[int] | None:
    """Capture the decode forward as device graphs for a ladder of batch sizes where the platform
    can (zili.engine.cuda_graphs); the captured sizes, or None when decode steps stay eager."""
    model = runner.model
    if not platform.supports_graph_capture():
        return None
    if not attention.graph_safe_decode:
        logger.info("decode graphs: off (attention backend %r reads host-side lengths)", attention.name)
        return None
    if not capabilities_of(model).graph_safe_decode:
        logger.info("decode graphs: off (the %s family is not graph-safe: it routes on data)",
                    getattr(getattr(model, "config", None), "architecture", type(model).__name__))
        return None
    # Verify steps are decode rows too (k + 1 per speculating sequence): the ladder reaches them, up to
    # MAX_GRAPH_ROWS (beyond it a step runs eagerly, as vLLM's capture-size cap does).
    rows = max(config.max_num_seqs, min(max_decode_rows(config), MAX_GRAPH_ROWS))
    ladder = [s for s in tuned if s <= rows] if tuned else batch_ladder(rows)
    if not ladder:
        return None
    max_blocks = -(-max_model_len // config.block_size)
    start = time.perf_counter()
    try:
        graphs = DecodeGraphs(model, runner.kv_caches, platform, ladder, max_blocks, config.block_size,
                              platform.device, attention)
        graphs.capture(fused_ops=fused_ops)
    except Exception as exc:  # a capture the driver refuses must not stop the engine
        logger.warning("decode graphs: off, capture failed (%s: %s)", type(exc).__name__, exc)
        return None
    runner.decode_graphs = graphs
    logger.info("decode graphs: captured batch sizes %s%s in %.1f s", graphs.ladder,
                " (tuned)" if tuned else "", time.perf_counter() - start)
    return graphs.ladder
