"""Engine replicas on Ray: N engines as Ray actors behind one OpenAI API, least-loaded routing.

    server process (FastAPI)                Ray cluster (local, or joined with --ray-address)
    ReplicaPool ──── least loaded ────────▶ EngineReplica actor 0: AsyncEngine(Engine)  [tp ranks]
        │                                  EngineReplica actor 1: AsyncEngine(Engine)  [tp ranks]
        └─ tokenizer + model config             ...
           (read from the checkpoint, no weights)

`ReplicaPool` offers what the server uses of an `AsyncEngine` (add_request -> RequestStream,
abort, stats, health), so `zili serve --replicas N` changes nothing above it. Each request goes to
the replica with the fewest requests in flight from this pool (ties: the one given fewest so far);
its outputs come back as a Ray streaming generator, one RequestDelta per engine step. A client
that goes away cancels the generator, which aborts the request inside the replica.

If a replica dies (its actor process ends), the pool fails the requests in flight, reports the
engine dead (health 503) and tells the server, which exits non-zero, as with a single engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from zili.config import EngineConfig
from zili.engine.async_engine import (
    _ABORTED,
    _ACCEPTED,
    EngineStepError,
    EngineUnavailableError,
    QueueFullError,
    RequestStream,
    ServingLifecycle,
)

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.5  # how often the pool polls the replicas' stats (metrics, health)


class EngineReplica:
    """One engine in a Ray actor (wrapped with `ray.remote` by the pool). Async: many requests at once."""

    def __init__(self, config: EngineConfig) -> None:
        from zili.engine.async_engine import AsyncEngine
        from zili.engine.builder import build_engine

        self.config = config
        self.engine = AsyncEngine(lambda: build_engine(config))
        self.engine.on_fatal = self._engine_died

    @staticmethod
    def _engine_died(exc: BaseException) -> None:
        # A dead engine (e.g. a lost tensor-parallel rank) ends the actor, so that the router sees
        # the replica die and reports it, instead of routing requests to an engine that fails them.
        logger.error("the replica's engine failed: %s", exc)
        os._exit(1)

    async def start(self) -> dict[str, Any]:
        """Load the model; returns facts the router needs."""
        self.engine.start(asyncio.get_running_loop())
        loop = asyncio.get_running_loop()
        while not await loop.run_in_executor(None, self.engine.wait_ready, 0.5):
            if self.engine.load_error is not None:
                raise self.engine.load_error
        return {"pid": os.getpid(), "max_model_len": self.engine.engine.max_model_len}

    async def generate(self, request_id: str, prompt: str | list[int], params):
        """Yields None once the engine accepted the request, then its RequestDeltas (one per step)."""
        stream = await self.engine.add_request(request_id, prompt, params)
        try:
            yield None
            async for output in stream:
                yield output
        finally:
            stream.close()  # cancelled by the router (client gone): abort it here

    async def stats(self):
        return self.engine.stats()

    async def shutdown(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown)


@dataclass
class _Replica:
    index: int
    actor: Any
    in_flight: int = 0
    assigned: int = 0  # requests routed here so far
    stats: Any = None


class _ModelFacts:
    """What routes read from `AsyncEngine.engine`, without the weights: tokenizer, config, limits."""

    def __init__(self, tokenizer, model_config, max_model_len: int) -> None:
        self.tokenizer, self.model_config, self.max_model_len = tokenizer, model_config, max_model_len


class ReplicaPool(ServingLifecycle):
    """N EngineReplica actors behind the AsyncEngine interface the server uses."""

    def __init__(self, config: EngineConfig, replicas: int, ray_address: str | None = None,
                 max_queue: int | None = None, replica_cpus: float | None = None,
                 replica_gpus: float | None = None) -> None:
        """Each replica asks Ray for `replica_cpus` CPUs (default: one per tensor-parallel rank) and
        `replica_gpus` GPUs (default: one per rank when this machine has an accelerator, else none)."""
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {replicas}")
        self.config, self.num_replicas, self.ray_address = config, replicas, ray_address
        self.max_queue = max_queue
        tp = config.tensor_parallel_size
        self.replica_cpus = replica_cpus if replica_cpus is not None else tp
        if replica_gpus is None:
            import torch

            replica_gpus = tp if torch.accelerator.is_available() else 0
        self.replica_gpus = replica_gpus
        self.replicas: list[_Replica] = []
        self._facts: _ModelFacts | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._init_lifecycle()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shutdown_timeout: float | None = 10.0
        self._started_ray = False
        self._tasks: dict[str, tuple[asyncio.Task, Any, _Replica]] = {}  # request id -> pump, generator, replica
        self._poller: asyncio.Task | None = None
        self._name = f"zili-{uuid.uuid4().hex[:8]}"

    # ---- lifecycle (AsyncEngine's) -------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Connect to Ray (or start a local instance) and load every replica, on the pool's thread."""
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._own_ray, name="zili-replicas", daemon=True)
        self._thread.start()

    def _own_ray(self) -> None:
        """The thread that starts Ray lives until shutdown: Ray ties the life of the processes it
        starts (GCS, raylet) to the thread that started them."""
        try:
            self._launch()
        except BaseException as exc:  # noqa: BLE001 - reported through /health and on_fatal
            logger.exception("starting the engine replicas failed")
            self.load_error = self.dead_error = _unwrap(exc)
            self._call_fatal(self.dead_error)
        else:
            self._ready.set()
            assert self._loop is not None  # start() set it before this thread began
            asyncio.run_coroutine_threadsafe(self._start_poller(), self._loop)
        self._stop.wait()
        self._teardown()

    def _launch(self) -> None:
        import ray

        from zili.models.loader import open_checkpoint, resolve_model

        if not ray.is_initialized():
            # With no address, a new local instance (never a stale one found on disk); stopped at shutdown.
            ray.init(address=self.ray_address or "local", namespace="zili", include_dashboard=False,
                     configure_logging=False, log_to_driver=True)
            # Ours to end: a local instance is stopped, a cluster we joined is only disconnected from
            # (left connected, Ray's own exit hooks race the interpreter's teardown: SIGABRT seen in CI).
            self._started_ray = True
        actor_class = ray.remote(EngineReplica)
        for i in range(self.num_replicas):
            actor = actor_class.options(name=f"{self._name}-replica-{i}", num_cpus=self.replica_cpus,
                                        num_gpus=self.replica_gpus, max_concurrency=1000).remote(self.config)
            self.replicas.append(_Replica(i, actor))
        infos = ray.get([r.actor.start.remote() for r in self.replicas])
        checkpoint = open_checkpoint(resolve_model(self.config.model))
        self._facts = _ModelFacts(checkpoint.tokenizer(), checkpoint.config(), infos[0]["max_model_len"])
        logger.info("%d engine replicas ready on Ray (actor pids %s)", self.num_replicas,
                    [info["pid"] for info in infos])

    async def _start_poller(self) -> None:
        self._poller = asyncio.create_task(self._poll_stats())

    @property
    def engine(self) -> _ModelFacts:
        if self._facts is None:
            raise EngineUnavailableError("the model is still loading")
        return self._facts

    def abort_all(self) -> None:
        for request_id in list(self._tasks):
            self.abort(request_id)

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop every replica (requests still in flight end as aborted) and a Ray we started."""
        self._accepting = False
        if self._poller is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._poller.cancel)
        self._shutdown_timeout = timeout
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(None if timeout is None else timeout + 10)

    def _teardown(self) -> None:
        try:
            import ray

            if not ray.is_initialized():
                return
            try:
                ray.get([r.actor.shutdown.remote() for r in self.replicas], timeout=self._shutdown_timeout)
            except Exception:  # noqa: BLE001 - killed below either way
                pass
            for replica in self.replicas:
                ray.kill(replica.actor)
            if self._started_ray:
                ray.shutdown()
        except Exception:  # noqa: BLE001 - best effort on the way out
            logger.exception("stopping the replicas failed")

    # ---- requests --------------------------------------------------------------------------------
    def replica_loads(self) -> list[dict[str, int]]:
        """Per replica: requests in flight now and routed so far."""
        return [{"replica": r.index, "in_flight": r.in_flight, "assigned": r.assigned} for r in self.replicas]

    def stats(self):
        """The replicas' latest stats summed (KV usage over the pooled blocks)."""
        from zili.engine.engine import EngineStats

        parts = [r.stats for r in self.replicas if r.stats is not None]
        if not parts:
            return None
        total = sum(s.num_total_blocks for s in parts)
        free = sum(s.num_free_blocks for s in parts)
        summed = {f: sum(getattr(s, f) for s in parts) for f in ("num_running", "num_waiting", "prompt_tokens_total",
                                                                  "generation_tokens_total", "num_preemptions",
                                                                  "spec_decode_num_drafts",
                                                                  "spec_decode_num_draft_tokens",
                                                                  "spec_decode_num_accepted_tokens")}
        return EngineStats(kv_cache_usage=1 - free / total if total else 0.0, num_free_blocks=free,
                           num_total_blocks=total,
                           prefix_cache_hit_rate=sum(s.prefix_cache_hit_rate for s in parts) / len(parts), **summed)

    def num_waiting(self) -> int:
        stats = self.stats()
        return stats.num_waiting if stats is not None else 0

    async def add_request(self, request_id: str, prompt: str | list[int], params) -> RequestStream:
        """Route to the least-loaded replica; returns the stream once that replica accepted it."""
        self._check_admission()
        if self.max_queue is not None and self.num_waiting() >= self.max_queue:
            raise QueueFullError(f"{self.max_queue} requests are already waiting")
        replica = min(self.replicas, key=lambda r: (r.in_flight, r.assigned))
        replica.in_flight += 1
        replica.assigned += 1
        generator = replica.actor.generate.options(num_returns="streaming").remote(request_id, prompt, params)
        try:
            await (await generator.__anext__())  # the replica's "accepted" (or its refusal, raised here)
        except BaseException as exc:
            replica.in_flight -= 1
            _cancel(generator)
            raise _unwrap(exc) from None
        stream = RequestStream(request_id, self)
        stream._push(_ACCEPTED)
        task = asyncio.create_task(self._pump(request_id, generator, stream, replica))
        self._tasks[request_id] = (task, generator, replica)
        return stream

    async def _pump(self, request_id: str, generator, stream: RequestStream, replica: _Replica) -> None:
        try:
            async for ref in generator:
                output = await ref
                stream._push(output)
                if output.finished:
                    break  # done: no longer counts as load on this replica
        except asyncio.CancelledError:
            stream._push(_ABORTED)
        except BaseException as exc:  # noqa: BLE001 - goes to the client of this request
            cause = _unwrap(exc)
            stream._push(cause if isinstance(cause, Exception) else EngineStepError(str(cause)))
            if _is_actor_death(exc):
                self._die(cause)
        finally:
            replica.in_flight -= 1
            self._tasks.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Cancel the request (idempotent); the replica aborts it in its engine."""
        entry = self._tasks.get(request_id)
        if entry is None:
            return
        task, generator, _ = entry
        _cancel(generator)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(task.cancel)

    # ---- health --------------------------------------------------------------------------------------
    async def _poll_stats(self) -> None:
        while True:
            for replica in self.replicas:
                try:
                    replica.stats = await replica.actor.stats.remote()
                except Exception as exc:  # noqa: BLE001
                    if _is_actor_death(exc):
                        self._die(_unwrap(exc))
                        return
                    logger.warning("replica %d stats: %s", replica.index, exc)
            await asyncio.sleep(STATS_INTERVAL_S)

    def _die(self, exc: BaseException) -> None:
        if self.dead_error is not None:
            return
        logger.error("an engine replica died: %s", exc)
        self.dead_error = exc
        self._accepting = False
        self.abort_all()
        self._call_fatal(exc)

    def _call_fatal(self, exc: BaseException) -> None:
        if self.on_fatal is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self.on_fatal, exc)
            except RuntimeError:
                pass


def _cancel(generator) -> None:
    import ray

    try:
        ray.cancel(generator)
    except Exception:  # noqa: BLE001 - already finished
        pass


def _unwrap(exc: BaseException) -> BaseException:
    """The replica's own exception (ValueError, QueueFullError...) rather than Ray's wrapper."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _is_actor_death(exc: BaseException) -> bool:
    import ray

    return isinstance(exc, ray.exceptions.RayActorError)
