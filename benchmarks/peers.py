"""Peers started by the suite itself: llama.cpp (llama-server, llama-bench) and zili's own server.

llama.cpp is built from the llama-cpp-python sdist on PyPI by scripts/build_llama_cpp.sh into a
cache directory and reused from there. Servers listen on a free loopback port and are stopped
when the `with` block ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zili.bench.machine import cpu_info
from zili.bench.serve import wait_until_ready

LLAMA_CPP_VERSION = "0.3.36"  # llama-cpp-python release whose sdist vendors llama.cpp 0c1e57098
REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_llama_cpp.sh"


def llama_cpp_root() -> Path:
    if os.environ.get("ZILI_LLAMA_CPP_DIR"):
        return Path(os.environ["ZILI_LLAMA_CPP_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "zili" / "llama.cpp"


def find_llama_cpp(version: str = LLAMA_CPP_VERSION) -> Path | None:
    """The bin directory holding llama-server and llama-bench, when already built."""
    bin_dir = llama_cpp_root() / version / "bin"
    if (bin_dir / "llama-server").is_file() and (bin_dir / "llama-bench").is_file():
        return bin_dir
    return None


def ensure_llama_cpp(version: str = LLAMA_CPP_VERSION, build: bool = True) -> Path:
    """Find llama.cpp, building it (10-20 min on 2 cores) when missing and `build` is true."""
    found = find_llama_cpp(version)
    if found:
        return found
    if not build:
        raise FileNotFoundError(f"llama.cpp {version} is not built under {llama_cpp_root()}; "
                                f"run {BUILD_SCRIPT} {version} (or pass --build-peers)")
    env = dict(os.environ, PIP=f"{sys.executable} -m pip", ZILI_LLAMA_CPP_DIR=str(llama_cpp_root()))
    print(f"building llama.cpp {version} with {BUILD_SCRIPT} (logs on stderr)...", file=sys.stderr)
    subprocess.run(["bash", str(BUILD_SCRIPT), version], check=True, env=env, stdout=subprocess.DEVNULL)
    found = find_llama_cpp(version)
    if not found:
        raise RuntimeError(f"{BUILD_SCRIPT} finished but llama-server / llama-bench are missing")
    return found


def repack_default() -> bool:
    """Whether llama.cpp may repack weights into its extra CPU buffer types. Off on CPUs with AMX:
    in this build (llama-cpp-python 0.3.36, GGML_NATIVE=ON) the first matmul segfaults inside
    ggml_backend_amx_mul_mat on a Sapphire Rapids VM (seen 2026-11-23, gdb backtrace), so both
    llama-server and llama-bench run with repacking off there."""

    return "amx_tile" not in cpu_info()["flags"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A server started as a subprocess on 127.0.0.1; a context manager that waits for readiness
    on entry and stops the process (SIGTERM, then SIGKILL) on exit."""

    name: str
    argv: list[str]
    port: int
    ready_timeout_s: float = 600.0
    env: dict[str, str] | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    log_path: Path | None = None
    startup_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerProcess":
        log = tempfile.NamedTemporaryFile(prefix=f"zili-bench-{self.name}-", suffix=".log", delete=False)
        self.log_path = Path(log.name)
        t0 = time.perf_counter()
        self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=True)
        log.close()
        try:
            asyncio.run(wait_until_ready(self.url, self.ready_timeout_s, self.process))
        except BaseException:
            self.stop()
            raise RuntimeError(f"{self.name} did not start; last log lines:\n{self.log_tail()}") from None
        self.startup_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self, timeout_s: float = 30.0) -> None:
        p = self.process
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def peak_rss_bytes(self) -> int | None:
        """Peak resident memory (VmHWM) summed over the server's process session: the server and
        any helpers it started (compile workers, tensor-parallel ranks). None where /proc is absent."""
        if self.process is None:
            return None
        return session_peak_rss(self.process.pid)

    def log_tail(self, n: int = 20) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def llama_server(model_path: Path, parallel: int, ctx_per_slot: int = 512, threads: int = 2,
                 bin_dir: Path | None = None, port: int | None = None, extra_args: list[str] | None = None,
                 repack: bool | None = None) -> ServerProcess:
    """llama-server with `parallel` slots of `ctx_per_slot` tokens each and its prompt cache off
    (`--cache-ram 0`: otherwise its RSS climbs across a run)."""
    bin_dir = bin_dir or ensure_llama_cpp()
    port = port or free_port()
    argv = [str(bin_dir / "llama-server"), "-m", str(model_path), "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(parallel), "-c", str(parallel * ctx_per_slot), "-t", str(threads),
            "--cache-ram", "0", "--no-webui"]
    if not (repack_default() if repack is None else repack):
        argv.append("--no-repack")
    return ServerProcess("llama-server", argv + list(extra_args or []), port)


