"""A tensor-parallel worker: one process per rank > 0, started by rank 0's executor.

It joins the group, loads its shard of the weights, builds its KV cache (the pool size comes from
rank 0 through the store), reports ready, then follows rank 0: receive a plan, run the same forward
pass (taking part in every collective), repeat, until STOP. It exits when rank 0 goes away: its
connections close, and a watchdog thread also ends it if its parent process dies.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
from dataclasses import dataclass

from zili.config import EngineConfig

logger = logging.getLogger(__name__)

JOINED_KEY = "zili/joined/{rank}"  # set just before joining the process group
READY_KEY = "zili/ready/{rank}"  # "ok" or "error: ..." once the shard is loaded
KV_POOL_KEY = "zili/kv_pool"  # "num_blocks block_size", set by rank 0


@dataclass
class WorkerSpec:
    config: EngineConfig
    rank: int
    size: int
    host: str
    port: int
    backend: str
    timeout_s: float  # collectives
    threads: int
    attention_backend: str | None = None


def run_worker(spec: WorkerSpec) -> None:
    """The worker process's entry point (a multiprocessing target)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s tp-rank-{spec.rank} %(name)s: "
                        "%(message)s")
    _exit_with_parent()
    from zili.distributed import group as pg

    store = pg.join_store(spec.host, spec.port, spec.size)
    try:
        runner, channel = _start(spec, store)
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0, which raises it
        logger.exception("tensor-parallel rank %d failed to start", spec.rank)
        store.set(READY_KEY.format(rank=spec.rank), f"error: {type(exc).__name__}: {exc}")
        os._exit(1)
    store.set(READY_KEY.format(rank=spec.rank), "ok")
    try:
        _follow(runner, channel)
    except Exception:
        logger.exception("tensor-parallel rank %d stopped", spec.rank)
        os._exit(1)
    pg.destroy_group()


def _start(spec: WorkerSpec, store):
    from zili.distributed import group as pg
    from zili.distributed.plan import PlanChannel
    from zili.distributed.weights import load_shard
    from zili.engine.runner import ModelRunner
    from zili.layers.parallel import rank_cache_config
    from zili.platforms import current_platform

    platform = current_platform()
    platform.set_num_threads(spec.threads)
    store.set(JOINED_KEY.format(rank=spec.rank), "ok")
    from zili.kernels.backends import use_attention_backend

    attention = use_attention_backend(spec.attention_backend) if spec.attention_backend is not None else None
    tp, control = pg.init_group(store, spec.rank, spec.size, spec.backend, spec.timeout_s)
    device = pg.rank_device(platform, spec.rank)
    loaded, _ = load_shard(spec.config, tp, device)
    num_blocks, block_size = map(int, store.get(KV_POOL_KEY).split())  # rank 0 sizes the pool once loaded
    runner = ModelRunner(loaded.model, rank_cache_config(loaded.config, tp), num_blocks, block_size, loaded.dtype,
                         device, attention)
    return runner, PlanChannel(control)


def _follow(runner, channel) -> None:
    from zili.distributed.plan import OP_STEP, OP_STOP

    while True:
        op, step = channel.receive()
        if op == OP_STOP:
            return
        if op == OP_STEP:
            runner.execute(step)


def _exit_with_parent() -> None:
    """End this process as soon as rank 0's process is gone (even if it was killed)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        logger.error("rank 0 (pid %s) exited; stopping", parent.pid)
        os._exit(1)

    threading.Thread(target=watch, name="zili-tp-parent-watch", daemon=True).start()
