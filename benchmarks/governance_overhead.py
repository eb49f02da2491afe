"""Serving throughput with governance (database key, quotas, usage ledger) on vs off.

Starts two `zili serve` processes on loopback ports with the same engine options: "off" guards
/v1 with a static --api-key only; "on" has an admin key, a SQLite database and a database key
whose quotas (rpm, tpm, tokens per day, concurrency) are checked on every request but never hit,
so every request goes through admission, the ledger writer and the per-key metrics. Then it runs
`zili bench serve` against them alternately (on, off, off, on, ...), each run its own record under
benchmarks/results, and prints the on/off ratio of output throughput per round and overall.

    .venv/bin/python benchmarks/governance_overhead.py --rounds 3 --concurrency 32
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from zili.governance.db import open_database
from zili.governance.keys import KeyStore

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
STATIC_KEY = "bench-static-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(name: str, args: list[str], log_dir: Path, model: str, engine_args: list[str]
           ) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "zili.server.launcher", model, "--port", str(port), "--served-model-name", MODEL,
           *engine_args, *args, "--log-level", "warning"]
    log = open(log_dir / f"{name}.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} server exited: {(log_dir / f'{name}.log').read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{name} server did not become healthy")


def _bench(url: str, key: str, label: str, args: argparse.Namespace) -> Path:
    before = set((REPO / "benchmarks" / "results").glob("*.json"))
    cmd = [sys.executable, "-m", "zili.cli", "bench", "serve", "--url", url, "--model", MODEL, "--vocab-size",
           "49152", "-c", str(args.concurrency), "-n", str(args.num_prompts), "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--label", label, "--api-key", key,
           "--note", f"governance overhead: {label} (benchmarks/governance_overhead.py)"]
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    (path,) = set((REPO / "benchmarks" / "results").glob("*.json")) - before
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL, help="What both servers load (a path, an alias).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--engine-args", default="--enforce-eager --max-model-len 2048 --kv-cache-memory 512MiB",
                        help="Options given to both servers.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zili-gov-bench-"))
    db_url = f"sqlite:///{work / 'zili.db'}"
    _, secret = KeyStore(open_database(db_url)).create(
        "bench", rpm=10**6, tpm=10**9, tokens_per_day=10**12, max_concurrency=1024)
    engine_args = args.engine_args.split()
    servers = {
        "off": _start("off", ["--api-key", STATIC_KEY], work, args.model, engine_args),
        "on": _start("on", ["--admin-key", "bench-admin", "--database-url", db_url, "--api-key", STATIC_KEY], work,
                     args.model, engine_args),
    }
    keys = {"off": STATIC_KEY, "on": secret}
    records: dict[str, list[Path]] = {"on": [], "off": []}
    try:
        for r in range(args.rounds):
            for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
                records[mode].append(_bench(servers[mode][1], keys[mode], f"governance-{mode}", args))
        ledger = httpx.get(servers["on"][1] + "/admin/v1/usage", params={"by": "key"},
                           headers={"Authorization": "Bearer bench-admin"}, timeout=60).json()["data"]
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers.values():
            proc.wait(120)
    tput = {m: [json.loads(p.read_text())["runs"][0]["output_throughput"] for p in ps] for m, ps in records.items()}
    ratios = [on / off for on, off in zip(tput["on"], tput["off"])]
    print(json.dumps({"output_tok_s": tput, "ratio_per_round": ratios,
                      "ratio_of_medians": statistics.median(tput["on"]) / statistics.median(tput["off"]),
                      "ledger": ledger, "records": {m: [p.name for p in ps] for m, ps in records.items()}},
                     indent=2))


if __name__ == "__main__":
    main()
