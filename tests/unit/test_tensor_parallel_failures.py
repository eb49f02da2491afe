"""A tensor-parallel worker that dies or hangs fails the engine within a bounded time, never hangs it.

Documented behaviour (docs/distributed.md): `Engine.step()` raises `TensorParallelError` (a
BaseException, so generic `except Exception` handlers do not swallow it), every later step raises
it again, failure listeners hear of it (also while idle), and the remaining workers are stopped.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
import transformers  # noqa: E402,F401  (tests/tiny_models writes checkpoints with it)

from tests.tiny_models import write_tiny_llama  # noqa: E402
from zili import LLM, SamplingParams  # noqa: E402
from zili.distributed import TensorParallelError  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-tp"))


def make_llm(tiny_dir, **kw) -> LLM:
    return LLM(str(tiny_dir), dtype="float32", block_size=4, threads=1, kv_cache_memory=2**22,
               use_tune_cache=False, tensor_parallel_size=2, **kw)


def run_until_failure(engine, limit_s: float) -> tuple[TensorParallelError, float]:
    start = time.monotonic()
    with pytest.raises(TensorParallelError) as info:
        while time.monotonic() - start < limit_s:
            engine.step()
    return info.value, time.monotonic() - start


def test_killed_worker_fails_the_step(tiny_dir):
    llm = make_llm(tiny_dir)
    engine = llm.engine
    worker = engine.tp_executor.workers[0]
    heard: list[BaseException] = []
    engine.tp_executor.add_failure_listener(heard.append)
    try:
        engine.add_request("r", "Once upon a time", SamplingParams(max_tokens=400, ignore_eos=True))
        for _ in range(3):
            engine.step()
        os.kill(worker.pid, signal.SIGKILL)
        error, elapsed = run_until_failure(engine, limit_s=20)
        assert elapsed < 10
        assert "rank 1" in str(error) and "exit code -9" in str(error)
        with pytest.raises(TensorParallelError):  # and from then on, at once
            engine.step()
        assert heard and heard[0] is error
        # The offline API gives up too, with its requests aborted.
        with pytest.raises(TensorParallelError):
            llm.generate("Hello", SamplingParams(max_tokens=4), use_tqdm=False)
    finally:
        engine.close()


def test_hung_worker_times_out(tiny_dir):
    llm = make_llm(tiny_dir, distributed_timeout=2.0)
    engine = llm.engine
    worker = engine.tp_executor.workers[0]
    try:
        engine.add_request("r", "Once upon a time", SamplingParams(max_tokens=400, ignore_eos=True))
        engine.step()
        os.kill(worker.pid, signal.SIGSTOP)  # alive but never answers
        error, elapsed = run_until_failure(engine, limit_s=30)
        assert 1.5 < elapsed < 15
        assert "step failed" in str(error)
        worker.join(5)
        assert not worker.is_alive()  # the stopped worker was killed
    finally:
        engine.close()


def test_worker_death_while_idle_is_noticed(tiny_dir):
    llm = make_llm(tiny_dir)
    engine = llm.engine
    died = threading.Event()
    engine.tp_executor.add_failure_listener(lambda error: died.set())
    try:
        assert llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].finished
        os.kill(engine.tp_executor.workers[0].pid, signal.SIGKILL)
        assert died.wait(5)  # no step needed: the monitor sees the process go
        with pytest.raises(TensorParallelError, match="worker exited"):
            llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)
    finally:
        engine.close()


def test_clean_shutdown_and_restart(tiny_dir):
    llm = make_llm(tiny_dir)
    worker = llm.engine.tp_executor.workers[0]
    llm.engine.close()
    llm.engine.close()  # idempotent
    assert worker.exitcode == 0  # STOP, not a kill
    again = make_llm(tiny_dir)  # the process group was left: a new engine can form one
    try:
        assert again.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].finished
    finally:
        again.engine.close()
