"""`zili serve -tp 2`: the server answers through both ranks, and when a worker is killed it reports
unhealthy and exits non-zero within seconds (docs/distributed.md, "Failures")."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import transformers  # noqa: F401  (tests/tiny_models writes checkpoints with it)

from tests.tiny_models import write_tiny_llama


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tp_worker_pids(pid: int) -> list[int]:
    """The server's multiprocessing-spawned children (its tensor-parallel ranks)."""
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "spawn_main" in line]


def test_server_exits_nonzero_when_a_worker_dies(tmp_path):
    tiny = write_tiny_llama(tmp_path / "tiny")
    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "zili.server.launcher", str(tiny), "--port", str(port), "-tp", "2",
                               "--dtype", "float32", "--kv-cache-memory", "4MiB", "--served-model-name", "tiny"],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.25)
        reply = httpx.post(url + "/v1/completions", timeout=60,
                           json={"model": "tiny", "prompt": "Hello", "max_tokens": 8, "ignore_eos": True})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8

        (worker,) = tp_worker_pids(server.pid)
        os.kill(worker, signal.SIGKILL)  # while idle: no request needs to fail first
        killed = time.monotonic()
        code = server.wait(30)
        assert code != 0
        assert time.monotonic() - killed < 15
        assert "tensor-parallel worker exited" in (tmp_path / "server.log").read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()
