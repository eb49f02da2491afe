"""SIGTERM drains: no new connections, short requests finish, long ones end as aborted, exit status 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.e2e.server_process import MODEL, ServerProcess, start_server

SHUTDOWN_TIMEOUT = 4.0  # long enough for the short request to finish on a loaded machine


def _stream(server: ServerProcess, max_tokens: int, started: threading.Event, out: dict) -> None:
    body = {"model": MODEL, "prompt": "Write a long story:", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers,
                          timeout=60) as r:
            out["status"] = r.status_code
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    started.set()
            out["done"] = events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            out["finish"] = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
            out["text"] = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    except Exception as exc:  # noqa: BLE001 - reported by the test
        out["error"] = repr(exc)
    finally:
        out["ended_at"] = time.monotonic()
        started.set()


def test_sigterm_drains_then_exits_0(tmp_path_factory: pytest.TempPathFactory):
    server = start_server(tmp_path_factory, "drain", ["--shutdown-timeout", str(SHUTDOWN_TIMEOUT)])
    try:
        long_started, short_started = threading.Event(), threading.Event()
        long, short = {}, {}
        threads = [threading.Thread(target=_stream, args=(server, 1500, long_started, long)),
                   threading.Thread(target=_stream, args=(server, 3, short_started, short))]
        threads[0].start()
        assert long_started.wait(60)
        threads[1].start()
        assert short_started.wait(60)

        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # the listening socket is closed: no new requests
            httpx.get(server.url + "/health", timeout=2)

        for t in threads:
            t.join(30)
        assert short == short | {"status": 200, "done": True, "finish": "length"}, short
        assert long == long | {"status": 200, "done": True, "finish": "abort"}, long
        assert long["text"]  # it ran, then was cut at the deadline
        assert long["ended_at"] - signalled >= SHUTDOWN_TIMEOUT - 0.5
        assert server.proc.wait(30) == 0
        assert time.monotonic() - signalled < SHUTDOWN_TIMEOUT + 15
    finally:
        server.stop()
    assert "Traceback" not in server.log_path.read_text(), server.log_tail()
