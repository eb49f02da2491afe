"""`zili serve --compile`: the compiled decode step behind the HTTP server (its engine thread, its
batches). The server answers at once, eagerly, while the graphs build in the background; once they
are built, batched answers equal answers alone and equal the eager answers, every block returned."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from tests.e2e.server_process import start_server

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "The three primary colors are"]


@pytest.fixture(scope="module")
def compiled_server(tmp_path_factory):
    # float32 and dense weights, so that the graphs and the eager steps a busy server mixes in (a
    # prefill beside a decode) agree far below any greedy margin: the packed int4 kernels round their
    # inputs to bf16, where a one-ulp difference upstream can flip a near-tie. Two sequences at most,
    # so that exactly the batch-1 and batch-2 graphs are built at start. ZILI_AOT_DECODE=0: this is the
    # in-process torch.compile path (the default AOT package is tests/unit/test_aot_decode.py's, whose
    # end-to-end build costs minutes of a 2-core CI run).
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ZILI_AOT_DECODE", "0")
        srv = start_server(tmp_path_factory, "compiled", ["--compile", "--max-num-seqs", "2", "--dtype", "float32",
                                                          "--quantization", "none", "--log-level", "info"])
    yield srv
    srv.stop()


def _complete(server, prompt: str) -> list[str]:
    reply = server.openai().completions.create(model="smollm2-135m", prompt=prompt, max_tokens=16, temperature=0,
                                               logprobs=1)
    return reply.choices[0].logprobs.tokens


def _wait_for_log(server, text: str, timeout: float = 600.0) -> bool:
    deadline = time.monotonic() + timeout
    while text not in server.log_tail(50000):
        if time.monotonic() > deadline or server.proc.poll() is not None:
            return False
        time.sleep(1.0)
    return True


def test_compiled_server_batches_like_alone(compiled_server):
    log = compiled_server.log_tail(50000)
    assert "serving eagerly while the decode step compiles in the background for batch sizes [1, 2]" in log
    eager = _complete(compiled_server, PROMPTS[0])  # healthy and answering before any graph is needed
    assert eager[0] == " Paris"
    assert _wait_for_log(compiled_server, "compiled the decode step for batch sizes [1, 2]"), \
        compiled_server.log_tail(4000)
    alone = [_complete(compiled_server, p) for p in PROMPTS]  # the batch-1 graph
    assert alone[0] == eager
    assert alone[0][0] == " Paris"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # two at a time (the batch-2 graph), two queued
        batched = list(pool.map(lambda p: _complete(compiled_server, p), PROMPTS))
    assert batched == alone
    m = compiled_server.wait_idle()
    assert m["zili_kv_cache_free_blocks"] == m["zili_kv_cache_total_blocks"]


def test_sigterm_while_the_graphs_build_exits_0(tmp_path_factory):
    """A server stopped while its decode step still compiles in the background exits 0, as a drained
    server does (the interpreter's teardown around the compiler's thread used to abort it: -6)."""
    srv = start_server(tmp_path_factory, "compiling", ["--compile", "--max-num-seqs", "2", "--log-level", "info"])
    try:
        assert "compiled the decode step" not in srv.log_tail(50000)  # still building
        code = srv.stop(timeout=120)
    finally:
        srv.stop()
    assert code == 0, srv.log_path.read_text(errors="replace")[-3000:]
    assert "exiting without waiting for the decode step's background compile" in srv.log_path.read_text()
