"""`python -m benchmarks compare`: zili against its peers on one model file and one workload, interleaved
(A B A B ... for `repeats` rounds) so that drift in a shared machine's speed hits both sides;
reports medians per engine and ratios zili / peer (above 1: zili is faster, for throughputs)."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from zili.bench.cost import CostBasis, cost_figures, dollars_per_million
from zili.bench.machine import load_average
from zili.bench.results import with_cost
from zili.bench.serve import LoadSpec, default_num_prompts, discover_model_name, run_load, warm_up
from zili.bench.stats import median, ratio
from zili.bench.workload import LengthSpec, make_requests

# Figures summarized per engine and level: (name in the summary, getter from a run row).
SERVE_FIGURES: dict[str, Callable[[dict], float | None]] = {
    "output_throughput": lambda r: r.get("output_throughput"),
    "total_token_throughput": lambda r: r.get("total_token_throughput"),
    "request_throughput": lambda r: r.get("request_throughput"),
    "input_throughput": lambda r: r.get("input_throughput"),
    "ttft_p50_ms": lambda r: r["ttft_ms"]["p50"],
    "ttft_p90_ms": lambda r: r["ttft_ms"]["p90"],
    "ttft_p99_ms": lambda r: r["ttft_ms"]["p99"],
    "itl_p50_ms": lambda r: r["itl_ms"]["p50"],
    "itl_p90_ms": lambda r: r["itl_ms"]["p90"],
    "itl_p99_ms": lambda r: r["itl_ms"]["p99"],
    "tpot_p50_ms": lambda r: r["tpot_ms"]["p50"],
    # the machine's 1-minute load average when the level ended: how much else was running
    "load_1min_after": lambda r: (r.get("load_average_after") or [None])[0],
    # the server's peak resident memory so far (its whole process session, /proc VmHWM), in MiB
    "peak_rss_mib": lambda r: r.get("peak_rss_mib"),
}
# Costs of a summary row are those of the median throughput (not medians of per-run costs).
SERVE_COSTS = {"usd_per_1m_output_tokens": "output_throughput", "usd_per_1m_input_tokens": "input_throughput"}
HIGHER_IS_BETTER = ("output_throughput", "total_token_throughput", "request_throughput", "tokens_per_s")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def summarize_runs(runs: Sequence[dict], group_keys: Sequence[str], figures: dict[str, Callable[[dict], Any]],
                   baseline: str = "zili", costs: Mapping[str, Callable[[dict], float | None]] | None = None
                   ) -> list[dict[str, Any]]:
    """Median of each figure per (group, engine) across rounds, plus the ratio baseline / peer.
    `costs`: name -> function of the engine's medians (e.g. $ per 1M tokens of the median tok/s)."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for run in runs:
        if run.get("failed"):
            continue
        key = tuple(run.get(k) for k in group_keys)
        groups.setdefault(key, {}).setdefault(run["engine"], []).append(run)
    out = []
    for key, by_engine in groups.items():
        medians = {eng: {name: median(get(r) for r in rows) for name, get in figures.items()}
                   for eng, rows in by_engine.items()}
        for m in medians.values():
            m.update({name: fn(m) for name, fn in (costs or {}).items()})
        row: dict[str, Any] = dict(zip(group_keys, key))
        row["rounds"] = {eng: len(rows) for eng, rows in by_engine.items()}
        row["medians"] = medians
        if baseline in medians:
            row["ratios"] = {peer: {name: ratio(medians[baseline][name], m[name]) for name in medians[baseline]}
                             for peer, m in medians.items() if peer != baseline}
        out.append(row)
    return out


# --- serving -------------------------------------------------------------------------------------

@dataclass
class ServeWorkload:
    concurrencies: list[int]
    input_len: LengthSpec
    output_len: LengthSpec
    num_prompts: int | None = None  # per level; None: default_num_prompts(c, waves)
    waves: int = 2
    min_prompts: int = 4
    vocab_size: int = 32000
    seed: int = 0
    warmup: int = 2
    timeout_s: float = 600.0


