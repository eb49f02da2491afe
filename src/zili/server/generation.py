"""A Generation: the engine requests behind one HTTP request, as per-choice deltas.

There is one engine request per prompt (the legacy endpoint takes a batch), each carrying n
choices. The engine already reports what each choice gained in a step (`RequestDelta`); a
Generation numbers the choices across prompts, counts usage, and feeds the latency metrics.
Requests are validated by the engine (`AsyncEngine.add_request` -> `Engine.prepare`); its errors
name their field as data, which `param_names` maps to the request's own parameter names.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zili.engine.async_engine import EngineStepError, EngineUnavailableError, QueueFullError, RequestStream
from zili.engine.request import CompletionDelta, RequestDelta, TokenLogprob
from zili.sampling import InvalidRequestError, PoolingParams, SamplingParams, SamplingParamsError
from zili.server import protocol as p
from zili.server.errors import APIError, bad_request

if TYPE_CHECKING:
    from zili.server.hooks import RequestStatus
    from zili.server.state import ServerState


@dataclass
class ChoiceDelta:
    """What one choice gained from one engine output."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class Generation:
    """The engine requests behind one HTTP request: one per prompt, n choices each."""

    state: ServerState
    request_id: str
    prompts: list[list[int]]
    params: SamplingParams
    # engine field -> this request's parameter, for errors (e.g. "prompt" -> "messages")
    param_names: dict[str, str] = field(default_factory=dict)
    streams: list[RequestStream] = field(default_factory=list)
    completion_tokens: int = 0
    pooling: PoolingParams | None = None  # an embedding request: each prompt's pooled vector, nothing sampled
    # Per prompt index, from the engine's first delta of that prompt: its prompt logprobs (when
    # params.prompt_logprobs is set; the first is None) and a pooling request's vector.
    prompt_logprobs: dict[int, list[TokenLogprob | None]] = field(default_factory=dict)
    embeddings: dict[int, Any] = field(default_factory=dict)  # [hidden] float32 tensors
    _cached: dict[int, int] = field(default_factory=dict)  # prompt index -> prompt tokens from the prefix cache
    _finished: set[int] = field(default_factory=set)  # choice indices that have ended
    _started: float = field(default_factory=time.perf_counter)
    _last_token_at: float | None = None

    @property
    def n(self) -> int:
        return self.params.n

    @property
    def num_choices(self) -> int:
        return self.n * len(self.prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompts)

    def engine_request_id(self, i: int) -> str:
        return self.request_id if len(self.prompts) == 1 else f"{self.request_id}-{i}"

    async def start(self) -> None:
        """Hand every prompt to the engine; maps refusals to API errors (nothing left running)."""
        hooks = self.state.request_hooks
        if hooks is not None:
            await hooks.admit(self)  # governance: quotas, pause, content policy (raises APIError)
        adds = [self.state.engine.add_request(self.engine_request_id(i), ids, self.pooling or self.params)
                for i, ids in enumerate(self.prompts)]
        try:
            results = await asyncio.gather(*adds, return_exceptions=True)
        except BaseException:
            if hooks is not None:
                hooks.finished(self, "aborted")
            raise
        self.streams = [r for r in results if isinstance(r, RequestStream)]
        error = next((r for r in results if isinstance(r, BaseException)), None)
        if error is None:
            return
        self.close()
        if hooks is not None:
            hooks.finished(self, "rejected")
        if isinstance(error, QueueFullError):
            self.state.metrics.rejected.labels(reason="queue_full").inc()
            raise APIError(429, f"The server is busy: {error}. Retry later.", code="queue_full",
                           headers={"Retry-After": str(self.state.settings.retry_after)})
        if isinstance(error, EngineUnavailableError):
            raise APIError(503, str(error).capitalize(), code="unavailable", headers={"Retry-After": "5"})
        if isinstance(error, InvalidRequestError):
            raise self.request_error(error) from error
        raise error

    def request_error(self, error: InvalidRequestError) -> APIError:
        """The 400 for an engine refusal, naming this request's parameter (`param_names`)."""
        param = self.param_names.get(error.field, error.field)
        if error.field == "structured":
            message = f"{param}: {error.reason}"
        elif isinstance(error, SamplingParamsError):
            message = f"{param} {error.reason}"
        else:
            message = error.reason
        return bad_request(message, param=param, code=error.code)

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

    async def deltas(self) -> AsyncIterator[list[ChoiceDelta]]:
        """Per engine step, what each touched choice gained; ends when all have finished."""
        hooks = self.state.request_hooks
        status: RequestStatus = "aborted"
        try:
            async for prompt_index, output in _merge(self.streams):
                self._cached[prompt_index] = output.num_cached_tokens
                if output.prompt_logprobs is not None:
                    self.prompt_logprobs[prompt_index] = output.prompt_logprobs
                if output.embedding is not None:
                    self.embeddings[prompt_index] = output.embedding
                deltas = [d for d in (self._choice(prompt_index, c) for c in output.outputs) if d is not None]
                if hooks is not None:
                    deltas = hooks.on_deltas(self, deltas)
                self._observe(deltas)
                if deltas:
                    yield deltas
                if not self.unfinished_choices():  # all ended, perhaps early by stop()
                    break
            status = "ok"
        except EngineStepError:
            status = "error"
            raise
        finally:
            self.close()
            if hooks is not None:
                hooks.finished(self, status)

    def stop(self, finish_reason: str) -> list[ChoiceDelta]:
        """End every unfinished choice now with `finish_reason` (e.g. "content_filter"): aborts the
        engine requests and returns the closing delta of each such choice."""
        ends = []
        for index in self.unfinished_choices():
            self._finished.add(index)
            ends.append(ChoiceDelta(index, "", [], None, finish_reason))
        self.close()
        return ends

    def _choice(self, prompt_index: int, out: CompletionDelta) -> ChoiceDelta | None:
        """The engine's delta for one sequence as a delta of choice `prompt_index * n + out.index`."""
        index = prompt_index * self.n + out.index
        if index in self._finished:
            return None
        if out.finish_reason is not None:
            self._finished.add(index)
        if not (out.text or out.token_ids or out.finish_reason is not None):
            return None
        self.completion_tokens += len(out.token_ids)
        return ChoiceDelta(index, out.text, out.token_ids, out.logprobs, out.finish_reason, out.stop_reason)

    def _observe(self, deltas: list[ChoiceDelta]) -> None:
        metrics, now = self.state.metrics, time.perf_counter()
        if any(d.token_ids for d in deltas):
            if self._last_token_at is None:
                metrics.ttft.observe(now - self._started)
            else:
                metrics.itl.observe(now - self._last_token_at)
            self._last_token_at = now
        for d in deltas:
            if d.finish_reason is not None:
                metrics.finished.labels(finish_reason=d.finish_reason).inc()
        if any(d.finish_reason is not None for d in deltas) and len(self._finished) == self.num_choices:
            metrics.e2e.observe(now - self._started)

    def unfinished_choices(self) -> list[int]:
        return [i for i in range(self.num_choices) if i not in self._finished]

    def usage(self) -> p.Usage:
        return p.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                       total_tokens=self.prompt_tokens + self.completion_tokens,
                       prompt_tokens_details=p.PromptTokensDetails(cached_tokens=sum(self._cached.values())))


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestDelta]]:
    """Outputs of several streams as (stream index, output), in arrival order."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestDelta | Exception | None]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((i, output))
            queue.put_nowait((i, None))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
