"""Fast tests of the benchmark suite's pure parts and its load generator (against a fake server)."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from zili.bench.cost import CostBasis, cost_figures, dollars_per_million, joules_per_token
from zili.bench.stats import median, percentile, ratio, summarize
from zili.bench.workload import LengthSpec, make_requests

# --- stats ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 7, 100])
@pytest.mark.parametrize("q", [0, 50, 90, 99, 100])
def test_percentile_matches_numpy(n, q):
    xs = [random.Random(n).random() * 100 for _ in range(n)]
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_summarize_and_empty():
    s = summarize([1, 2, 3, 4])
    assert s["n"] == 4 and s["mean"] == 2.5 and s["p50"] == 2.5 and s["min"] == 1 and s["max"] == 4
    empty = summarize([])
    assert empty["n"] == 0 and empty["p99"] is None and empty["mean"] is None
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_median_and_ratio_skip_missing():
    assert median([3, None, 1, 2]) == 2
    assert median([None]) is None
    assert ratio(6, 3) == 2 and ratio(None, 3) is None and ratio(1, 0) is None


# --- cost ----------------------------------------------------------------------------------------

def test_cost_per_million_tokens():
    # $3.60/h at 1000 tok/s: 3.6M tokens per hour -> $1 per 1M tokens
    assert dollars_per_million(1000, 3.6) == pytest.approx(1.0)
    assert dollars_per_million(0, 3.6) is None and dollars_per_million(None, 3.6) is None
    assert joules_per_token(50, 100) == pytest.approx(2.0)


def test_cost_figures_with_and_without_watts():
    plain = cost_figures(100.0, 400.0, CostBasis(price_per_hour=0.36))
    assert plain["usd_per_1m_output_tokens"] == pytest.approx(1.0)
    assert plain["usd_per_1m_input_tokens"] == pytest.approx(0.25)
    assert "joules_per_output_token" not in plain
    energy = cost_figures(100.0, None, CostBasis(price_per_hour=0.36, watts=50))
    assert energy["joules_per_output_token"] == pytest.approx(0.5)
    assert energy["wh_per_1m_output_tokens"] == pytest.approx(0.5 * 1e6 / 3600)
    assert energy["usd_per_1m_input_tokens"] is None
    with pytest.raises(ValueError):
        CostBasis(price_per_hour=-1)


# --- workload ------------------------------------------------------------------------------------

def test_length_spec():
    assert LengthSpec.parse("128") == LengthSpec(128, 128) and LengthSpec.parse(7).fixed
    spec = LengthSpec.parse("10:20")
    rng = random.Random(0)
    assert all(10 <= spec.draw(rng) <= 20 for _ in range(100)) and str(spec) == "10:20"
    for bad in ("0", "20:10", "abc", "1:2:3"):
        with pytest.raises(ValueError):
            LengthSpec.parse(bad)


def test_make_requests_is_seeded_and_exact(tmp_path):
    a = make_requests(5, LengthSpec(16, 16), LengthSpec(4, 8), "random-ids", vocab_size=1000, seed=3)
    b = make_requests(5, LengthSpec(16, 16), LengthSpec(4, 8), "random-ids", vocab_size=1000, seed=3)
    c = make_requests(5, LengthSpec(16, 16), LengthSpec(4, 8), "random-ids", vocab_size=1000, seed=4)
    assert a == b and a != c
    assert all(len(r.prompt) == 16 and all(100 <= t < 1000 for t in r.prompt) and 4 <= r.output_len <= 8 for r in a)
    words = make_requests(2, LengthSpec(12, 12), LengthSpec(4, 4), "random-words", seed=0)
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == 12 for r in words)
    f = tmp_path / "p.txt"
    f.write_text("one two three four five")
    from_file = make_requests(1, LengthSpec(7, 7), LengthSpec(4, 4), "file", seed=0, prompt_file=f)
    assert len(from_file[0].prompt.split()) == 7
    with pytest.raises(ValueError):
        make_requests(1, LengthSpec(1, 1), LengthSpec(1, 1), "file")


# --- the load generator against a fake OpenAI SSE server -----------------------------------------

def _fake_app(send_usage: bool = True, delay_s: float = 0.002):
    app = FastAPI()
    app.state.seen = []
    app.state.loading_polls = 0  # /health answers 503 (loading) this many times first

    @app.get("/health")
    def health():
        if app.state.loading_polls > 0:
            app.state.loading_polls -= 1
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model", "meta": {"n_vocab": 5000}}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        app.state.seen.append(body)
        prompt = body["prompt"]
        if prompt == "fail":
            return JSONResponse({"error": {"message": "bad prompt"}}, status_code=400)
        n_prompt = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        n = body["max_tokens"] if body.get("ignore_eos") else 1

        async def events():
            for i in range(n):
                await asyncio.sleep(delay_s)
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': f' t{i}', 'finish_reason': None}]})}\n\n"
            yield f"data: {json.dumps({'choices': [{'index': 0, 'text': '', 'finish_reason': 'length'}]})}\n\n"
            if send_usage and (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture
def fake_server(request):
    import uvicorn

    send_usage = getattr(request, "param", True)
    app = _fake_app(send_usage=send_usage)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(10)


@pytest.mark.parametrize("fake_server", [True, False], indirect=True, ids=["usage", "no-usage"])
def test_run_load_fixed_concurrency(fake_server):
    from zili.bench.serve import LoadSpec, run_load

    url, app = fake_server
    reqs = make_requests(6, LengthSpec(8, 8), LengthSpec(5, 5), vocab_size=5000, seed=1)
    fig = asyncio.run(run_load(url, "fake-model", reqs, LoadSpec(concurrency=2), keep_requests=True))
    assert fig["completed"] == 6 and fig["errors"] == 0 and fig["short_outputs"] == 0
    assert fig["output_tokens"] == 30 and fig["input_tokens"] == 48
    assert fig["ttft_ms"]["n"] == 6 and fig["itl_ms"]["n"] == 6 * 4 and fig["tpot_ms"]["p50"] > 0
    assert fig["output_throughput"] == pytest.approx(30 / fig["duration_s"])
    body = app.state.seen[0]
    assert body["ignore_eos"] is True and body["max_tokens"] == 5 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and isinstance(body["prompt"], list)


def test_usage_preferred_then_chunks(fake_server):
    from zili.bench.serve import LoadSpec, run_load

    url, _ = fake_server
    reqs = make_requests(2, LengthSpec(4, 4), LengthSpec(3, 3), vocab_size=5000)
    fig = asyncio.run(run_load(url, "fake-model", reqs, LoadSpec(concurrency=1)))
    assert fig["token_count_source"] == ["usage"] and fig["output_tokens"] == 6


@pytest.mark.parametrize("fake_server", [False], indirect=True)
def test_chunk_counting_without_usage(fake_server):
    from zili.bench.serve import LoadSpec, run_load

    url, _ = fake_server
    reqs = make_requests(2, LengthSpec(4, 4), LengthSpec(3, 3), vocab_size=5000)
    fig = asyncio.run(run_load(url, "fake-model", reqs, LoadSpec(concurrency=2)))
    # the finish-only final chunk is not a token
    assert fig["token_count_source"] == ["chunks"] and fig["output_tokens"] == 6 and fig["short_outputs"] == 0


def test_poisson_rate_errors_and_readiness(fake_server):
    from zili.bench.serve import LoadSpec, RequestSpec, run_load, wait_until_ready

    url, _ = fake_server
    asyncio.run(wait_until_ready(url, timeout_s=5))
    reqs = make_requests(4, LengthSpec(4, 4), LengthSpec(2, 2), vocab_size=5000)
    reqs.append(RequestSpec("fail", 1, 2))
    fig = asyncio.run(run_load(url, "fake-model", reqs, LoadSpec(concurrency=2, request_rate=200.0)))
    assert fig["completed"] == 4 and fig["errors"] == 1 and "HTTP 400" in fig["error_samples"][0]
    assert fig["load"] == "rate=200/s,c=2" and fig["request_rate"] == 200.0


def test_ready_waits_through_loading(fake_server):
    from zili.bench.serve import wait_until_ready

    url, app = fake_server
    app.state.loading_polls = 2
    asyncio.run(wait_until_ready(url, timeout_s=10))
    assert app.state.loading_polls == 0


def test_unreachable_server_is_an_error_not_a_crash():
    from zili.bench.serve import LoadSpec, run_load, wait_until_ready

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reqs = make_requests(2, LengthSpec(4, 4), LengthSpec(2, 2), vocab_size=5000)
    fig = asyncio.run(run_load(f"http://127.0.0.1:{port}", "m", reqs, LoadSpec(concurrency=1), timeout_s=2))
    assert fig["errors"] == 2 and fig["completed"] == 0 and fig["output_throughput"] == 0
    with pytest.raises(TimeoutError):
        asyncio.run(wait_until_ready(f"http://127.0.0.1:{port}", timeout_s=0.5))


def test_chat_payload_needs_text():
    from zili.bench.serve import RequestSpec, build_payload, chunk_text

    p = build_payload(RequestSpec("hello there", 2, 4), "m", "chat", {"top_k": 1})
    assert p["messages"] == [{"role": "user", "content": "hello there"}] and p["top_k"] == 1
    with pytest.raises(ValueError):
        build_payload(RequestSpec([1, 2], 2, 4), "m", "chat")
    assert chunk_text({"choices": [{"delta": {"content": "x"}, "finish_reason": None}]}, "chat") == (True, "x")
    assert chunk_text({"choices": [{"text": "", "finish_reason": "length"}]}, "completions") == (False, "")
    assert chunk_text({"choices": [], "usage": {}}, "completions") == (False, "")


# --- peers, compare, records, report -------------------------------------------------------------

LLAMA_BENCH_JSON = """[
  {"build_commit": "llama-cpp-python-0.3.36", "model_type": "llama ?B Q4_1", "n_threads": 2,
   "n_prompt": 512, "n_gen": 0, "avg_ts": 300.5, "stddev_ts": 4.0, "samples_ts": [296.5, 304.5]},
  {"build_commit": "llama-cpp-python-0.3.36", "model_type": "llama ?B Q4_1", "n_threads": 2,
   "n_prompt": 0, "n_gen": 128, "avg_ts": 110.0, "stddev_ts": 1.0, "samples_ts": [109.0, 111.0]}
]"""


def test_parse_llama_bench():
    from benchmarks.peers import parse_llama_bench

    rows = parse_llama_bench("some log line\n" + LLAMA_BENCH_JSON)
    assert [r["test"] for r in rows] == ["pp512", "tg128"]
    assert rows[0]["tokens_per_s"] == 300.5 and rows[1]["samples_ts"] == [109.0, 111.0]
    assert rows[1]["threads"] == 2


def _serve_row(engine, c, rnd, tps, ttft):
    from zili.bench.results import with_cost

    lat = {"n": 1, "mean": ttft, "min": ttft, "max": ttft, "p50": ttft, "p90": ttft, "p99": ttft}
    row = {"engine": engine, "round": rnd, "concurrency": c, "mode": "serve", "output_throughput": tps,
           "input_throughput": tps, "total_token_throughput": 2 * tps, "request_throughput": tps / 128,
           "ttft_ms": lat, "itl_ms": lat, "tpot_ms": lat, "e2e_ms": lat, "errors": 0, "short_outputs": 0,
           "load": f"c={c}"}
    return with_cost(row, CostBasis())


def test_summarize_runs_medians_and_ratios():
    from benchmarks.compare import summarize_serve

    runs = [_serve_row("zili", 4, r, tps, 100) for r, tps in enumerate([50, 70, 60])]
    runs += [_serve_row("llama.cpp", 4, r, tps, 50) for r, tps in enumerate([100, 120, 110])]
    runs.append({"engine": "llama.cpp", "round": 3, "failed": True, "error": "x"})
    [row] = summarize_serve(runs, CostBasis(price_per_hour=0.36))
    assert row["medians"]["zili"]["output_throughput"] == 60 and row["rounds"] == {"zili": 3, "llama.cpp": 3}
    assert row["ratios"]["llama.cpp"]["output_throughput"] == pytest.approx(60 / 110)
    assert row["ratios"]["llama.cpp"]["ttft_p50_ms"] == pytest.approx(2.0)
    # cost of the median throughput: $0.36/h at 60 tok/s
    assert row["medians"]["zili"]["usd_per_1m_output_tokens"] == pytest.approx(0.36 / (3600 * 60) * 1e6)
    assert row["ratios"]["llama.cpp"]["usd_per_1m_output_tokens"] == pytest.approx(110 / 60)


def test_record_roundtrip_and_report(tmp_path):
    from benchmarks.compare import summarize_serve, summarize_single_stream
    from benchmarks.report import write_report
    from zili.bench.results import load_records, new_record, write_record

    basis = CostBasis(price_per_hour=0.5)
    rec = new_record("compare", {"model": "m", "model_bytes": 1e8, "threads": 2, "llama_cpp": {"version": "x"},
                                 "serve": {"input_len": "128", "output_len": "128", "num_prompts": 8}}, basis,
                     argv=["compare", "--repeats", "2"], program="python -m benchmarks")
    assert rec["command"] == "python -m benchmarks compare --repeats 2"
    assert rec["machine"]["cpu"]["logical_cores"] >= 1 and "load_average" in rec["machine"]
    rec["runs"] = [_serve_row(e, c, r, t * c, 10 * c) for e, t in (("zili", 10), ("llama.cpp", 20))
                   for c in (1, 4) for r in range(2)]
    rec["summary"]["serve"] = summarize_serve(rec["runs"], basis)
    single = [{"engine": e, "round": 0, "test": t, "tokens_per_s": v, "mode": "offline",
               "cost": cost_figures(v, None, basis)} for e, t, v in
              (("zili", "pp512", 200.0), ("llama.cpp", "pp512", 400.0), ("zili", "tg128", 50.0),
               ("llama.cpp", "tg128", 100.0))]
    rec["runs"] += single
    rec["summary"]["single_stream"] = summarize_single_stream(single, basis)
    results = tmp_path / "results"
    path = write_record(rec, results, label="unit test")
    assert path.parent == results and path.name.endswith("-compare-unit-test.json")
    (results / "not-ours.json").write_text(json.dumps({"hello": 1}))
    [(p, loaded)] = load_records(results)
    assert loaded["runs"] == json.loads(json.dumps(rec["runs"]))
    out = write_report(results, tmp_path / "plots", tmp_path / "BENCHMARKS.md")
    text = out.read_text()
    assert "zili / llama.cpp" in text and "**0.50×**" in text and "pp512" in text
    assert "python -m benchmarks compare --repeats 2" in text and "plots/throughput_vs_concurrency.png" in text
    for name in ("throughput_vs_concurrency", "ttft_percentiles", "itl_percentiles", "single_stream"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000


def test_roofline_math():
    from zili.bench.offline import decode_roofline

    kv = 2 * 30 * 3 * 64 * 2  # SmolLM2: k and v, 30 layers, 3 KV heads of 64, bf16
    r = decode_roofline(weight_bytes=100e6, kv_bytes_per_tok=kv, context_len=0, batch=1, bandwidth_gb_s=10)
    assert r["tokens_per_s"] == pytest.approx(100.0)
    r4 = decode_roofline(100e6, kv, 256, 4, 10)
    assert r4["bytes_per_step"] == 100e6 + 4 * 256 * kv and r4["tokens_per_s"] < 400


def test_copy_bandwidth_runs_on_cpu():
    from zili.bench.offline import measure_copy_bandwidth

    bw = measure_copy_bandwidth(nbytes=1 << 20, repetitions=2)
    assert bw["bandwidth_gb_s"] > 0


def test_machine_info_parses_cpuinfo():
    from zili.bench.machine import cpu_info

    info = cpu_info("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 avx512f amx_tile\n")
    assert info["model"] == "Test CPU" and info["notable_flags"] == ["avx2", "avx512f", "amx_tile"]


def test_machine_info_records_forced_isa_levels(monkeypatch):
    """A forced-AVX2 run is only comparable when the record says torch's kernels were lowered too."""
    from zili.bench.machine import machine_info

    monkeypatch.setenv("ZILI_CPU_ISA", "avx2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    info = machine_info()
    assert info["zili_env"]["ZILI_CPU_ISA"] == "avx2"
    assert info["isa_env"]["ATEN_CPU_CAPABILITY"] == "avx2" and "ONEDNN_MAX_CPU_ISA" not in info["isa_env"]


def test_report_machine_line_says_when_the_kernel_level_was_forced():
    from benchmarks.report import _machine_line

    record = {"machine": {"cpu": {"model": "AMD EPYC", "usable_cores": 2, "notable_flags": ["avx2", "avx512f"]},
                          "memory_bytes": 2**34, "torch": {"version": "2.13.0+cpu"}, "os": "Linux",
                          "zili_env": {"ZILI_CPU_ISA": "avx2"}}}
    assert "forced to the avx2 level" in _machine_line(record)
    del record["machine"]["zili_env"]
    assert "forced" not in _machine_line(record)


def test_cli_help_lists_commands():
    from typer.testing import CliRunner

    from zili.bench.cli import bench_app

    result = CliRunner().invoke(bench_app, ["--help"])
    assert result.exit_code == 0
    assert "serve" in result.output and "offline" in result.output
    assert "compare" not in result.output  # the peer tooling is the repository's, not the package's


def test_repository_benchmarks_cli_lists_its_commands():
    from typer.testing import CliRunner

    from benchmarks.__main__ import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("compare", "report", "build-peers", "structured"):
        assert cmd in result.output


class _FakeServer:
    """What benchmarks.compare.server_round reads of a ServerProcess; counts its starts and stops."""

    url, startup_s = "http://fake", 1.5

    def __init__(self, fail_start: bool = False) -> None:
        self.fail_start, self.entered, self.exited = fail_start, 0, 0

    def __enter__(self):
        if self.fail_start:
            raise RuntimeError("no binary")
        self.entered += 1
        return self

    def __exit__(self, *exc) -> None:
        self.exited += 1

    def peak_rss_bytes(self) -> int:
        return 3 * 2**20

    def log_tail(self) -> str:
        return "the server's last words"


def test_server_round_stamps_rows_records_failures_and_always_stops_the_server():
    from benchmarks.compare import server_round

    server, seen = _FakeServer(), []

    def levels(s):
        for c in (1, 4):
            row = {"concurrency": c}
            yield row
            seen.append(dict(row))  # stamped before the level resumes, so it can log them
        raise RuntimeError("level 16 broke")

    rows = server_round("zili", lambda: server, 2, levels)
    assert [r.get("concurrency") for r in rows] == [1, 4, None]
    assert seen == rows[:2] and all(r["engine"] == "zili" and r["round"] == 2 for r in rows)
    assert rows[0]["startup_s"] == 1.5 and rows[0]["peak_rss_mib"] == 3.0
    assert rows[2]["failed"] and "level 16 broke" in rows[2]["error"] and "last words" in rows[2]["server_log_tail"]
    assert server.entered == server.exited == 1

    never = _FakeServer(fail_start=True)
    rows = server_round("llama.cpp", lambda: never, 0, levels)
    assert rows == [{"engine": "llama.cpp", "round": 0, "failed": True, "error": "no binary"}]


def test_compare_names_its_peers_on_a_bad_one():
    from typer.testing import CliRunner

    from benchmarks.__main__ import app

    result = CliRunner().invoke(app, ["compare", "--peers", "llama.cpp,vllm", "--mode", "serve"])
    assert result.exit_code != 0
    assert "zili-spec" in result.output and "'llama.cpp,vllm'" in result.output


HEALTH_SERVER = """
import sys, http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers(); self.wfile.write(b"{}")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_server_process_starts_waits_and_stops():
    import sys

    from benchmarks.peers import ServerProcess, free_port

    port = free_port()
    server = ServerProcess("fake", [sys.executable, "-c", HEALTH_SERVER, str(port)], port, ready_timeout_s=20)
    with server as s:
        assert s.url == f"http://127.0.0.1:{port}" and s.startup_s is not None
        assert s.process.poll() is None
    assert server.process.poll() is not None


def test_server_process_that_dies_reports_its_log():
    import sys

    from benchmarks.peers import ServerProcess, free_port

    port = free_port()
    dying = ServerProcess("dying", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], port,
                          ready_timeout_s=20)
    with pytest.raises(RuntimeError, match="boom"):
        dying.__enter__()


def test_session_peak_rss_counts_the_server_and_its_children():
    import subprocess
    import sys
    import time

    from benchmarks.peers import session_peak_rss

    # A parent holding ~64 MiB that starts a child holding ~128 MiB, in a session of their own.
    code = ("import subprocess, sys, time; a = bytearray(64 * 2**20); "
            "c = subprocess.Popen([sys.executable, '-c', 'b = bytearray(128 * 2**20); import time; time.sleep(30)']); "
            "time.sleep(30)")
    p = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        peak = None
        for _ in range(100):
            time.sleep(0.1)
            peak = session_peak_rss(p.pid)
            if peak and peak > 190 * 2**20:
                break
        assert peak is not None and 190 * 2**20 < peak < 400 * 2**20
        assert session_peak_rss(2**22 + 12345) is None  # no such session
    finally:
        import os
        import signal

        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
