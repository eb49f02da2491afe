"""The Triton kernels, checked without a GPU: their correctness cases run under TRITON_INTERPRET=1 in a
fresh process (test_triton_cases.py), and every kernel compiles for sm_90 at real model shapes
(ptxas ships with triton; compiling needs no GPU). Running them on a GPU is a separate, manual step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import IO

import pytest
import triton  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[2]


def _env(interpret: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silences a deprecation warning of triton 3.9
    env["ZILI_TEST_PREBUILD_KERNELS"] = "0"  # the outer session builds the kernel levels
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def _run(args: list[str], interpret: bool, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=_env(interpret), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


INTERPRETER_ARGS = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit/test_triton_cases.py"]
_interpreter: tuple[subprocess.Popen, IO[str]] | None = None


def start_in_background() -> None:
    """Start the interpreter run (~70 s of one core) at nice 19, its output to a temporary file. Called by
    tests/conftest.py when the session's selected tests include this module's, so that the run takes the
    CPU time the earlier tests leave idle; the test below starts it itself if that has not happened."""
    global _interpreter
    if _interpreter is None:
        log = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(["nice", "-n", "19", sys.executable, *INTERPRETER_ARGS], env=_env(True), cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        _interpreter = (proc, log)


def stop_background() -> None:
    """End a run still going (the session is over, or the test was not reached)."""
    if _interpreter is not None and _interpreter[0].poll() is None:
        os.killpg(_interpreter[0].pid, signal.SIGKILL)
        _interpreter[0].wait()


def test_kernels_match_reference_under_interpreter():
    # ~70 s of CPU; 10 min of wall time seen on a loaded 2-core host
    start_in_background()
    assert _interpreter is not None
    proc, log = _interpreter
    try:
        returncode = proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        stop_background()
        raise
    log.seek(0)
    out = log.read()
    tail = out[-6000:]
    assert returncode == 0, tail
    assert " passed" in out and "skipped" not in out.strip().splitlines()[-1], tail


COMPILE_SCRIPT = textwrap.dedent('''
    import inspect
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from zili.kernels import triton_attention as ta, triton_mla as tm

    def compile_for(fn, consts, pointer_types):
        sig = {}
        for name in inspect.signature(fn.fn).parameters:
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = pointer_types.get(name, "*bf16")
            else:
                sig[name] = "fp32" if name == "qk_scale" else "i32"
        return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))

    idx = {"tables_ptr": "*i64", "seq_lens_ptr": "*i64", "qsl_ptr": "*i64", "slot_ptr": "*i64",
           "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32"}
    compile_for(ta._write_kv_kernel, dict(PAGE=16, D=128, BLOCK_D=128, QUANT=False, QMAX=127.0, INT8=True), idx)
    for window in (0, 512):  # full attention, and a Gemma 3 local layer's sliding window
        compile_for(ta._prefill_kernel, dict(PAGE=16, GROUP=4, D=128, BLOCK_D=128, BLOCK_M=64, BLOCK_N=64,
                                             PRECISE=False, WINDOW=window, QUANT=False), idx)
        compile_for(ta._decode_kernel, dict(PAGE=16, GROUP=4, BLOCK_G=16, D=128, BLOCK_D=128, BLOCK_N=64, SPLITS=4,
                                            PRECISE=False, WINDOW=window, QUANT=False), idx)
    compile_for(ta._combine_kernel, dict(D=128, BLOCK_D=128, SPLITS=4), idx)
    k = compile_for(tm._mla_decode_kernel, dict(PAGE=64, R=512, BLOCK_R=512, DR=64, BLOCK_DR=64, BLOCK_H=16,
                                                 BLOCK_N=32, SPLITS=1, PRECISE=False, QUANT=False), idx)
    # Quantized caches (kv_quant's rows): int8 and fp8 e4m3 elements, a bf16 scale per row.
    for cache_type, qmax in (("*i8", 127.0), ("*fp8e4nv", 448.0)):
        qidx = dict(idx, cache_ptr=cache_type)
        compile_for(ta._write_kv_kernel, dict(PAGE=16, D=128, BLOCK_D=128, QUANT=True, QMAX=qmax,
                                              INT8=cache_type == "*i8"), qidx)
        compile_for(ta._prefill_kernel, dict(PAGE=16, GROUP=4, D=128, BLOCK_D=128, BLOCK_M=64, BLOCK_N=64,
                                             PRECISE=False, WINDOW=0, QUANT=True), qidx)
        compile_for(ta._decode_kernel, dict(PAGE=16, GROUP=4, BLOCK_G=16, D=128, BLOCK_D=128, BLOCK_N=64, SPLITS=4,
                                            PRECISE=False, WINDOW=0, QUANT=True), qidx)
        compile_for(tm._mla_decode_kernel, dict(PAGE=64, R=512, BLOCK_R=512, DR=64, BLOCK_DR=64, BLOCK_H=16,
                                                BLOCK_N=32, SPLITS=1, PRECISE=False, QUANT=True), qidx)
    print("ok", k.metadata.shared)
''')


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Real Llama-8B / DeepSeek shapes through the GPU compiler (no GPU needed to compile)."""
    done = _run(["-c", COMPILE_SCRIPT], interpret=False, timeout=900)  # cold: minutes on a loaded 2-core host
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
