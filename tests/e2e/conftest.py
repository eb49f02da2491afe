"""End-to-end fixtures: real `zili serve` processes with the default model on 127.0.0.1, free ports."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.e2e.server_process import ServerProcess, start_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The main server: API key required, max_tokens capped at 1024, 256 KiB bodies."""
    srv = start_server(tmp_path_factory, "server", ["--max-tokens-cap", "1024", "--max-body-bytes", "262144",
                                                    "--max-queue", "256"])
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> openai.OpenAI:
    return server.openai()


@pytest.fixture(scope="session")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.http() as c:
        yield c
