"""The decode step compiled into one graph (torch.compile / Inductor), for CPUs.

At one token per sequence a small model's decode step is hundreds of tiny ops: on a CPU their
dispatch costs as much as the matmuls. Compiling the whole forward plus the logits (norms, rotary,
SwiGLU, residual adds and the KV-cache write fused into a few C++ loops around the int4/int8/bf16
matmul kernels) removes most of that: on the 2-core dev VM SmolLM2-135M's single-stream step went
from ~16 ms to ~10 ms.

What the graph sees is tensors only (`AttentionMetadata.decode`): no host-side lengths, so one graph
serves every context length. The batch and block-table dimensions are marked dynamic; dynamo still
specialises a batch of 1, and the quantized/dense switch of `zili.layers.quant` (by row count) splits
the rest, so a model gets at most three graphs, all built by `warm_up` before the first request.
Prefill and mixed steps stay eager. Inductor's on-disk cache (under zili's cache folder unless
TORCHINDUCTOR_CACHE_DIR says otherwise) makes later starts take seconds instead of a minute.

A first start compiles for a minute or more (2-3 on 2 cores): too long to keep a server's /health
waiting. With ZILI_BACKGROUND_COMPILE=1 (`zili serve` sets it) `start_in_background` builds the graphs
on a thread against a few scratch KV blocks of their own while the engine serves every step eagerly;
when they are ready the runner switches to them (one attribute assignment, between two steps).

By default (ZILI_AOT_DECODE, unless 0) `zili serve` prefers the ahead-of-time package of zili.engine.aot_decode
(no compiler in the serving process); this module is then its fallback where that cannot be built or
loaded, and what `LLM(..., enforce_eager=False)` compiles in-process without a cached package.

The eager path stays one switch away: EngineConfig.enforce_eager (`--enforce-eager`), or the
environment variable ZILI_ENFORCE_EAGER=1, which the test suite sets so that only the tests about
compilation pay for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from zili import envs
from zili.kernels.attention import AttentionMetadata
from zili.kernels.backends import AttentionBackend
from zili.layers.fused import allow_recompiles
from zili.models.base import CausalLM
from zili.models.registry import capabilities_of

logger = logging.getLogger(__name__)

# Blocks per layer of the scratch KV caches a background compile writes into (any count above 1:
# the pool's block count is a symbolic dimension of the graphs).
SCRATCH_BLOCKS = 4


COMPILE_THREAD_NAME = "zili-compile-decode"  # the background compile's thread (the server's shutdown looks for it)

# A background compile must not slow the requests served meanwhile. Two things made it do so:
# - The GIL: every torch op the serving thread dispatches releases it, and taking it back from a
#   thread that is tracing or generating code costs up to one switch interval (CPython's default is
#   5 ms), so an eager decode step of a few hundred ops waited seconds. While compiling, the interval
#   is BACKGROUND_SWITCH_INTERVAL_S.
# - The cores: the compile thread (and the C++ compiler it starts) took a core from the intra-op
#   thread pool, whose every parallel region then waited on a descheduled worker. The compile thread
#   runs at BACKGROUND_NICE (Linux nice values are per thread, and a compiler it forks inherits it).
BACKGROUND_SWITCH_INTERVAL_S = 1e-4
BACKGROUND_NICE = 19

# The switch interval is process-wide: with two engines compiling at once, each restoring the value it
# saw would leave the short one in place for good. The first compile to start saves it, the last to end
# restores it.
_switch_lock = threading.Lock()
_compiles_running = 0
_saved_switch_interval = 0.0


@contextlib.contextmanager
def _short_switch_interval() -> Iterator[None]:
    """Hold CPython's switch interval at BACKGROUND_SWITCH_INTERVAL_S (or below) while any background
    compile runs; restore the interval found by the first one when the last one ends."""
    global _compiles_running, _saved_switch_interval
    with _switch_lock:
        if _compiles_running == 0:
            _saved_switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved_switch_interval, BACKGROUND_SWITCH_INTERVAL_S))
        _compiles_running += 1
    try:
        yield
    finally:
        with _switch_lock:
            _compiles_running -= 1
            if _compiles_running == 0:
                sys.setswitchinterval(_saved_switch_interval)


# Per call, dynamo evaluates a guard on every tensor the graph reads (SmolLM2-135M's ~370 weights: ~0.7 ms
# of an ~8.6 ms single-stream step on the 2-core VM) and Inductor's wrapper asserts every input's size
# and stride (491 calls, ~0.2 ms). Weights and module attributes are fixed once the engine is built, so
# the guards on modules go (torch.compiler.skip_guard_on_all_nn_modules_unsafe) and so do the asserts;
# what changes between calls (the step's tensors, the KV caches, the attention backend) keeps its guards.
_GRAPH_OPTIONS: dict[str, Any] = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                                  "size_asserts": False}
# The dropped guards also told two models apart, and dynamo caches graphs on the code object: each model
# structure compiles through a code object of its own (a copy of CompiledDecode._forward's), so engines of
# one model share graphs and engines of different models never meet.
_FORWARD_CODES: dict[str, types.CodeType] = {}


def structure_key(model: nn.Module) -> str:
    """A digest of what a compiled decode graph of `model` depends on besides its tensors' values: every
    module's path and type, its tensors' shapes, strides, dtypes and devices, and its plain attributes
    (numbers, strings, dtypes, and up to two levels into attribute objects such as packed weights or a
    config), so that two models with equal keys trace to the same graph. Hex string."""
    digest = hashlib.blake2b(digest_size=16)

    def feed(obj: Any, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            digest.update(f"T{tuple(obj.shape)}{obj.stride()}{obj.dtype}{obj.device};".encode())
        elif obj is None or isinstance(obj, (bool, int, float, str, torch.dtype, torch.device)):
            digest.update(f"{type(obj).__name__}:{obj!r};".encode())
        elif isinstance(obj, (tuple, list)):
            digest.update(b"(")
            for item in obj:
                feed(item, depth)
            digest.update(b")")
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                digest.update(f"{k}=".encode())
                feed(obj[k], depth)
        elif isinstance(obj, nn.Module):
            digest.update(b"module;")  # walked by named_modules
        elif depth > 0 and hasattr(obj, "__dict__"):
            digest.update(f"{type(obj).__qualname__}{{".encode())
            feed(vars(obj), depth - 1)
            digest.update(b"}")
        else:
            digest.update(f"{type(obj).__qualname__};".encode())

    for name, module in model.named_modules():
        digest.update(f"[{name}|{type(module).__qualname__}]".encode())
        feed({k: v for k, v in vars(module).items() if k != "_modules"}, 2)
    return digest.hexdigest()


def eager_by_default() -> bool:
    return envs.enforce_eager()


def compiles_in_background() -> bool:
    return envs.background_compile()


def unsupported_reason(model: nn.Module, platform, attention_backend: str, tensor_parallel: bool) -> str | None:
    """Why this set-up keeps the eager decode step, or None when it can compile."""
    if not platform.compiles_decode_step():
        return f"the {platform.name} platform does not compile its decode step"
    if tensor_parallel:
        return "tensor-parallel ranks run eagerly"
    if not capabilities_of(model).compiled_decode:
        family = getattr(getattr(model, "config", None), "architecture", type(model).__name__)
        return f"the {family} family runs eagerly (its decode step does not compile: data-dependent routing)"
    if attention_backend not in ("sdpa", "cpp"):
        return f"attention backend {attention_backend!r} has no tensor-only decode path"
    return None


def _compile_in_this_process() -> None:
    """Inductor's parallel compile (compile_threads > 1, its default on any multi-core CPU) starts a
    pool of worker processes that each import torch and stay alive after the compile: ~2 x 250 MiB
    beside a server whose own footprint is ~1 GiB. A background compile has no one waiting on it,
    so it compiles in the serving process's thread instead. TORCHINDUCTOR_COMPILE_THREADS, when set,
    still decides."""
    if "TORCHINDUCTOR_COMPILE_THREADS" in os.environ:
        return
    # Imported here, not at the top: a server that decodes eagerly never loads the compiler.
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1


def _lower_this_threads_priority() -> None:
    """Raise the calling thread's nice value to BACKGROUND_NICE (Linux: per thread; elsewhere, or
    without permission, a no-op). It is never lowered back: the thread ends after the compile."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), BACKGROUND_NICE))
    except (AttributeError, OSError):
        pass