def server_round(name: str, start_server: Callable[[], Any], round_index: int,
                 levels: Callable[[Any], Iterator[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Start one engine's server (`start_server()`: a context manager giving a ServerProcess), run
    `levels(server)`, stop the server. `levels` warms the server up, then yields one row per level;
    each row is stamped with `engine`, `round`, the server's `startup_s` and its `peak_rss_mib` so far
    before `levels` resumes (so it may log them). A server that will not start, or a level that raises,
    ends the round with a row marked "failed" (recorded, not fatal: the other engines still run)."""
    rows: list[dict[str, Any]] = []
    try:
        server_cm = start_server()
        server = server_cm.__enter__()
    except Exception as e:
        log(f"[{name}] failed to start: {e}")
        return [{"engine": name, "round": round_index, "failed": True, "error": str(e)[:2000]}]
    try:
        for row in levels(server):
            rss = server.peak_rss_bytes()
            row.update(engine=name, round=round_index, startup_s=server.startup_s,
                       peak_rss_mib=rss / 2**20 if rss else None)
            rows.append(row)
    except Exception as e:
        log(f"[{name}] run failed: {type(e).__name__}: {e}\n{server.log_tail()}")
        rows.append({"engine": name, "round": round_index, "failed": True, "error": str(e)[:2000],
                     "server_log_tail": server.log_tail()})
    finally:
        server_cm.__exit__(None, None, None)
    return rows


def serve_round(name: str, start_server: Callable[[], Any], workload: ServeWorkload, round_index: int,
                basis: CostBasis) -> list[dict]:
    """One engine's round of the serving comparison (server_round): warm-up, then every concurrency level."""

    def levels(server: Any) -> Iterator[dict[str, Any]]:
        model = asyncio.run(discover_model_name(server.url))
        warm = make_requests(workload.warmup, LengthSpec(16, 16), LengthSpec(8, 8), vocab_size=workload.vocab_size,
                             seed=10_000_000 + round_index)
        errors = asyncio.run(warm_up(server.url, model, warm, timeout_s=workload.timeout_s))
        if errors:
            raise RuntimeError(f"warm-up failed: {errors[0]}")
        for level, c in enumerate(workload.concurrencies):
            n = workload.num_prompts or default_num_prompts(c, workload.waves, workload.min_prompts)
            # A fresh seed per round and level: no prompt repeats, so no prefix cache helps anyone;
            # the same seed for every engine in a round: they answer the same requests.
            reqs = make_requests(n, workload.input_len, workload.output_len, vocab_size=workload.vocab_size,
                                 seed=workload.seed + 1000 * round_index + level)
            row = asyncio.run(run_load(server.url, model, reqs, LoadSpec(concurrency=c), timeout_s=workload.timeout_s))
            yield with_cost(row, basis)
            log(f"[round {round_index}] {name:10s} c={c:<3d} out {row['output_throughput']:.1f} tok/s  "
                f"TTFT p50 {_fmt(row['ttft_ms']['p50'])} ms  ITL p50 {_fmt(row['itl_ms']['p50'])} ms  "
                f"errors {row['errors']}  short {row['short_outputs']}  peak RSS {_fmt(row['peak_rss_mib'])} MiB  "
                f"load {row['load_average_after']}")

    return server_round(name, start_server, round_index, levels)


def compare_serve(engines: dict[str, Callable[[], Any]], workload: ServeWorkload, repeats: int,
                  basis: CostBasis) -> tuple[list[dict], list[dict]]:
    """engines: name -> a callable returning a ServerProcess (a context manager). In each round every
    engine runs in the given order (A B, A B, ...)."""
    runs: list[dict] = []
    for r in range(repeats):
        for name, start in engines.items():
            runs += serve_round(name, start, workload, r, basis)
    return runs, summarize_serve(runs, basis)


def summarize_serve(runs: Sequence[dict], basis: CostBasis) -> list[dict[str, Any]]:
    costs = {name: (lambda m, key=key: dollars_per_million(m[key], basis.price_per_hour))
             for name, key in SERVE_COSTS.items()}
    return summarize_runs(runs, ["concurrency"], SERVE_FIGURES, costs=costs)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


# --- offline (single stream) --------------------------------------------------------------------

@dataclass
class SingleStreamPeer:
    """An engine measured in-process or by a tool: `run(round_index) -> {test: {"tokens_per_s", "samples_ts"}}`."""

    name: str
    run: Callable[[int], dict[str, dict[str, Any]]]
    info: dict[str, Any] = field(default_factory=dict)


def compare_single_stream(peers: Sequence[SingleStreamPeer], repeats: int, basis: CostBasis
                          ) -> tuple[list[dict], list[dict]]:
    runs: list[dict] = []
    for r in range(repeats):
        for peer in peers:
            before = load_average()
            try:
                tests = peer.run(r)
            except Exception as e:
                log(f"[round {r}] {peer.name}: failed: {e}")
                runs.append({"engine": peer.name, "round": r, "failed": True, "error": str(e)[:2000]})
                continue
            after = load_average()
            for test, fig in tests.items():
                row = {"engine": peer.name, "round": r, "test": test, **fig,
                       "load_average_before": before, "load_average_after": after}
                tps = fig["tokens_per_s"]
                # pp: the tokens are input tokens; tg: output tokens.
                row["cost"] = cost_figures(tps if test.startswith("tg") else None,
                                           tps if test.startswith("pp") else None, basis)
                runs.append(row)
                log(f"[round {r}] {peer.name:22s} {test:6s} {tps:8.1f} tok/s  load {after}")
    return runs, summarize_single_stream(runs, basis)


def summarize_single_stream(runs: Sequence[dict], basis: CostBasis) -> list[dict[str, Any]]:
    """Per test: median tok/s per engine; $ per 1M tokens of that median (input tokens for ppN,
    output tokens for tgN)."""
    costs = {"usd_per_1m_tokens": lambda m: dollars_per_million(m["tokens_per_s"], basis.price_per_hour)}
    figures = {"tokens_per_s": lambda r: r.get("tokens_per_s"),
               "load_1min_after": lambda r: (r.get("load_average_after") or [None])[0]}
    return summarize_runs(runs, ["test"], figures, costs=costs)


