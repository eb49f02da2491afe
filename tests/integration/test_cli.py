"""The `zili` command as a new user runs it: real processes, real output."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest

from tests.tiny_models import write_tiny_llama

ZILI = [sys.executable, "-m", "zili.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(write_tiny_llama(tmp_path_factory.mktemp("cli-tiny")))


def zili(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(ZILI + list(args), input=stdin, capture_output=True, text=True, timeout=timeout, env=ENV)


def test_generate_prints_the_greedy_completion(tiny):
    from zili import LLM, SamplingParams

    expected = LLM(tiny, dtype="float32").generate("Hello", SamplingParams(temperature=0, max_tokens=12))[0]
    run = zili("generate", "Hello", "--model", tiny, "--max-tokens", "12", "--dtype", "float32")
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected.outputs[0].text + "\n"


def test_models_lists_the_default_alias():
    run = zili("models")
    assert run.returncode == 0
    assert "smollm2-135m" in run.stdout and ".gguf" in run.stdout


@pytest.mark.parametrize("args,needle", [
    (["generate", "hi", "--model", "/no/such/model.gguf"], "/no/such/model.gguf"),
    (["generate", "hi", "--model", "no-such-alias"], "smollm2-135m"),
    (["generate", "hi", "--top-p", "0"], "top_p"),
    (["generate", "hi", "--temperature", "-1"], "temperature"),
])
def test_bad_input_gives_one_clear_error(args, needle):
    run = zili(*args)
    assert run.returncode == 2
    assert "error:" in run.stderr and needle in run.stderr
    assert "Traceback" not in run.stderr


def test_chat_keeps_the_conversation_and_resets(tiny):
    run = zili("chat", "--model", tiny, "--max-tokens", "8", "--temperature", "0",
               stdin="hello\nagain\n/reset\nfresh\n/exit\n")
    assert run.returncode == 0, run.stderr
    assert "(conversation cleared)" in run.stderr
    answers = [a for a in run.stdout.split(">>> ") if a.strip()]
    assert len(answers) == 3
    # After /reset the history is gone: "fresh" is answered as in a brand-new session, while
    # "again" was answered with "hello" in its context.
    alone = [a for a in zili("chat", "--model", tiny, "--max-tokens", "8", "--temperature", "0",
                             stdin="fresh\n/exit\n").stdout.split(">>> ") if a.strip()]
    assert answers[2] == alone[0]
    again_alone = [a for a in zili("chat", "--model", tiny, "--max-tokens", "8", "--temperature", "0",
                                   stdin="again\n/exit\n").stdout.split(">>> ") if a.strip()]
    assert answers[1] != again_alone[0]


def test_ctrl_c_stops_an_answer_but_not_the_session(tmp_path):
    # An answer that cannot end before the SIGINT: the tiny model's own answer (~500 bytes, then its end
    # token) was over in under a second, before this process sent the signal (in full runs, twice).
    # --ignore-eos and a 16k context make it run for tens of seconds.
    long = str(write_tiny_llama(tmp_path / "long", max_position_embeddings=16384))
    proc = subprocess.Popen(ZILI + ["chat", "--model", long, "--max-tokens", "16000", "--temperature", "0",
                                    "--ignore-eos", "--kv-cache-memory", "64MiB"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        proc.stdin.write("tell me a long story\n")
        proc.stdin.flush()
        deadline, seen = time.monotonic() + 90, b""
        while time.monotonic() < deadline and len(seen) < 20:  # wait until the answer is streaming
            ready, _, _ = select.select([proc.stdout], [], [], 0.1)
            if ready:
                seen += os.read(proc.stdout.fileno(), 4096)
        assert len(seen) >= 20, "no streamed output"
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.stdin.write("/exit\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "(stopped)" in err
    assert proc.returncode == 0
