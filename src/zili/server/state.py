"""ServerSettings and ServerState: what every route needs (settings, the engine, metrics, facts
about the model), built once by `zili.server.app.build_app`."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from zili.engine.async_engine import EngineUnavailableError, ServingEngine
from zili.reasoning import DEFAULT_REASONING_BUDGETS
from zili.server.errors import APIError, quote
from zili.server.metrics import ServerMetrics

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
    pooling: str = "mean"  # /v1/embeddings: how hidden states are pooled (zili.sampling.PoolingParams)


class ServerState:
    """What every route needs: settings, the engine, metrics, and facts about the model."""

    def __init__(self, settings: ServerSettings, engine: ServingEngine) -> None:
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
