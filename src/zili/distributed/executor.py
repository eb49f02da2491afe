"""Rank 0's side of tensor parallelism: start the workers, send each step's plan, watch for failure.

    executor = TensorParallelExecutor(config)      # spawn ranks 1..N-1, join the group as rank 0
    loaded, counts = executor.load_shard()          # rank 0's shard (the workers load theirs meanwhile)
    runner = executor.attach(ModelRunner(...), num_blocks)   # workers build their caches; ready
    logits = runner.execute(step)                   # broadcast the plan, run rank 0's forward
    executor.close()                                # STOP, join, leave the group

It implements `zili.engine.executor.Executor` (as `ModelRunner` does), so the engine drives either
without knowing which. Rank 0 runs the scheduler and the sampler; the workers only follow plans. Failures are bounded:
a worker that dies fails the step in progress at once (its sockets close) and is also noticed
while idle (a monitor thread waits on the worker processes); one that hangs fails the step after
`distributed_timeout` seconds. Either way `execute` raises TensorParallelError from then on, and
registered listeners are told (the server uses that to report unhealthy and exit non-zero).
While the engine is idle, rank 0 sends keep-alive plans so that the workers' own wait for the
next plan can time out too (if rank 0 hangs).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.connection
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

import torch

from zili.config import EngineConfig
from zili.distributed import group as pg
from zili.distributed.errors import TensorParallelError
from zili.distributed.plan import OP_IDLE, OP_STEP, OP_STOP, PlanChannel
from zili.distributed.worker import JOINED_KEY, KV_POOL_KEY, READY_KEY, WorkerSpec, run_worker
from zili.engine.runner import ModelRunner, StepInput
from zili.layers.parallel import rank_cache_config
from zili.platforms import current_platform

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"  # the workers run on this machine
JOIN_TIMEOUT_S = 5.0  # for a worker to exit after STOP before it is killed


class TensorParallelExecutor:
    def __init__(self, config: EngineConfig, attention_backend: str | None = None) -> None:
        self.config = config
        self.attention_backend = attention_backend  # the workers use rank 0's choice
        self.size = config.tensor_parallel_size
        self.timeout_s = config.distributed_timeout
        self.platform = current_platform()
        self.backend = self.platform.collective_backend()
        # The ranks share this machine's cores: split the host threads between them.
        self.threads = config.threads or max(1, torch.get_num_threads() // self.size)
        self.platform.set_num_threads(self.threads)
        self._lock = threading.Lock()  # one plan + forward at a time; keep-alives between steps
        self._closed = threading.Event()  # no more plans: stop the monitor
        self._fail_lock = threading.Lock()
        self._shut = False
        self._failure: TensorParallelError | None = None
        self._listeners: list[Callable[[TensorParallelError], None]] = []
        self._last_send = time.monotonic()
        self.runner: ModelRunner | None = None
        self.workers: list[BaseProcess] = []  # spawn-context processes
        self.store = pg.create_store(HOST, self.size)
        try:
            self._spawn_workers()
            self._wait_for_workers(JOINED_KEY, "start")  # a worker that dies on import fails fast
            self.tp, control = pg.init_group(self.store, 0, self.size, self.backend, self.timeout_s)
        except BaseException:
            self._stop_workers(graceful=False)
            pg.destroy_group()
            raise
        self.channel = PlanChannel(control)
        self.device = pg.rank_device(self.platform, 0)

    # ---- start-up ------------------------------------------------------------------------------
    def _spawn_workers(self) -> None:
        context = multiprocessing.get_context("spawn")  # no forked copies of threads or devices
        for rank in range(1, self.size):
            spec = WorkerSpec(self.config, rank, self.size, HOST, self.store.port, self.backend, self.timeout_s,
                              self.threads, self.attention_backend)
            process = context.Process(target=run_worker, args=(spec,), name=f"zili-tp-rank-{rank}", daemon=True)
            process.start()
            self.workers.append(process)
        logger.info("tensor parallel: %d ranks (%s), workers %s", self.size, self.backend,
                    [p.pid for p in self.workers])

    def load_shard(self):
        """Rank 0's own shard: (LoadedModel, quantized layer counts)."""
        from zili.distributed.weights import load_shard

        try:
            return load_shard(self.config, self.tp, self.device)
        except BaseException:
            self.abort()
            raise

    def cache_config(self, model_config):
        """The config rank 0's (and every rank's) KV cache is shaped by."""
        return rank_cache_config(model_config, self.tp)

    def attach(self, runner: ModelRunner, num_blocks: int) -> TensorParallelExecutor:
        """Hand the workers the KV pool's shape, wait until every rank is ready, start the monitor."""
        self.runner = runner
        self.store.set(KV_POOL_KEY, f"{num_blocks} {runner.block_size}")
        try:
            self._wait_for_workers(READY_KEY, "load the model")
        except BaseException:
            self.abort()
            raise
        atexit.register(self.close)
        threading.Thread(target=self._monitor, name="zili-tp-monitor", daemon=True).start()
        return self

    def abort(self) -> None:
        """Start-up failed: kill the workers, leave the group."""
        with self._fail_lock:
            self._shut = True
            self._closed.set()
        self._stop_workers(graceful=False)
        pg.destroy_group()

    def _wait_for_workers(self, key_format: str, what: str) -> None:
        """Wait until every worker has set its key to "ok"; raise its error, its death, or a timeout."""
        deadline = time.monotonic() + pg.STARTUP_TIMEOUT.total_seconds()
        pending = set(range(1, self.size))
        while pending:
            for rank in sorted(pending):
                key = key_format.format(rank=rank)
                if self.store.check([key]):
                    status = self.store.get(key).decode()
                    if status != "ok":
                        raise TensorParallelError(f"tensor-parallel rank {rank} failed to {what}: {status}")
                    pending.discard(rank)
            dead = self._dead_workers()
            if dead:
                raise TensorParallelError(f"tensor-parallel worker(s) exited before they could {what}: {dead}")
            if time.monotonic() > deadline:
                raise TensorParallelError(f"tensor-parallel ranks {sorted(pending)} did not {what} within "
                                          f"{pg.STARTUP_TIMEOUT}")
            if pending:
                time.sleep(0.02)

    # ---- steps -----------------------------------------------------------------------------------
    def execute(self, step: StepInput) -> torch.Tensor:
        """Send the plan, run rank 0's part of the forward pass; float32 logits as ModelRunner gives."""
        with self._lock:
            with self._fail_lock:  # a failure being recorded is reported once its listeners have heard
                failure = self._failure
            if failure is not None:
                raise failure
            if self._closed.is_set():
                raise TensorParallelError("the tensor-parallel workers were stopped (Engine.close())")
            if self.runner is None:  # checked before the plan goes out, so the ranks stay in step
                raise TensorParallelError("the tensor-parallel executor has no runner yet (attach() first)")
            try:
                self.channel.send(OP_STEP, step)
                logits = self.runner.execute(step)
            except Exception as exc:  # the ranks are out of step now: nothing more can run
                raise self._fail(f"a tensor-parallel step failed: {exc}") from exc
            finally:
                self._last_send = time.monotonic()
            return logits

    def step_extras(self):
        """Rank 0's prompt logprobs / pooled states of the last step (zili.engine.executor.Executor)."""
        return self.runner.step_extras() if self.runner is not None else None

    def add_failure_listener(self, listener: Callable[[TensorParallelError], None]) -> None:
        """`listener(error)` is called (from a background thread, at most once) when the group fails."""
        self._listeners.append(listener)
        if self._failure is not None:
            listener(self._failure)

    @property
    def failure(self) -> TensorParallelError | None:
        return self._failure

    # ---- failure and shutdown --------------------------------------------------------------------
    def _dead_workers(self) -> str:
        """'rank 1 (pid 123) exit code -9, ...' for every worker that has exited."""
        dead = []
        for rank, process in enumerate(self.workers, start=1):
            if multiprocessing.connection.wait([process.sentinel], timeout=0):
                process.join(1.0)  # its pipe closes a moment before it can be reaped
                dead.append(f"rank {rank} (pid {process.pid}) exit code {process.exitcode}")
        return ", ".join(dead)

    def _fail(self, reason: str) -> TensorParallelError:
        """Record the failure (the first one wins), tell the listeners, stop every worker."""
        with self._fail_lock:
            if self._failure is not None:
                return self._failure
            dead = self._dead_workers()
            self._failure = TensorParallelError(reason + (f" [{dead}]" if dead else ""))
            self._closed.set()
            logger.error("%s", self._failure)
            for listener in self._listeners:  # under the lock: told before anyone else sees the error
                try:
                    listener(self._failure)
                except Exception:  # noqa: BLE001 - a listener must not stop the others
                    logger.exception("tensor-parallel failure listener failed")
        self._stop_workers(graceful=False)
        return self._failure

    def _monitor(self) -> None:
        """Notice a worker's death while idle, and send keep-alives so workers never wait forever."""
        sentinels = [p.sentinel for p in self.workers]
        interval = max(0.05, self.timeout_s / 4)
        while not self._closed.is_set():
            if multiprocessing.connection.wait(sentinels, timeout=interval):
                if not self._closed.is_set():
                    self._fail("a tensor-parallel worker exited")
                return
            if time.monotonic() - self._last_send >= interval and self._lock.acquire(blocking=False):
                try:
                    if not self._closed.is_set() and self._failure is None:
                        self.channel.send(OP_IDLE)
                        self._last_send = time.monotonic()
                except Exception as exc:  # noqa: BLE001
                    self._fail(f"a tensor-parallel keep-alive failed: {exc}")
                finally:
                    self._lock.release()

    def close(self) -> None:
        """Stop the workers and leave the group (idempotent)."""
        with self._fail_lock:
            if self._shut:
                return
            self._shut = True
            clean = self._failure is None
            self._closed.set()
        if clean and self._lock.acquire(timeout=self.timeout_s):
            try:
                self.channel.send(OP_STOP)
            except Exception:  # noqa: BLE001 - the workers are being stopped anyway
                clean = False
            finally:
                self._lock.release()
        self._stop_workers(graceful=clean)
        pg.destroy_group()
        atexit.unregister(self.close)

    def _stop_workers(self, graceful: bool) -> None:
        """Join the workers (within JOIN_TIMEOUT_S after a STOP), killing whichever is still alive."""
        deadline = time.monotonic() + (JOIN_TIMEOUT_S if graceful else 0.0)
        for process in self.workers:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(JOIN_TIMEOUT_S)
