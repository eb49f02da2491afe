"""Answering a request: one JSON body, or server-sent events ending in `data: [DONE]`.

A client that goes away aborts its engine requests: a streaming response is cancelled by
Starlette when the connection drops; a non-streaming one is raced against the disconnect here.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from zili.engine.async_engine import EngineStepError, RequestAbortedError
from zili.server.errors import APIError, error_body
from zili.server.formats import ChatFormat, Format
from zili.server.generation import Generation

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


async def respond(request: Request, gen: Generation, fmt: Format, *, stream: bool, include_usage: bool,
                  model: str) -> Response:
    """Start the generation, then answer with SSE or with one JSON body."""
    await gen.start()
    if stream:
        obj = "chat.completion.chunk" if isinstance(fmt, ChatFormat) else "text_completion"
        base = {"id": gen.request_id, "object": obj, "created": int(time.time()), "model": model}
        return StreamingResponse(_sse(gen, fmt, base, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        await until_disconnect(request, _collect(gen, fmt))
    except ClientDisconnected:
        return Response(status_code=499)
    except RequestAbortedError as exc:
        raise APIError(503, f"The request was aborted: {exc} (the server is shutting down).",
                       code="aborted") from exc
    except EngineStepError as exc:
        raise APIError(500, str(exc), type="internal_error", code="engine_error") from exc
    return JSONResponse(fmt.response(model).model_dump(mode="json"))


async def _collect(gen: Generation, fmt: Format) -> None:
    async for deltas in gen.deltas():
        for delta in deltas:
            fmt.add(delta)


def _sse_event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _sse(gen: Generation, fmt: Format, base: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    usage_field = {"usage": None} if include_usage else {}
    try:
        for chunk in fmt.first_chunks(base):
            yield _sse_event({**chunk, **usage_field})
        try:
            async for deltas in gen.deltas():
                choices = [fmt.chunk_choice(d) for d in deltas]
                yield _sse_event({**base, "choices": choices, **usage_field})
        except RequestAbortedError:
            ends = [fmt.end_choice(i, "abort") for i in gen.unfinished_choices()]
            yield _sse_event({**base, "choices": ends, **usage_field})
        except EngineStepError as exc:
            yield _sse_event(error_body(str(exc), "internal_error", code="engine_error"))
            yield "data: [DONE]\n\n"
            return
        if include_usage:
            yield _sse_event({**base, "choices": [], "usage": fmt.usage().model_dump(mode="json")})
        yield "data: [DONE]\n\n"
    finally:
        gen.close()


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it (which aborts its engine requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if task.cancelled() or not task.done():
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected()
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
