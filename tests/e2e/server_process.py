"""A real `zili serve` process (default model, 127.0.0.1, a free port) for the end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

API_KEY = "sk-zili-test-key"
MODEL = "smollm2-135m"
# Small and quick: a 2048-token context and a 128 MiB KV pool (about 360 blocks of 16 tokens).
COMMON_ARGS = ["--max-model-len", "2048", "--kv-cache-memory", "128MiB", "--log-level", "warning"]


# Settling: tests that compare two greedy answers to one prompt send that prompt once first. With the default
# bf16 / int4 model, the answer can depend on how much of the prompt the prefix cache already holds
# (a prefill of 30 rows and one of 14 take different kernels and roundings, and a near-tie can flip:
# "a rare and precious one" on a miss, "... gem" on a partial hit, seen in CI). After one request,
# every full block of that prompt is cached, so all later identical requests see the same cache state.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One `python -m zili.server.launcher` subprocess."""

    def __init__(self, args: list[str], log_path: Path, api_key: str | None = API_KEY) -> None:
        self.port = free_port()
        self.api_key = api_key
        self.log_path = log_path
        cmd = [sys.executable, "-m", "zili.server.launcher", MODEL, "--port", str(self.port), *COMMON_ARGS, *args]
        if "--compile" not in args and "--enforce-eager" not in args:
            # Eager unless a test asks for the compiled step: `zili serve` compiles in the background and
            # switches to the graphs mid-session, and a bf16 near-tie can then flip a greedy token, so
            # tests that compare an answer with an earlier one would compare eager with compiled (seen
            # in CI: "precious one" / "precious gem"). test_server_compiled covers the switch itself.
            cmd.append("--enforce-eager")
        if api_key:
            cmd += ["--api-key", api_key]
        self._log = open(log_path, "wb")
        # One intra-op thread: on a shared, oversubscribed machine, torch's spinning OpenMP workers make
        # a 2-thread server ~10x slower than a 1-thread one (measured), and these tests check behaviour.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.health_seen: list[tuple[int, str]] = []  # (status, body["status"]) while waiting to start

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, n: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_healthy(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                self.health_seen.append((r.status_code, r.json()["status"]))
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not healthy after {timeout} s:\n{self.log_tail()}")

    def openai(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0,
                             timeout=120, **kwargs)

    def async_openai(self, **kwargs) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0,
                                  timeout=120, **kwargs)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=120)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {'name' or 'name{label="value"}': value}; model_name is dropped."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()) if k != "model_name")
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """Poll /metrics until nothing runs or waits and every KV block is free; returns the last sample."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m["zili_num_requests_running"] == 0 and m["zili_num_requests_waiting"] == 0
                    and m["zili_kv_cache_free_blocks"] == m["zili_kv_cache_total_blocks"])
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def start_server(tmp_path_factory: pytest.TempPathFactory, name: str, args: list[str],
                 api_key: str | None = API_KEY) -> ServerProcess:
    log = tmp_path_factory.mktemp(name) / "server.log"
    server = ServerProcess(args, log, api_key)
    try:
        server.wait_healthy()
    except BaseException:
        server.stop()
        raise
    return server
