"""Engine step time against position: does a step's host work grow with the tokens generated?

A tiny random-weight Llama (1 layer, hidden 64, the torch "sdpa" attention so that no C++ kernel
build differs between the commits compared) keeps the model's own cost small, 32 streams each
generate `--tokens` tokens greedily, and every decode step is timed twice: the whole
`Engine.step()` and, inside it, the executor's forward (`runner.execute`). Their difference is the
engine's host-side work (scheduling, sampling, output processing). The steps are grouped by
position (tokens generated so far per stream) and each group's median is reported.

Runs against whichever zili is on the path, so a before/after pair is two runs of this script:

    .venv/bin/python benchmarks/engine_step_curve.py --tag after
    PYTHONPATH=/tmp/base/src .venv/bin/python benchmarks/engine_step_curve.py --tag before

and `--plot A.json B.json` draws the records onto one PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.tiny_models


def build(model_dir: Path, streams: int, tokens: int) -> Any:
    import zili
    from zili.config import EngineConfig

    config = EngineConfig(model=str(model_dir), dtype="float32", max_num_seqs=streams, max_model_len=tokens + 64,
                          enforce_eager=True, use_tune_cache=False, threads=1, attention_backend="sdpa",
                          kv_cache_memory=streams * (tokens + 64) * 2 * 2 * 16 * 4 + 2**20)
    try:
        from zili.engine.builder import build_engine
    except ImportError:  # before engine/builder.py existed
        from zili.engine.engine import Engine

        engine = Engine(config)  # type: ignore[arg-type]  # the pre-builder Engine took the config
    else:
        engine = build_engine(config)
    print(f"zili from {zili.__file__}", file=sys.stderr)
    return engine


def run(streams: int, tokens: int, buckets: int) -> dict[str, Any]:
    from tests.tiny_models import write_tiny_llama
    from zili.sampling import SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_llama(Path(tmp) / "tiny", num_hidden_layers=1, max_position_embeddings=tokens + 64)
        engine = build(model_dir, streams, tokens)
    runner = engine.runner
    forward = [0.0]
    execute = runner.execute

    def timed_execute(step):
        start = time.perf_counter()
        out = execute(step)
        forward[0] += time.perf_counter() - start
        return out

    runner.execute = timed_execute
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for i in range(streams):
        engine.add_request(f"s{i}", [1 + (i * 7 + j) % 200 for j in range(8)], params)
    rows = []  # (position, step seconds, forward seconds)
    position = 0
    while engine.has_unfinished_requests():
        forward[0] = 0.0
        start = time.perf_counter()
        engine.step()
        total = time.perf_counter() - start
        if engine.scheduler.waiting or position == 0:  # prefill steps are not decode steps
            position += 1
            continue
        rows.append((position, total, forward[0]))
        position += 1
    width = max(1, tokens // buckets)
    table = []
    for b in range(buckets):
        part = [r for r in rows if b * width <= r[0] < (b + 1) * width]
        if not part:
            continue
        table.append({"from": b * width, "to": (b + 1) * width, "steps": len(part),
                      "step_ms": round(1e3 * statistics.median(r[1] for r in part), 3),
                      "forward_ms": round(1e3 * statistics.median(r[2] for r in part), 3),
                      "host_ms": round(1e3 * statistics.median(r[1] - r[2] for r in part), 3)})
    return {"streams": streams, "tokens": tokens, "buckets": table}


def commit() -> str:
    import zili

    try:
        return subprocess.run(["git", "-C", str(Path(zili.__file__).parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def plot(paths: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for path in paths:
        rec = json.loads(path.read_text())
        xs = [(b["from"] + b["to"]) / 2 for b in rec["buckets"]]
        ax.plot(xs, [b["host_ms"] for b in rec["buckets"]], marker="o", label=f"{rec['tag']} host (step - forward)")
        ax.plot(xs, [b["step_ms"] for b in rec["buckets"]], linestyle="--", label=f"{rec['tag']} whole step")
    ax.set_xlabel("tokens generated per stream")
    ax.set_ylabel("ms per step (median)")
    ax.set_title(f"Engine.step() at {rec['streams']} streams, tiny random model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--buckets", type=int, default=8)
    parser.add_argument("--tag", default="run")
    parser.add_argument("--out", type=Path, default=None, help="JSON record (default benchmarks/results/...)")
    parser.add_argument("--plot", type=Path, nargs="+", default=None, help="records to draw instead of running")
    parser.add_argument("--png", type=Path, default=ROOT / "benchmarks" / "plots" / "engine-step-curve.png")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot, args.png)
        print(args.png)
        return
    record = {"tag": args.tag, "commit": commit(), "command": " ".join(sys.argv), **run(args.streams, args.tokens,
                                                                                          args.buckets)}
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = args.out or ROOT / "benchmarks" / "results" / f"{stamp}-engine-step-curve-{args.tag}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    print(out, file=sys.stderr)


if __name__ == "__main__":
    main()
