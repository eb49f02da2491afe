"""AsyncEngine: the synchronous Engine driven by one background thread, used from asyncio.

The Engine is not thread-safe, so exactly one thread (the loop thread) ever touches it: it builds
the engine, then runs `step()` for as long as there is work and sleeps on a Condition when there
is none. Coroutines hand it requests and aborts through a lock-protected inbox; each request gets
its outputs back on its own asyncio.Queue, fed with `loop.call_soon_threadsafe` (one call per
step for all requests). Aborts are applied before the next step, so a cancelled request stops
using compute and gives back its KV blocks within one step.

Requests are validated before they are queued: `add_request` runs `Engine.prepare` (thread-safe;
a grammar compile goes to this AsyncEngine's own worker thread so neither the event loop nor the
engine loop waits for it) and raises its InvalidRequestError to the caller. The streams carry the
engine's deltas (`RequestDelta`) as they are: nothing is accumulated or diffed here.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from zili.config import ModelConfig
from zili.engine.engine import Engine, EngineStats
from zili.engine.input_processor import PreparedRequest
from zili.engine.request import RequestDelta
from zili.sampling import PoolingParams, SamplingParams

logger = logging.getLogger(__name__)


class EngineUnavailableError(RuntimeError):
    """The engine cannot take requests now: still loading, draining, stopped, or dead."""


class QueueFullError(RuntimeError):
    """Too many requests are already waiting; the caller should retry later."""


class RequestAbortedError(RuntimeError):
    """The request was aborted by the server (shutdown drain), not by its own client."""


class EngineStepError(RuntimeError):
    """Engine.step() raised; every request in flight at that moment was failed."""


_ACCEPTED = object()  # first item of a stream: the engine took the request
_ABORTED = object()  # last item of a stream aborted by the server


@dataclass
class _Add:
    request_id: str
    prepared: PreparedRequest
    stream: RequestStream


class RequestStream:
    """The outputs of one request, in order: `async for output in stream`.

    Each output is one engine step's RequestDelta (what is new); iteration ends after the one with
    `finished` set. `close()` aborts the request if it has not finished (safe to call twice), so
    wrap consumption in `try/finally: stream.close()` or `async with stream`.
    """

    def __init__(self, request_id: str, owner: ServingEngine) -> None:
        self.request_id = request_id
        self.finished = False
        self._owner = owner
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def _push(self, item: Any) -> None:  # on the event loop
        if item is _ACCEPTED:
            if not self._accepted.done():
                self._accepted.set_result(None)
        elif isinstance(item, BaseException) and not self._accepted.done():
            self._accepted.set_exception(item)
        else:
            self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestDelta:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _ABORTED:
            self.finished = True
            raise RequestAbortedError(f"request {self.request_id} was aborted by the server")
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._owner.abort(self.request_id)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class ServingLifecycle:
    """Readiness, draining and death of an engine front (the in-process AsyncEngine and the Ray
    ReplicaPool share it): the server asks these, and every new request passes `_check_admission`."""

    def _init_lifecycle(self) -> None:
        self._ready = threading.Event()
        self._accepting = True
        self.load_error: BaseException | None = None
        self.dead_error: BaseException | None = None
        self.on_fatal: Callable[[BaseException], None] | None = None

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.dead_error is None

    def stop_accepting(self) -> None:
        """Start draining: new requests are refused; running ones go on."""
        self._accepting = False

    def _check_admission(self) -> None:
        """EngineUnavailableError unless a new request may be taken now."""
        if self.dead_error is not None:
            raise EngineUnavailableError(f"the engine has stopped: {self.dead_error}")
        if not self._ready.is_set():
            raise EngineUnavailableError("the model is still loading")
        if not self._accepting:
            raise EngineUnavailableError("the server is shutting down")


class ModelFacts(Protocol):
    """The read-only facts routes take from `ServingEngine.engine`: the Engine itself, or the Ray
    pool's copy of them (no weights)."""

    @property
    def tokenizer(self) -> Any: ...

    @property
    def model_config(self) -> ModelConfig: ...

    @property
    def max_model_len(self) -> int: ...


