"""`zili serve --replicas 2 --ray-address HEAD` in the two-machine layout of docs/distributed.md,
run here as two local processes: a Ray head (`ray start --head --block`, the "GPU box") and the
server that joins it (the "front end"). Concurrent requests through the OpenAI API land on both
replicas; SIGTERM drains the server and removes its replicas, leaving the cluster up.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx  # noqa: E402
import pytest
import ray  # noqa: E402,F401
import transformers  # noqa: E402,F401

from tests.tiny_models import write_tiny_llama  # noqa: E402

# Token auth as Ray enables it by default; both processes read the token from ~/.ray/auth_token.
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": "1",
       "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


# Every zili replica actor in the cluster -> the tokens it generated (JSON on the last line).
INSPECT = """
import json, sys, ray
ray.init(address=sys.argv[1], namespace="zili", log_to_driver=False)
names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if a["namespace"] == "zili" and "-replica-" in a["name"])
stats = ray.get([ray.get_actor(n, namespace="zili").stats.remote() for n in names])
print(json.dumps([s.generation_tokens_total for s in stats]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def test_serve_replicas_joining_a_ray_cluster(tmp_path):
    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable))
    if ray_cli is None:
        pytest.fail("the ray command is not installed: run `make test`, which installs ray")
    tiny = write_tiny_llama(tmp_path / "tiny")
    gcs_port, http_port = free_port(), free_port()
    head_log, server_log = open(tmp_path / "head.log", "wb"), open(tmp_path / "server.log", "wb")
    head = subprocess.Popen([ray_cli, "start", "--head", "--port", str(gcs_port), "--num-cpus", "2",
                             "--include-dashboard", "false", "--disable-usage-stats", "--block"],
                            stdout=head_log, stderr=subprocess.STDOUT, env=ENV)
    server = subprocess.Popen([sys.executable, "-m", "zili.server.launcher", str(tiny), "--port", str(http_port),
                               "--replicas", "2", "--ray-address", f"127.0.0.1:{gcs_port}", "--dtype", "float32",
                               "--kv-cache-memory", "4MiB", "--served-model-name", "tiny"],
                              stdout=server_log, stderr=subprocess.STDOUT, env=ENV)
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 600  # readiness, not speed: two actors took minutes at load 16
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.25)

        body = {"model": "tiny", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda i: httpx.post(url + "/v1/completions", timeout=300,
                                                         json={**body, "prompt": f"Request {i}"}), range(6)))
        assert [r.status_code for r in replies] == [200] * 6

        # Look into the cluster from a third process: both replicas generated tokens.
        inspect = subprocess.run([sys.executable, "-c", INSPECT, f"127.0.0.1:{gcs_port}"], env=ENV, timeout=300,
                                 capture_output=True, text=True)
        tokens = json.loads(inspect.stdout.strip().splitlines()[-1]) if inspect.returncode == 0 else inspect.stderr
        assert isinstance(tokens, list) and len(tokens) == 2 and min(tokens) >= 10, tokens

        code = stop(server)
        assert code == 0, (code, (tmp_path / "server.log").read_text()[-4000:])  # drained and exited cleanly
    finally:
        stop(server, signal.SIGKILL)
        stop(head)
        head_log.close()
        server_log.close()
