"""`zili serve`: run the OpenAI-compatible server on uvicorn, draining on SIGTERM.

Registered by zili.cli as `app.command("serve")(serve)`; also runnable as
`python -m zili.server.launcher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
import uvicorn
from sqlalchemy.exc import SQLAlchemyError

from zili import envs
from zili.cli_options import engine_options
from zili.engine.async_engine import AsyncEngine, ServingEngine
from zili.engine.compiled_decode import COMPILE_THREAD_NAME
from zili.governance.service import GovernanceConfig, build_governance
from zili.reasoning import parse_reasoning_budgets, resolve_reasoning_parser
from zili.sampling import POOLING_TYPES
from zili.server.app import build_app
from zili.server.state import ServerSettings, ServerState

logger = logging.getLogger("zili.server")

DEFAULT_MODEL = "smollm2-135m"


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM / SIGINT drain the engine, then exit normally (status 0).

    uvicorn already stops accepting connections and waits for in-flight requests; on top of that
    the first signal makes the engine refuse new requests and schedules an abort of whatever
    still runs after the shutdown timeout, so every response still ends cleanly.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.loop: asyncio.AbstractEventLoop | None = None
        self.exit_code = 0

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own version re-raises the signal after shutdown, which would kill the process
        # with SIGTERM's status instead of exiting 0 after a clean drain.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit and self.loop is not None:
            logger.info("received %s: draining", signal.Signals(sig).name)
            self.loop.call_soon_threadsafe(self.state.begin_drain, self.state.settings.shutdown_timeout)
        super().handle_exit(sig, frame)

    def engine_failed(self, exc: BaseException) -> None:
        logger.error("the engine failed: %s", exc)
        self.exit_code = 1
        self.should_exit = True


# The engine settings `zili serve` takes: every one of zili.cli_options.ENGINE_OPTIONS, with its defaults.
SERVE_ENGINE_OPTIONS = ("dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory",
                        "kv_cache_dtype", "quantization",
                        "threads", "attention_backend", "use_tune_cache", "calibrate", "enforce_eager", "load_format",
                        "reasoning_parser", "tensor_parallel_size", "speculative_config",
                        "speculative_model", "enable_jump_forward", "jump_forward_mode", "deterministic",
                        "structured_outputs_backend")


@engine_options(*SERVE_ENGINE_OPTIONS)
def serve(
    model: Annotated[str, typer.Argument(
        help="A .gguf file, an HF checkpoint directory, or an alias.")] = DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[list[str] | None, typer.Option(
        "--api-key", envvar="ZILI_API_KEY",
        help="Require 'Authorization: Bearer <key>' on /v1/*, /tokenize, /detokenize (repeatable).")] = None,
    api_key_file: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="File with one API key per line (# comments allowed).")] = None,
    max_queue: Annotated[int, typer.Option(min=1, help="Most requests waiting to run; past it, 429.")] = 256,
    max_tokens_cap: Annotated[int | None, typer.Option(
        min=1, help="Largest max_tokens a request may ask for (default: no cap but the context).")] = None,
    shutdown_timeout: Annotated[float, typer.Option(
        min=0, help="On SIGTERM, seconds running requests get to finish before they are aborted.")] = 30.0,
    served_model_name: Annotated[str | None, typer.Option(
        help="Model name clients use (default: MODEL as given).")] = None,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Largest request body accepted; past it, 413.")]
        = 4 * 1024 * 1024,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    replicas: Annotated[int, typer.Option(
        min=1, help="Run this many engine replicas as Ray actors behind this server (least-loaded routing).")] = 1,
    ray_address: Annotated[str | None, typer.Option(
        help="Join this Ray cluster for the replicas (e.g. HEAD_IP:6379); default: start a local Ray.")] = None,
    web_ui: Annotated[bool, typer.Option(
        "--web-ui/--no-web-ui", help="Serve the web console (chat, form extraction, usage) at /.")] = True,
    reasoning_budgets: Annotated[str | None, typer.Option(
        help="Thinking budgets (tokens) for reasoning_effort, e.g. low=1024,medium=4096,high=16384.")] = None,
    pooling: Annotated[str, typer.Option(
        help="/v1/embeddings: pool the final hidden states by mean, last or cls (first token), as llama.cpp's "
        "--pooling; vectors have unit L2 norm.")] = "mean",
    admin_key: Annotated[str | None, typer.Option(
        "--admin-key", envvar="ZILI_ADMIN_KEY", help="Turn on the admin API (/admin/v1: keys, usage, audit, "
        "pause) for this bearer key; also turns on database keys, quotas and the usage ledger.")] = None,
    database_url: Annotated[str | None, typer.Option(
        "--database-url", envvar="ZILI_DATABASE_URL", help="Keys, quotas, ledger and audit in this database: "
        "sqlite:///PATH or postgresql://USER@HOST/DB (default: zili.db in zili's data directory, used when it "
        "holds keys).")] = None,
    content_policy: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="A TOML file of regex / word-list rules checked on prompts (400) and "
        "streamed output (finish_reason content_filter).")] = None,
    log_content: Annotated[bool, typer.Option(
        "--log-content", help="Store request and response texts in the database (off by default).")] = False,
    log_retention_days: Annotated[float, typer.Option(
        min=0.01, help="With --log-content: delete stored texts older than this many days.")] = 30.0,
    prices: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="JSON price table ($ per 1M input / cached_input / output tokens, by "
        "model) for the ledger's cost column.")] = None,
    metrics_key_label: Annotated[list[str] | None, typer.Option(
        "--metrics-key-label", help="Key names exported with their own label in /metrics (repeatable); all "
        "other keys are summed as 'other'.")] = None,
    engine_args: dict[str, Any] | None = None,  # SERVE_ENGINE_OPTIONS, filled in by @engine_options
) -> None:
    """Start the OpenAI-compatible HTTP server."""
    from zili.config import EngineConfig
    from zili.models.loader import resolve_model
    from zili.server.auth import read_api_keys

    level = log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine_args = engine_args or {}
    reasoning_parser = engine_args.get("reasoning_parser", "auto")
    try:  # every check fails before the port is bound
        resolve_model(model, weights_required=engine_args.get("load_format", "auto") != "dummy")
        config = EngineConfig(model=model, **engine_args)
        keys = read_api_keys(api_key, api_key_file)
        governance = build_governance(GovernanceConfig(
            database_url=database_url, admin_key=admin_key, content_policy=content_policy, log_content=log_content,
            log_retention_days=log_retention_days, prices=prices, metrics_keys=list(metrics_key_label or [])))
        resolve_reasoning_parser(reasoning_parser, None)  # the name is checked now; "auto" is decided at load
        budgets = parse_reasoning_budgets(reasoning_budgets or "")
        if pooling not in POOLING_TYPES:
            raise ValueError(f"--pooling must be one of {', '.join(POOLING_TYPES)}, got {pooling!r}")
    except (ValueError, OSError, SQLAlchemyError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None

    def load_engine():  # runs on the engine thread, so /health answers while the model loads
        from zili.engine.builder import build_engine
        # A server answers at once: the decode step compiles in the background (zili.engine.compiled_decode).
        os.environ.setdefault(envs.ZILI_BACKGROUND_COMPILE.name, "1")

        loaded = build_engine(config)
        if loaded.tp_executor is not None:  # a worker lost while idle: unhealthy at once, then exit non-zero
            loaded.tp_executor.add_failure_listener(lambda exc: _engine_lost(engine, server, exc))
        return loaded

    settings = ServerSettings(
        served_model_name=served_model_name or model, api_keys=keys, max_tokens_cap=max_tokens_cap,
        max_n=config.max_num_seqs, max_body_bytes=max_body_bytes, shutdown_timeout=shutdown_timeout,
        web_ui=web_ui, reasoning_parser=reasoning_parser, reasoning_budgets=budgets, pooling=pooling)
    engine: ServingEngine
    if replicas > 1 or ray_address is not None:
        from zili.distributed.replicas import ReplicaPool

        engine = ReplicaPool(config, replicas, ray_address, max_queue=max_queue)
    else:
        engine = AsyncEngine(load_engine, max_queue=max_queue)
    app = build_app(settings, engine, governance)
    uv_config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), access_log=level == "DEBUG",
                               timeout_graceful_shutdown=math.ceil(shutdown_timeout) + 5)
    server = _DrainingServer(uv_config, app.state.zili)
    engine.on_fatal = server.engine_failed
    if governance is not None:
        logger.info("governance on: database keys%s, quotas and the usage ledger in %s%s", " and static keys" if keys
                    else "", governance.db.url.render_as_string(hide_password=True),
                    "; admin API at /admin/v1" if admin_key else "")
    elif keys:
        logger.info("API keys required on /v1/*, /tokenize, /detokenize (%d key(s))", len(keys))
    server.run()
    _exit_past_native_threads(server.exit_code, ray_driver=replicas > 1 or ray_address is not None)
    if server.exit_code:
        raise typer.Exit(server.exit_code)


def _exit_past_native_threads(code: int, ray_driver: bool) -> None:
    """Exit at once when native threads would outlive the interpreter: the decode step's background
    compile still running at shutdown, or a Ray driver (replicas), whose core-worker threads stay.

    Everything the server owes has been done by now (answers drained, the ledger flushed, the engine
    or the replicas closed, `ray.shutdown()` called). Letting the interpreter finalize around those
    threads aborts the process ("terminate called without an active exception", exit -6), so a
    SIGTERM would not exit 0 as documented (seen in CI with Ray, and in a new user's `make run`
    stopped while the graphs built). os._exit skips that teardown.
    """
    compiling = any(t.name == COMPILE_THREAD_NAME and t.is_alive() for t in threading.enumerate())
    if not (compiling or ray_driver):
        return
    if compiling:
        logger.info("exiting without waiting for the decode step's background compile")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _engine_lost(engine: ServingEngine, server: _DrainingServer, exc: BaseException) -> None:
    """From any thread: the engine cannot run any more (a tensor-parallel rank died)."""
    engine.dead_error = exc
    if server.loop is not None:
        server.loop.call_soon_threadsafe(server.engine_failed, exc)


if __name__ == "__main__":
    typer.run(serve)