class ServingEngine(Protocol):
    """What the server needs of an engine front: AsyncEngine (one engine in this process) or
    zili.distributed.replicas.ReplicaPool (engine replicas on Ray). Both share ServingLifecycle."""

    load_error: BaseException | None
    dead_error: BaseException | None
    on_fatal: Callable[[BaseException], None] | None

    @property
    def ready(self) -> bool: ...

    @property
    def engine(self) -> ModelFacts: ...  # EngineUnavailableError while loading

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None: ...

    def stop_accepting(self) -> None: ...

    def shutdown(self, timeout: float | None = 10.0) -> None: ...

    def stats(self) -> EngineStats | None: ...

    async def add_request(self, request_id: str, prompt: str | list[int],
                          params: SamplingParams | PoolingParams) -> RequestStream: ...

    def abort(self, request_id: str) -> None: ...

    def abort_all(self) -> None: ...


class AsyncEngine(ServingLifecycle):
    """Owns an Engine on a background thread; safe to use from one asyncio event loop."""

    def __init__(self, engine_factory: Callable[[], Engine], *, max_queue: int | None = None) -> None:
        self.max_queue = max_queue
        self._factory = engine_factory
        self._engine: Engine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        # Inbox, guarded by _cond.
        self._adds: list[_Add] = []
        self._aborts: set[str] = set()
        self._abort_all = False
        self._stop = False
        self._adds_not_in_stats = 0  # taken from the inbox but not yet counted by _stats
        # Owned by the loop thread.
        self._streams: dict[str, RequestStream] = {}
        # Published by the loop thread (reference swaps only).
        self._stats: EngineStats | None = None
        self._prepare_pool = ThreadPoolExecutor(1, thread_name_prefix="zili-prepare")  # grammar compiles
        self._init_lifecycle()

    # ----- lifecycle -----

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the loop thread; it loads the engine first. Call from the event loop (or pass it)."""
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="zili-engine-loop", daemon=True)
        self._thread.start()

    @property
    def engine(self) -> Engine:
        """The engine, for read-only facts (tokenizer, model_config, max_model_len)."""
        if self._engine is None:
            raise EngineUnavailableError("the model is still loading")
        return self._engine

    def abort_all(self) -> None:
        """Abort every request the engine holds (end of a drain)."""
        with self._cond:
            self._abort_all = True
            self._cond.notify()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the loop thread; requests still in flight end as aborted."""
        self._accepting = False
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    # ----- requests -----

    def stats(self) -> EngineStats | None:
        """The engine's stats as of the end of its last step (None until loaded)."""
        return self._stats

    def num_waiting(self) -> int:
        with self._cond:
            return self._num_waiting_locked()

    def _num_waiting_locked(self) -> int:
        waiting = self._stats.num_waiting if self._stats is not None else 0
        return waiting + len(self._adds) + self._adds_not_in_stats

    async def prepare(self, prompt: str | list[int], params: SamplingParams | PoolingParams) -> PreparedRequest:
        """Validate a request (Engine.prepare) without queueing it: InvalidRequestError naming the
        field when it can never run; EngineUnavailableError while loading."""
        engine = self.engine
        if getattr(params, "structured", None) is None:  # PoolingParams have no grammar
            return engine.prepare(prompt, params)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prepare_pool, engine.prepare, prompt, params)

    async def add_request(
        self, request_id: str, prompt: str | list[int] | PreparedRequest,
        params: SamplingParams | PoolingParams | None = None
    ) -> RequestStream:
        """Validate (unless `prompt` is already a PreparedRequest) and queue a request; returns its
        stream once the engine has accepted it.

        Raises EngineUnavailableError (loading / draining / dead), QueueFullError, or
        InvalidRequestError (a ValueError with `.field`) when the request can never run.
        """
        self._check_admission()
        prepared = prompt if isinstance(prompt, PreparedRequest) else await self.prepare(prompt,
                                                                                         params or SamplingParams())
        self._check_admission()  # it may have started draining while a grammar compiled
        stream = RequestStream(request_id, self)
        with self._cond:
            if self.max_queue is not None and self._num_waiting_locked() >= self.max_queue:
                raise QueueFullError(f"{self.max_queue} requests are already waiting")
            self._adds.append(_Add(request_id, prepared, stream))
            self._cond.notify()
        try:
            await stream._accepted
        except asyncio.CancelledError:
            stream.close()
            raise
        except BaseException:
            stream.finished = True
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (idempotent); it is dropped before the engine's next step."""
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify()

    # ----- the loop thread -----

    def _run(self) -> None:
        try:
            engine = self._factory()
        except BaseException as exc:  # noqa: BLE001 - reported through /health and on_fatal
            if isinstance(exc, ValueError):  # a configuration problem: its message says it all
                logger.error("loading the engine failed: %s", exc)
            else:
                logger.exception("loading the engine failed")
            self.load_error = self.dead_error = exc
            self._fatal(exc)
            return
        self._engine = engine
        self._stats = engine.stats()
        self._ready.set()
        try:
            while self._run_once(engine):
                pass
        except BaseException as exc:  # noqa: BLE001 - a bug here must not hang every client
            logger.exception("the engine loop failed")
            self.dead_error = exc
            self._fail_all(EngineStepError(f"the engine loop failed: {exc}"))
            self._fatal(exc)
            return
        self._fail_all(_ABORTED)

    def _run_once(self, engine: Engine) -> bool:
        with self._cond:
            while not (self._stop or self._adds or self._aborts or self._abort_all
                       or engine.has_unfinished_requests()):
                self._cond.wait()
            if self._stop:
                return False
            adds, self._adds = self._adds, []
            aborts, self._aborts = self._aborts, set()
            abort_all, self._abort_all = self._abort_all, False
            self._adds_not_in_stats = len(adds)

        deliveries: list[tuple[RequestStream, Any]] = []
        for add in adds:  # adds before aborts: an abort may name a request added in this batch
            try:
                engine.add_request(add.request_id, add.prepared)
            except Exception as exc:  # noqa: BLE001 - goes back to the caller (usually ValueError)
                deliveries.append((add.stream, exc))
                continue
            self._streams[add.request_id] = add.stream
            deliveries.append((add.stream, _ACCEPTED))
        if abort_all:
            aborts |= set(self._streams)
        for request_id in aborts:
            engine.abort_request(request_id)
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                deliveries.append((stream, _ABORTED))

        if engine.has_unfinished_requests():
            try:
                outputs = engine.step()
            except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
                logger.exception("Engine.step() failed; failing %d request(s)", len(self._streams))
                error = EngineStepError(f"the engine failed while running this request: {exc}")
                for request_id, stream in self._streams.items():
                    engine.abort_request(request_id)
                    deliveries.append((stream, error))
                self._streams.clear()
                outputs = []
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is None:
                    continue
                if output.finished:
                    del self._streams[output.request_id]
                deliveries.append((stream, output))

        stats = engine.stats()
        with self._cond:
            self._stats = stats
            self._adds_not_in_stats = 0
        self._deliver(deliveries)
        return True

    def _fail_all(self, item: Any) -> None:
        """End every stream still open (and every queued add) with `item`."""
        with self._cond:
            adds, self._adds = self._adds, []
        deliveries = [(stream, item) for stream in self._streams.values()]
        deliveries += [(add.stream, EngineUnavailableError("the engine has stopped")) for add in adds]
        self._streams.clear()
        if self._engine is not None:
            for stream, _ in deliveries:
                try:
                    self._engine.abort_request(stream.request_id)
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass
        self._deliver(deliveries)

    def _deliver(self, deliveries: list[tuple[RequestStream, Any]]) -> None:
        if not deliveries or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(_push_all, deliveries)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _fatal(self, exc: BaseException) -> None:
        if self.on_fatal is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self.on_fatal, exc)
            except RuntimeError:
                pass


def _push_all(deliveries: list[tuple[RequestStream, Any]]) -> None:
    for stream, item in deliveries:
        stream._push(item)