def zili_server(model: str, port: int | None = None, max_num_seqs: int | None = None,
                extra_args: list[str] | None = None, threads: int | None = None,
                env: dict[str, str] | None = None) -> ServerProcess:
    """`zili serve MODEL --port P`, from the same environment as this process plus `env`."""
    port = port or free_port()
    exe = Path(sys.executable).with_name("zili")
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "zili.cli"]
    argv = [*head, "serve", model, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if max_num_seqs:
        argv += ["--max-num-seqs", str(max_num_seqs)]
    env = dict(os.environ, **(env or {}))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return ServerProcess("zili", argv + list(extra_args or []), port, env=env)


# --- llama-bench -------------------------------------------------------------------------------

def run_llama_bench(model_path: Path, n_prompt: int = 512, n_gen: int = 128, threads: int = 2, repetitions: int = 3,
                    bin_dir: Path | None = None, timeout_s: float = 1800.0, repack: bool | None = None) -> list[dict]:
    """Run llama-bench (-o json) for pp{n_prompt} and tg{n_gen}; return parse_llama_bench's rows."""
    bin_dir = bin_dir or ensure_llama_cpp()
    argv = [str(bin_dir / "llama-bench"), "-m", str(model_path), "-p", str(n_prompt), "-n", str(n_gen),
            "-t", str(threads), "-r", str(repetitions), "-o", "json",
            "--repack", "1" if (repack_default() if repack is None else repack) else "0"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return parse_llama_bench(proc.stdout)


def parse_llama_bench(text: str) -> list[dict]:
    """llama-bench's JSON (a list of test records) -> [{"test": "pp512"|"tg128", "tokens_per_s", "samples_ts",
    "n_prompt", "n_gen", "threads", "build_commit", "model_type"}]."""
    start = text.find("[")
    records = json.loads(text[start:]) if start >= 0 else []
    rows = []
    for rec in records:
        n_prompt, n_gen = int(rec.get("n_prompt", 0)), int(rec.get("n_gen", 0))
        test = f"pp{n_prompt}" if n_gen == 0 else f"tg{n_gen}" if n_prompt == 0 else f"pp{n_prompt}+tg{n_gen}"
        rows.append({
            "test": test,
            "tokens_per_s": float(rec["avg_ts"]),
            "stddev_tokens_per_s": float(rec.get("stddev_ts", 0.0)),
            "samples_ts": [float(x) for x in rec.get("samples_ts", [])],
            "n_prompt": n_prompt,
            "n_gen": n_gen,
            "threads": rec.get("n_threads"),
            "build_commit": rec.get("build_commit"),
            "model_type": rec.get("model_type"),
        })
    return rows


def session_peak_rss(session_id: int) -> int | None:
    """Sum of VmHWM over the live processes whose session id is `session_id` (Linux /proc)."""
    total, found = 0, False
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return None
    for pid in entries:
        try:
            with open(f"/proc/{pid}/stat") as f:
                # Fields after the parenthesised command name: state ppid pgrp session ...
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) != session_id:
                continue
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
                        found = True
                        break
        except (OSError, ValueError, IndexError):
            continue  # a process that ended meanwhile
    return total if found else None
