"""The FastAPI application: settings, shared state, middleware, lifespan."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import zili
from zili.engine.async_engine import AsyncEngine, EngineUnavailableError
from zili.reasoning import DEFAULT_REASONING_BUDGETS
from zili.server.errors import APIError, error_body, install_error_handlers, quote
from zili.server.metrics import ServerMetrics
from zili.server.request_id import RequestIdMiddleware
from zili.server.tokenizer_info import router as tokenizer_info_router
from zili.server.web_ui import mount_web_ui

if TYPE_CHECKING:
    from zili.governance.service import Governance
    from zili.server.hooks import RequestHooks

logger = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    served_model_name: str
    api_keys: list[str] = field(default_factory=list)
    max_tokens_cap: int | None = None  # largest max_tokens a request may ask for
    max_n: int = 128  # most choices per prompt (the launcher lowers it to max_num_seqs)
    max_body_bytes: int = 4 * 1024 * 1024
    shutdown_timeout: float = 30.0
    retry_after: int = 1  # seconds, sent with 429
    web_ui: bool = True  # the web console at / (zili.server.web_ui); --no-web-ui turns it off
    reasoning_parser: str = "auto"  # zili.reasoning: auto, deepseek-r1, qwen3 or none
    reasoning_budgets: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_REASONING_BUDGETS))


class ServerState:
    """What every route needs: settings, the engine, metrics, and facts about the model."""

    def __init__(self, settings: ServerSettings, engine: AsyncEngine) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = ServerMetrics(engine, settings.served_model_name)
        self.created = int(time.time())
        self.draining = False
        self._drain_timer: asyncio.TimerHandle | None = None
        self.governance: Governance | None = None  # keys, quotas, ledger (zili.governance), when in use
        self.request_hooks: RequestHooks | None = None
        self.token_str = lru_cache(maxsize=1 << 17)(self._token_str)

    @property
    def tokenizer(self) -> Any:
        return self.ready_engine().tokenizer

    @property
    def max_model_len(self) -> int:
        return self.ready_engine().max_model_len

    @property
    def vocab_size(self) -> int:
        return self.ready_engine().model_config.vocab_size

    def ready_engine(self) -> Any:
        """The engine, or a 503 while it loads (or after it died)."""
        if self.engine.dead_error is not None:
            raise APIError(503, f"The engine is not running: {self.engine.dead_error}", code="engine_dead")
        try:
            return self.engine.engine
        except EngineUnavailableError:
            raise APIError(503, "The model is still loading; retry shortly.", code="loading",
                           headers={"Retry-After": "5"}) from None

    def check_model(self, name: str | None) -> str:
        served = self.settings.served_model_name
        if name is not None and name != served:
            raise APIError(404, f"The model {quote(name)} does not exist. This server serves {quote(served)}.",
                           param="model", code="model_not_found")
        return served

    def _token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def begin_drain(self, timeout: float) -> None:
        """Refuse new requests; abort whatever is still running after `timeout` seconds."""
        if self.draining:
            return
        self.draining = True
        self.engine.stop_accepting()
        logger.info("draining: finishing running requests for up to %.1f s", timeout)
        self._drain_timer = asyncio.get_running_loop().call_later(timeout, self._drain_deadline)

    def cancel_drain_timer(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()

    def _drain_deadline(self) -> None:
        logger.warning("shutdown timeout reached: aborting the requests still running")
        self.engine.abort_all()


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
        from fastapi.responses import JSONResponse

        if status == 413:
            body = error_body(f"The request body is larger than this server's limit of {self.max_bytes} bytes.",
                              "invalid_request_error", code="request_too_large")
        else:
            body = error_body("Invalid Content-Length header.", "invalid_request_error")
        response = JSONResponse(body, status_code=status, headers={"Connection": "close"})
        await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def build_app(settings: ServerSettings, engine: AsyncEngine, governance: Governance | None = None) -> FastAPI:
    """The app for `engine` (not started yet: the lifespan starts it on the server's loop)."""
    from zili.server.anthropic import router as anthropic_router
    from zili.server.routes import router

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
        from zili.governance.admin import admin_router

        app.include_router(admin_router)
    if settings.web_ui:
        mount_web_ui(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)  # outermost: the 413s above get an id too
    return app
