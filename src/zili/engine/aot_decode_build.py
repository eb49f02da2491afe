"""The AOT decode package build process (`python -m zili.engine.aot_decode_build JOB`), started by
`zili.engine.aot_decode.start_child_build`: it loads the model as the server did and builds the packages
(a module of its own: it needs the engine builder, which imports zili.engine.aot_decode)."""

from __future__ import annotations

import dataclasses
import logging
import pickle
import sys
from pathlib import Path

from zili.engine.aot_decode import build_into_cache, stop_group_on_sigterm
from zili.engine.builder import aot_decode_plan, build_engine_parts
from zili.engine.runner import ModelRunner

logger = logging.getLogger(__name__)


def main(job_path: str) -> int:
    """The build process: load the model as the server did (eagerly, a small KV pool), check that it
    gives the server's key, build and cache the packages."""
    stop_group_on_sigterm()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    job = pickle.loads(Path(job_path).read_bytes())
    config = pickle.loads(job["config"])
    config = dataclasses.replace(config, enforce_eager=True, kv_cache_memory=64 << 20)
    parts = build_engine_parts(config)
    runner = parts.executor
    assert isinstance(runner, ModelRunner)  # one process, one device: the executor is the runner
    key, ranges = aot_decode_plan(runner, config, parts.attention_backend)
    if key != job["key"] or ranges != [tuple(r) for r in job["ranges"]]:
        logger.error("AOT decode: this process's model gives key %s, the server's %s (different kernel "
                     "choices or files?); not building", key, job["key"])
        return 3
    build_into_cache(runner.model, runner.kv_caches, config.block_size, runner.attention, ranges, key,
                     Path(job["root"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
