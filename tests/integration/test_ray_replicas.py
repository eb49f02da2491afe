"""Two engine replicas on a local Ray instance behind the OpenAI API: concurrent requests spread
over both (least-loaded routing), a refused request keeps its own error, and a replica that dies
takes the server's health down.

The app is the real FastAPI app (zili.server.app.build_app) over an in-process ASGI transport;
the replicas are real Ray actors (one CPU each) running a tiny random Llama.

The scenario runs in a child process (`python -m tests.integration.test_ray_replicas DIR`): the Ray
driver's native core worker ends its process with exit status 1 when it loses its GCS (seen in a
full suite on a machine at load 10+), which would take pytest down with it, without a report.
The waits are readiness bounds, not speed assertions: starting two actors took over 3 minutes there.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


import httpx  # noqa: E402
import ray  # noqa: E402
import transformers  # noqa: E402,F401

from tests.tiny_models import write_tiny_llama  # noqa: E402
from zili.config import EngineConfig  # noqa: E402
from zili.distributed.replicas import ReplicaPool  # noqa: E402
from zili.server.app import ServerSettings, build_app  # noqa: E402


def test_two_replicas_share_concurrent_load(tmp_path):
    child = subprocess.run([sys.executable, "-m", "tests.integration.test_ray_replicas", str(tmp_path)],
                           capture_output=True, text=True, timeout=1500)
    assert child.returncode == 0, f"exit {child.returncode}\n{child.stdout[-4000:]}\n{child.stderr[-8000:]}"
    assert "scenario passed" in child.stdout


def scenario_two_replicas(tmp_path: Path) -> None:
    tiny = write_tiny_llama(tmp_path / "tiny")
    config = EngineConfig(model=str(tiny), dtype="float32", threads=1, block_size=4, kv_cache_memory=2**22,
                          max_num_seqs=8, use_tune_cache=False)
    pool = ReplicaPool(config, replicas=2, max_queue=64)
    app = build_app(ServerSettings(served_model_name="tiny"), pool)
    fatal: list[BaseException] = []
    pool.on_fatal = fatal.append

    async def scenario() -> None:
        pool.start()
        assert await asyncio.get_running_loop().run_in_executor(None, pool.wait_ready, 900)
        assert pool.ready, pool.load_error
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://zili") as client:
            assert (await client.get("/health")).status_code == 200
            body = {"model": "tiny", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            replies = await asyncio.gather(*(client.post("/v1/completions", json={**body, "prompt": f"Hello {i}"})
                                             for i in range(8)))
            assert [r.status_code for r in replies] == [200] * 8, replies[0].text
            assert all(r.json()["usage"]["completion_tokens"] == 12 for r in replies)
            # Both replicas took requests and generated tokens.
            assert [load["assigned"] for load in pool.replica_loads()] == [4, 4]
            stats = ray.get([r.actor.stats.remote() for r in pool.replicas])
            assert all(s.generation_tokens_total >= 4 * 12 for s in stats)
            # A request the replica refuses keeps its error type: 400, not 500.
            too_long = await client.post("/v1/completions", json={**body, "prompt": "x", "max_tokens": 10**6})
            assert too_long.status_code == 400, too_long.text
            assert [load["in_flight"] for load in pool.replica_loads()] == [0, 0]
            # A replica that dies: health goes 503 and the server is told (it exits non-zero).
            ray.kill(pool.replicas[0].actor)
            killed = time.monotonic()
            while pool.dead_error is None and time.monotonic() - killed < 180:
                await asyncio.sleep(0.1)
            print(f"replica death noticed after {time.monotonic() - killed:.1f} s: {pool.dead_error!r}")
            assert (await client.get("/health")).status_code == 503
            await asyncio.sleep(0)  # let on_fatal run
            assert fatal

    try:
        asyncio.run(scenario())
    finally:
        pool.shutdown()


if __name__ == "__main__":
    scenario_two_replicas(Path(sys.argv[1]))
    print("scenario passed")