class CompiledDecode:
    """Runs decode-only steps through the compiled graph; `__call__` returns float32 logits."""

    def __init__(self, model: CausalLM, kv_caches: list[torch.Tensor], block_size: int,
                 attention: AttentionBackend | None = None) -> None:
        envs.use_zili_inductor_cache()
        self.model = model
        self.attention = attention  # the runner's attention backend (None: the torch reference)
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.compile_seconds = 0.0
        # The pool size follows free memory: a symbolic block count keeps the graphs (and Inductor's
        # on-disk cache of them) valid for every pool size.
        for cache in kv_caches:
            torch._dynamo.mark_dynamic(cache, 1)
        # One graph per batch size of the ladder, and per engine in the process: dynamo keys them all
        # on this one method's code, so its default limit of 8 graphs made the third engine in a
        # process (or a long ladder) fail to compile and run eagerly.
        allow_recompiles(256)
        # Guards and asserts on what cannot change after the build are dropped (_GRAPH_OPTIONS); the code
        # object the graphs are cached on is this model structure's own (structure_key).
        code = _FORWARD_CODES.setdefault(structure_key(model), CompiledDecode._forward.__code__.replace())
        forward = types.MethodType(types.FunctionType(code, CompiledDecode._forward.__globals__, "_forward"), self)
        self._fn = torch.compile(forward, dynamic=False, fullgraph=True, options=dict(_GRAPH_OPTIONS))

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        meta = AttentionMetadata.decode(slot_mapping, block_tables, seq_lens, self.block_size, self.attention)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        tables = meta.block_tables
        if tables.shape[1] < 2:  # width 1 would be specialised into a graph of its own
            tables = torch.nn.functional.pad(tables, (0, 2 - tables.shape[1]))
        args = (input_ids, positions, meta.slot_mapping, tables, meta.seq_lens)
        if input_ids.shape[0] > 1:
            # maybe_: a batch range holding one size (2, when quantized layers stop at 2 rows) is
            # specialised to it instead of failing the compile.
            for t in args:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.mark_dynamic(tables, 1)
        return self._fn(*args)

    @torch.inference_mode()
    def warm_up(self, batch_sizes: list[int], scratch_block: int) -> float:
        """Build the graphs for these batch sizes now (not on a user's first request), writing
        only into `scratch_block`, which must be free. Returns the seconds it took."""
        start = time.perf_counter()
        for b in batch_sizes:
            meta = AttentionMetadata.build([1] * b, [1] * b, [[scratch_block]] * b, self.block_size,
                                           backend=self.attention)
            meta.slot_mapping.fill_(scratch_block * self.block_size)
            self(torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long), meta)
        self.compile_seconds = time.perf_counter() - start
        return self.compile_seconds

    def start_in_background(self, batch_sizes: list[int],
                            on_ready: Callable[[CompiledDecode], None]) -> threading.Thread:
        """Build the graphs for these batch sizes on a daemon thread, against scratch KV caches of
        SCRATCH_BLOCKS blocks per layer (the pool's block count is symbolic in the graphs, so the
        same graphs then serve the real caches), and call `on_ready(self)` once they are built.
        The engine keeps stepping eagerly meanwhile; a failure is logged and leaves it eager."""
        _compile_in_this_process()
        real = self.kv_caches
        scratch = [torch.zeros((c.shape[0], SCRATCH_BLOCKS, *c.shape[2:]), dtype=c.dtype, device=c.device)
                   for c in real]
        for cache in scratch:
            torch._dynamo.mark_dynamic(cache, 1)

        def run() -> None:
            self.kv_caches = scratch
            _lower_this_threads_priority()
            try:
                with _short_switch_interval():
                    seconds = self.warm_up(batch_sizes, scratch_block=0)
            except Exception as exc:  # a torch/compiler limitation must not stop the engine
                logger.warning("decode step stays eager: compiling it failed (%s: %s)", type(exc).__name__, exc)
                return
            finally:
                self.kv_caches = real
            logger.info("compiled the decode step for batch sizes %s in %.1f s (in the background); "
                        "decode steps run compiled from now on", batch_sizes, seconds)
            on_ready(self)

        thread = threading.Thread(target=run, name=COMPILE_THREAD_NAME, daemon=True)
        thread.start()
        return thread
