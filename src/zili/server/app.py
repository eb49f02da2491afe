"""The FastAPI application: routes, middleware, lifespan (the shared state is zili.server.state)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import zili
from zili.engine.async_engine import ServingEngine
from zili.governance.admin import admin_router
from zili.server.anthropic import error_response as anthropic_error_response
from zili.server.anthropic import router as anthropic_router
from zili.server.errors import error_body, install_error_handlers
from zili.server.request_id import RequestIdMiddleware
from zili.server.routes import router
from zili.server.state import ServerSettings, ServerState
from zili.server.tokenizer_info import router as tokenizer_info_router
from zili.server.web_ui import mount_web_ui

if TYPE_CHECKING:
    from zili.governance.service import Governance

__all__ = ["BodySizeLimit", "ServerSettings", "ServerState", "build_app"]

logger = logging.getLogger(__name__)


class BodySizeLimit:
    """413 for request bodies over `max_bytes`, whether Content-Length says so or the stream does."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._reject(scope, send, 413 if length.isdigit() else 400)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._reject(scope, send, 413)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, send: Send, status: int) -> None:
        message = (f"The request body is larger than this server's limit of {self.max_bytes} bytes." if status == 413
                   else "Invalid Content-Length header.")
        if scope.get("path") == "/v1/messages":  # Anthropic's clients read their own error shape (the fuzz found it)
            response = anthropic_error_response(status, message, headers={"Connection": "close"})
        else:
            body = error_body(message, "invalid_request_error", code="request_too_large" if status == 413 else None)
            response = JSONResponse(body, status_code=status, headers={"Connection": "close"})
        await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def build_app(settings: ServerSettings, engine: ServingEngine, governance: Governance | None = None) -> FastAPI:
    """The app for `engine` (not started yet: the lifespan starts it on the server's loop)."""
    state = ServerState(settings, engine)
    if governance is not None:
        governance.static_keys = settings.api_keys
        governance.register_metrics(state.metrics.registry)
        state.governance = state.request_hooks = governance

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        if governance is not None:
            await governance.start(engine)
        try:
            yield
        finally:
            state.cancel_drain_timer()
            await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
            if governance is not None:
                await governance.close()  # after the drain: every request's ledger row is written

    app = FastAPI(
        title="zili",
        version=zili.__version__,
        description="OpenAI-compatible LLM inference server. Extensions to the OpenAI request bodies: "
                    "top_k, min_p, repetition_penalty, ignore_eos, min_tokens, stop_token_ids.",
        lifespan=lifespan,
    )
    app.state.zili = state
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(tokenizer_info_router)
    app.include_router(anthropic_router)  # POST /v1/messages
    if governance is not None:
        app.include_router(admin_router)
    if settings.web_ui:
        mount_web_ui(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)  # outermost: the 413s above get an id too
    return app
