"""A server with tight limits: 429 past --max-queue, and a schemathesis run that finds no 5xx."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.server_process import MODEL, ServerProcess, start_server

# Tiny batches and outputs keep each fuzzed generation short.
LIMITED_ARGS = ["--max-num-seqs", "2", "--max-queue", "2", "--max-tokens-cap", "2", "--max-body-bytes", "65536"]


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory, "limited", LIMITED_ARGS)
    yield srv
    srv.stop()


async def _burst(server: ServerProcess, count: int) -> list[httpx.Response]:
    body = {"model": MODEL, "prompt": "Count to ten:", "max_tokens": 2, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(count)))


def test_429_past_max_queue(limited: ServerProcess):
    responses = asyncio.run(_burst(limited, 12))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429}, statuses
    for r in responses:
        if r.status_code == 429:
            error = r.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
            assert int(r.headers["retry-after"]) >= 1
        else:
            assert r.json()["usage"]["completion_tokens"] == 2
    assert limited.metrics()['zili_requests_rejected_total{reason="queue_full"}'] == statuses.count(429)
    limited.wait_idle()
    assert httpx.get(limited.url + "/health").status_code == 200


def test_schemathesis_finds_no_server_errors(limited: ServerProcess):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_url(limited.url + "/openapi.json")
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models",
                                               "/tokenize", "/detokenize", "/health", "/metrics"}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=10, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case) -> None:
                response = case.call(headers=limited.headers, timeout=60)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.path} {case.body!r} -> {response.status_code} "
                                    f"{response.text[:300]}")

            try:
                check()
            except Unsatisfiable:  # no invalid input exists (e.g. GET /health takes no parameters)
                assert mode == GenerationMode.NEGATIVE, op.path
    assert not failures, "\n".join(failures[:10])
    assert httpx.get(limited.url + "/health").status_code == 200
