"""`python -m benchmarks report`: BENCHMARKS.md tables and PNG plots from every JSON record in benchmarks/results/.

The newest `compare` record leads the page (tables + plots); older records are listed with their
command, commit and machine load, so every figure can be traced to the run that made it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from benchmarks.compare import summarize_serve, summarize_single_stream
from zili.bench.cost import DEFAULT_PRICE_PER_HOUR, DEFAULT_PRICE_SOURCE, CostBasis
from zili.bench.results import load_records

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
PLOTS_DIR = REPO_ROOT / "benchmarks" / "plots"
REPORT_PATH = REPO_ROOT / "BENCHMARKS.md"
ENGINE_ORDER = ("zili", "llama.cpp", "transformers-bfloat16", "transformers-float32", "roofline")

REPRODUCE = """\
```bash
make setup                                   # venv + zili + the default model (smollm2-135m, GGUF Q4_1)
.venv/bin/pip install matplotlib             # for the plots
scripts/build_llama_cpp.sh                   # llama.cpp peer, once (~10-20 min on 2 cores; cached)
.venv/bin/python -m benchmarks compare --repeats 5   # pp512/tg128 + serving at c=1,4,16,32, 128 in / 128 out (~35 min)
.venv/bin/python -m benchmarks report # this page and benchmarks/plots/*.png
```

On a machine with a GPU (a zili platform other than the CPU), the peers are HF transformers and the
memory-bandwidth roofline: `python -m benchmarks compare --mode offline --peers transformers,roofline` and
`zili bench offline --peers transformers` (roofline included). `benchmarks/gpu/*.sh` run the GPU
measurements below (an 8B-shaped model with random weights, the default model offline and served)."""


def _num(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"**{x:.2f}×**"


def _engines(names: Sequence[str]) -> list[str]:
    known = [e for e in ENGINE_ORDER if e in names]
    return known + sorted(n for n in names if n not in known)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _load_span(record: dict) -> str:
    m = record.get("machine", {})
    start, end = m.get("load_average"), m.get("load_average_end")
    f = lambda la: "/".join(f"{x:.1f}" for x in la) if la else "?"  # noqa: E731
    return f"{f(start)} → {f(end)}"


def _machine_line(record: dict) -> str:
    m = record.get("machine", {})
    cpu = m.get("cpu", {})
    mem = m.get("memory_bytes")
    forced = (m.get("zili_env") or {}).get("ZILI_CPU_ISA")
    level = f"; **zili's kernels forced to the {forced} level** (ZILI_CPU_ISA={forced})" if forced else ""
    return (f"{cpu.get('model', '?')}, {cpu.get('usable_cores', '?')} cores usable "
            f"({', '.join(cpu.get('notable_flags', []))}){level}, {mem / 2**30:.0f} GiB RAM, "
            f"torch {m.get('torch', {}).get('version')}, {m.get('os')}" if mem else str(cpu.get("model")))


def _commit(record: dict) -> str:
    g = record.get("git", {})
    c = (g.get("commit") or "?")[:10]
    return c + (" (dirty)" if g.get("dirty") else "")


# --- sections ------------------------------------------------------------------------------------

def single_stream_section(record: dict) -> str:
    summary = record["summary"].get("single_stream") or []
    if not summary:
        return ""
    engines = _engines(sorted({e for row in summary for e in row["medians"]}))
    peers = [e for e in engines if e != "zili"]
    header = ["test", *[f"{e} tok/s" for e in engines], *[f"zili / {p}" for p in peers],
              *[f"{e} $/1M tok" for e in engines], "load (1 min)"]
    rows = []
    for row in sorted(summary, key=lambda r: r["test"]):
        med = row["medians"]
        rows.append([row["test"], *[_num(med.get(e, {}).get("tokens_per_s")) for e in engines],
                     *[_ratio((row.get("ratios") or {}).get(p, {}).get("tokens_per_s")) for p in peers],
                     *[_num(med.get(e, {}).get("usd_per_1m_tokens"), 3) for e in engines],
                     _num(max((m.get("load_1min_after") or 0) for m in med.values()))])
    rounds = summary[0]["rounds"]
    return ("### Single stream (like llama-bench pp512 / tg128)\n\n"
            f"Medians over {max(rounds.values())} interleaved rounds. ppN: prompt tokens per second of one "
            "N-token prefill ($ column: per 1M input tokens); tgN: tokens per second of N decode steps "
            "($ column: per 1M output tokens).\n\n" + _table(header, rows) + "\n")


def serve_section(record: dict, plots: dict[str, str]) -> str:
    summary = record["summary"].get("serve") or []
    if not summary:
        return ""
    engines = _engines(sorted({e for row in summary for e in row["medians"]}))
    header = ["concurrency", "engine", "output tok/s", "total tok/s", "req/s", "TTFT p50 / p99 ms",
              "ITL p50 / p90 / p99 ms", "TPOT p50 ms", "peak RSS MiB", "$/1M out", "$/1M in", "load (1 min)"]
    rows = []
    for row in sorted(summary, key=lambda r: r["concurrency"]):
        for e in engines:
            m = row["medians"].get(e)
            if not m:
                continue
            rows.append([str(row["concurrency"]), e, _num(m["output_throughput"]), _num(m["total_token_throughput"]),
                         _num(m["request_throughput"], 2),
                         f"{_num(m['ttft_p50_ms'], 0)} / {_num(m['ttft_p99_ms'], 0)}",
                         f"{_num(m['itl_p50_ms'])} / {_num(m['itl_p90_ms'])} / {_num(m['itl_p99_ms'])}",
                         _num(m["tpot_p50_ms"]), _num(m.get("peak_rss_mib"), 0),
                         _num(m["usd_per_1m_output_tokens"], 3),
                         _num(m["usd_per_1m_input_tokens"], 3), _num(m.get("load_1min_after"))])
        for peer, rat in (row.get("ratios") or {}).items():
            rows.append([str(row["concurrency"]), f"*zili / {peer}*", _ratio(rat["output_throughput"]),
                         _ratio(rat["total_token_throughput"]), _ratio(rat["request_throughput"]),
                         f"{_ratio(rat['ttft_p50_ms'])} / {_ratio(rat['ttft_p99_ms'])}",
                         f"{_ratio(rat['itl_p50_ms'])} / {_ratio(rat['itl_p90_ms'])} / {_ratio(rat['itl_p99_ms'])}",
                         _ratio(rat["tpot_p50_ms"]), _ratio(rat.get("peak_rss_mib")),
                         _ratio(rat["usd_per_1m_output_tokens"]), "", ""])
    cfg = record["config"].get("serve", {})
    n = cfg.get("num_prompts")
    per_level = ", ".join(f"c={k}: {v}" for k, v in n.items()) if isinstance(n, dict) else n
    failed = [r for r in record["runs"] if r.get("mode") == "serve" and r.get("failed")]
    errors = sum(r.get("errors", 0) for r in record["runs"] if r.get("mode") == "serve")
    short = sum(r.get("short_outputs", 0) for r in record["runs"] if r.get("mode") == "serve")
    notes = [f"{len(failed)} engine round(s) failed: " + "; ".join(f"{r['engine']} round {r['round']}: "
                                                                    f"{r['error'][:200]}" for r in failed)
                                           ] if failed else []
    text = ("### Serving (OpenAI-compatible /v1/completions, streamed)\n\n"
            f"{cfg.get('input_len')} prompt tokens (random token ids), {cfg.get('output_len')} output tokens "
            f"(`ignore_eos`), requests per level {per_level}; medians over rounds. Ratios: zili / peer "
            "(throughput: above 1 is zili faster; latency and cost: below 1 is zili better). "
            f"Request errors in all rounds: {errors}; outputs shorter than asked: {short}.\n\n"
            + _table(header, rows) + "\n")
    if notes:
        text += "\n" + "\n".join(f"> {n}" for n in notes) + "\n"
    return text


def plots_section(plots: dict[str, str], base: Path) -> str:
    if not plots:
        return ""
    captions = {"throughput": "Output throughput against concurrency (median, range over rounds)",
                "ttft": "Time to first token percentiles", "itl": "Inter-token latency percentiles",
                "single_stream": "Single-stream prefill and decode, zili against its peers"}
    out = ["### Plots\n"]
    for key, path in plots.items():
        rel = os.path.relpath(path, base)
        out.append(f"![{captions.get(key, key)}]({rel})\n")
    return "\n".join(out)


def _priced(record: dict) -> bool:
    """Whether the record's $ figures mean something: not for a GPU run priced at the CPU default."""
    basis = record.get("cost_basis") or {}
    return not (record.get("machine", {}).get("accelerator") and basis.get("price_per_hour") == DEFAULT_PRICE_PER_HOUR)


def offline_section(record: dict) -> str:
    rows = []
    priced = _priced(record)
    for r in record["runs"]:
        if r.get("test") == "throughput":
            rows.append([r["engine"], str(r["num_requests"]), _num(r["output_throughput"]),
                         _num(r["total_token_throughput"]), _num(r["request_throughput"], 2),
                         _num(r["cost"]["usd_per_1m_output_tokens"], 3) if priced else "–",
                         str(r.get("short_outputs", 0))])
    single = [[r["engine"], r["test"], _num(r["tokens_per_s"])] for r in record["runs"]
              if r.get("test", "").startswith(("pp", "tg"))]
    cfg = record["config"]
    weights = " (random weights: `--load-format dummy`)" if cfg.get("load_format") == "dummy" else ""
    text = f"Model `{cfg.get('model')}`{weights}, {cfg.get('input_len')} in / {cfg.get('output_len')} out.\n\n"
    if rows:
        header = ["engine", "requests", "output tok/s", "total tok/s", "req/s", "$/1M out", "short"]
        text += _table(header, rows) + "\n\n"
    if single:
        text += _table(["engine", "test", "tok/s"], single) + "\n\n"
    ratios = _peer_ratios(record)
    if ratios:
        text += ratios + "\n\n"
    roof = record["summary"].get("roofline")
    if roof:
        text += _roofline_text(roof)
    return text


def _peer_ratios(record: dict) -> str:
    """zili over each transformers peer of the record: output throughput and single-stream speed."""
    by = {(r["engine"], r["test"]): r for r in record["runs"]}
    lines = []
    for engine in sorted({e for e, _ in by if e.startswith("transformers")}):
        parts = []
        for (e, test), r in by.items():
            if e != "zili" or (engine, test) not in by:
                continue
            key = "output_throughput" if test == "throughput" else "tokens_per_s"
            peer = by[(engine, test)][key]
            if peer:
                parts.append(f"{test} **{r[key] / peer:.1f}×**")
        if parts:
            lines.append(f"zili / {engine}: " + ", ".join(parts) + ".")
    return " ".join(lines)


def _roofline_text(roof: dict) -> str:
    """The decode bound: per-token weight bytes when the record has them (dense models), else the
    checkpoint's stored size."""
    bw = roof["copy_bandwidth"]["bandwidth_gb_s"]
    key = "per_token" if roof.get("per_token") else "file"
    basis = {"per_token": f"{(roof.get('weights_bytes_per_token') or 0) / 1e9:.2f} GB of weights read per token "
                          "(all but the embedding table)",
             "file": f"{(roof.get('weights_bytes_file') or 0) / 1e6:.0f} MB of weights as stored"}[key]
    trows = [[str(x["batch"]), str(x["context_len"]), _num(x["tokens_per_s"], 0)] for x in roof.get(key) or []]
    text = f"Decode roofline on `{roof['device']}`: copy bandwidth {bw:.1f} GB/s, {basis}"
    if roof.get("weights_bytes_loaded"):
        text += f"; zili holds {roof['weights_bytes_loaded'] / 1e6:.0f} MB"
    text += ".\n\n" + _table(["batch", "context", "max tok/s"], trows) + "\n"
    if roof.get("tg_fraction_of_roofline") is not None:
        text += (f"\nzili's single-stream decode reaches **{roof['tg_fraction_of_roofline']:.1%}** of the batch-1 "
                 "bound.\n")
    return text


def serve_record_section(record: dict) -> str:
    rows = []
    for r in record["runs"]:
        rows.append([r.get("engine", "?"), r["load"], _num(r["output_throughput"]), _num(r["total_token_throughput"]),
                     f"{_num(r['ttft_ms']['p50'], 0)} / {_num(r['ttft_ms']['p99'], 0)}",
                     f"{_num(r['itl_ms']['p50'])} / {_num(r['itl_ms']['p99'])}", str(r["errors"]),
                     _num(r["cost"]["usd_per_1m_output_tokens"], 3) if _priced(record) else "–"])
    cfg = record["config"]
    return (f"`{cfg.get('url')}` model `{cfg.get('model')}`, {cfg.get('input_len')} in / {cfg.get('output_len')} out, "
            f"prompts: {cfg.get('prompt_source')}.\n\n"
            + _table(["engine", "load", "output tok/s", "total tok/s", "TTFT p50/p99 ms", "ITL p50/p99 ms", "errors",
                      "$/1M out"], rows) + "\n")


MAX_RECORDS_PER_SECTION = 3  # the newest compare records shown per section; all are listed at the end


def compares_with(records: list[tuple[Path, dict]], section: str) -> list[tuple[Path, dict]]:
    """Compare records whose summary has `section`, newest first."""
    return [(p, r) for p, r in reversed(records) if r["kind"] == "compare" and r.get("summary", {}).get(section)]


def render_section_plain(section: str, rec: dict) -> str:
    return single_stream_section(rec) if section == "single_stream" else serve_section(rec, {})


def _demote(markdown: str) -> str:
    """Headings one level deeper (an earlier record sits under its own ### heading)."""
    return "\n".join("#" + line if line.startswith("###") else line for line in markdown.splitlines()) + "\n"


def latest_with(records: list[tuple[Path, dict]], section: str) -> tuple[Path, dict] | None:
    """The newest compare record whose summary has `section` (single_stream or serve)."""
    found = [(p, r) for p, r in records if r["kind"] == "compare" and r.get("summary", {}).get(section)]
    return found[-1] if found else None


# --- plots ---------------------------------------------------------------------------------------

def make_plots(latest: dict[str, tuple[Path, dict] | None], plots_dir: Path) -> dict[str, str]:
    """PNG plots of the newest compare records with serving / single-stream figures; {key: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    latest_serve = latest.get("serve")
    record = latest_serve[1] if latest_serve else {"runs": [], "summary": {}}
    serve_runs = [r for r in record["runs"] if r.get("mode") == "serve" and not r.get("failed")]
    summary = record["summary"].get("serve") or []
    engines = _engines(sorted({r["engine"] for r in serve_runs}))
    if summary:
        levels = sorted(row["concurrency"] for row in summary)
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for e in engines:
            xs, ys, lo, hi = [], [], [], []
            for c in levels:
                vals = [r["output_throughput"] for r in serve_runs if r["engine"] == e and r["concurrency"] == c]
                med = next(row["medians"][e]["output_throughput"] for row in summary
                           if row["concurrency"] == c and e in row["medians"]) if vals else None
                if med is None:
                    continue
                xs.append(c)
                ys.append(med)
                lo.append(med - min(vals))
                hi.append(max(vals) - med)
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=e)
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tokens / s")
        ax.set_title("Serving throughput (median over rounds)")
        ax.grid(True, alpha=0.3)
        ax.legend()
        out["throughput"] = _save(fig, plots_dir / "throughput_vs_concurrency.png")
        for key, label in (("ttft", "TTFT"), ("itl", "ITL")):
            fig, ax = plt.subplots(figsize=(7.2, 4.2))
            width = 0.8 / max(1, len(engines) * 3)
            for i, e in enumerate(engines):
                for j, q in enumerate(("p50", "p90", "p99")):
                    vals = [next((row["medians"][e][f"{key}_{q}_ms"] for row in summary
                                  if row["concurrency"] == c and e in row["medians"]), None) for c in levels]
                    xs = [k + (i * 3 + j) * width - 0.4 + width / 2 for k in range(len(levels))]
                    ax.bar(xs, [v if v else float("nan") for v in vals], width, label=f"{e} {q}", alpha=1.0 - 0.25 * j,
                           color=f"C{i}")
            ax.set_xticks(range(len(levels)), [f"c={c}" for c in levels])
            ax.set_yscale("log")
            ax.set_ylabel(f"{label} (ms, log scale)")
            ax.set_title(f"{label} percentiles by concurrency")
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=7, ncol=len(engines))
            out[key] = _save(fig, plots_dir / f"{key}_percentiles.png")
    latest_single = latest.get("single_stream")
    single = latest_single[1]["summary"]["single_stream"] if latest_single else []
    if single:
        tests = sorted(row["test"] for row in single)
        s_engines = _engines(sorted({e for row in single for e in row["medians"]}))
        fig, axes = plt.subplots(1, len(tests), figsize=(3.4 * len(tests) + 1, 4.0), squeeze=False)
        for ax, test in zip(axes[0], tests):
            row = next(r for r in single if r["test"] == test)
            names = [e for e in s_engines if row["medians"].get(e, {}).get("tokens_per_s")]
            vals = [row["medians"][e]["tokens_per_s"] for e in names]
            bars = ax.bar(range(len(names)), vals, color=[f"C{s_engines.index(e)}" for e in names])
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
            ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
            ax.set_title(test)
            ax.set_ylabel("tokens / s")
        fig.suptitle("Single stream: zili against its peers (median over rounds)")
        out["single_stream"] = _save(fig, plots_dir / "single_stream.png")
    return out


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# --- the page ------------------------------------------------------------------------------------

def render(records: list[tuple[Path, dict]], plots: dict[str, str], base: Path) -> str:
    parts = ["# Benchmarks\n",
             "_Generated by `python -m benchmarks report` from `benchmarks/results/*.json`; edit the generator "
             "(`benchmarks/report.py`), not this file._\n",
             "## Reproduce\n", REPRODUCE + "\n",
             "One command, `python -m benchmarks compare`, builds the llama.cpp peer when it is missing (from the "
             "`llama-cpp-python` sdist on PyPI, `scripts/build_llama_cpp.sh`), starts `llama-server` and "
             "`zili serve` one after the other on loopback ports, and interleaves the engines round by round "
             "(zili, llama.cpp, zili, llama.cpp, ...) on the same GGUF file, the same threads and the same "
             "seeded requests. Each round and level gets fresh random prompts, so no prefix cache helps either "
             "side.\n",
             "## How to read these numbers\n",
             "- The development machines are shared and noisy: compare the **ratios** inside one record, "
             "never an absolute figure against another record. Each record lists the load average "
             "(1/5/15 min) at its start and end; a load well above the core count means other work "
             "competed with the benchmark, and the figures are then a floor, not a measure.\n"
             f"- Cost: $/1M tokens = price per hour / (3600 × tokens/s) × 10⁶, charging the whole machine to "
             f"each kind of token. Default price ${DEFAULT_PRICE_PER_HOUR}/h: {DEFAULT_PRICE_SOURCE}. "
             "Pass `--price-per-hour` for your own machine and `--watts` for energy per token.\n"
             "- TTFT: request sent → first streamed token. ITL: gap between consecutive streamed tokens. "
             "TPOT: (latency − TTFT) / (output tokens − 1) per request. Output tokens are counted from the "
             "server's `usage` (`stream_options.include_usage`), else from the streamed chunks.\n"]
    for section, title, render_section in (
            ("single_stream", "Single stream", single_stream_section),
            ("serve", "Serving", lambda rec: serve_section(rec, plots) + "\n" + plots_section(plots, base))):
        found = compares_with(records, section)
        for i, (path, rec) in enumerate(found[:MAX_RECORDS_PER_SECTION]):
            heading = (f"## {title}: zili against its peers (latest `python -m benchmarks compare`)\n" if i == 0 else
                       f"### Earlier {title.lower()} comparison ({rec['created']})\n")
            parts += [heading,
                      f"`{rec['command']}` — {rec['created']}, commit {_commit(rec)}, record "
                      f"[{path.name}]({os.path.relpath(path, base)}).\n",
                      f"Machine: {_machine_line(rec)}. Load average (1/5/15 min) start → end: {_load_span(rec)}. "
                      f"Model: `{rec['config'].get('model')}` ({rec['config'].get('model_bytes', 0) / 1e6:.0f} MB), "
                      f"{rec['config'].get('threads')} threads for every engine; llama.cpp from llama-cpp-python "
                      f"{rec['config'].get('llama_cpp', {}).get('version')}"
                      + ("" if rec['config'].get('llama_cpp', {}).get('repack', True) else
                         " with weight repacking off (`--no-repack`: its AMX kernels crash on this CPU)") + ".\n",
                      *([f"> Note recorded with the run: {rec['note']}\n"] if rec.get("note") else []),
                      render_section(rec) if i == 0 else _demote(render_section_plain(section, rec))]
    gpu = [(p, r) for p, r in records if r.get("machine", {}).get("accelerator")]
    on_cpu = [(p, r) for p, r in records if not r.get("machine", {}).get("accelerator")]
    if gpu:
        parts += ["## GPU: zili against HF transformers and the memory-bandwidth roofline\n",
                  "Run on a lent GPU machine with `benchmarks/gpu/*.sh` (see `benchmarks/gpu/README.md`); "
                  "the latest record of each model and kind. No $ figures: these runs were priced at the "
                  "CPU machine's default (`--price-per-hour` sets the GPU's).\n"]
        latest: dict[tuple, tuple[Path, dict]] = {}
        for p, r in gpu:
            tests = tuple(sorted({run.get("test", "") for run in r["runs"]}))
            latest[(r["kind"], r["config"].get("model") or r["config"].get("url"), r["config"].get("tp_path"),
                    r["config"].get("enforce_eager"), tests)] = (p, r)
        for p, r in sorted(latest.values(), key=lambda pr: pr[1]["created"]):
            parts += [f"### `{r['command']}`\n",
                      f"{r['created']}, commit {_commit(r)}, {r['machine']['accelerator']}, host "
                      f"{_machine_line(r)}; record [{p.name}]({os.path.relpath(p, base)}).\n",
                      *([f"> Note recorded with the run: {r['note']}\n"] if r.get("note") else []),
                      offline_section(r) if r["kind"] == "offline" else serve_record_section(r)]
    offline = [(p, r) for p, r in on_cpu if r["kind"] == "offline"]
    if offline:
        # The newest run with a peer beside zili, when there is one: a zili-only run (an A/B of one
        # option) goes to the records table, not over the comparison.
        compared = [(p, r) for p, r in offline if any(run.get("engine") != "zili" for run in r["runs"])]
        path, rec = (compared or offline)[-1]
        parts += ["## Latest offline run (`zili bench offline`)\n",
                  f"`{rec['command']}` — {rec['created']}, commit {_commit(rec)}, load {_load_span(rec)}.\n",
                  *([f"> Note recorded with the run: {rec['note']}\n"] if rec.get("note") else []),
                  offline_section(rec)]
    serves = [(p, r) for p, r in on_cpu if r["kind"] == "serve"]
    if serves:
        path, rec = serves[-1]
        parts += ["## Latest standalone serving run (`zili bench serve`)\n",
                  f"`{rec['command']}` — {rec['created']}, commit {_commit(rec)}, load {_load_span(rec)}.\n",
                  *([f"> Note recorded with the run: {rec['note']}\n"] if rec.get("note") else []),
                  serve_record_section(rec)]
    parts += ["## All records\n",
              _table(["record", "kind", "created", "commit", "load start → end", "command"],
                     [[f"[{p.name}]({os.path.relpath(p, base)})", r["kind"], r["created"], _commit(r),
                       _load_span(r), f"`{r['command']}`"] for p, r in reversed(records)]) + "\n"]
    return "\n".join(x for x in parts if x)


def resummarize(record: dict) -> dict:
    """Recompute a compare record's medians and ratios from its runs, so every page uses today's
    summary rules on the recorded figures."""

    if record.get("kind") == "compare":
        basis = CostBasis(**record["cost_basis"])
        for section, mode, fn in (("single_stream", "offline", summarize_single_stream),
                                  ("serve", "serve", summarize_serve)):
            runs = [r for r in record["runs"] if r.get("mode") == mode]
            if runs:
                record["summary"][section] = fn(runs, basis)
    return record


def write_report(results_dir: Path | None = None, plots_dir: Path | None = None, output: Path | None = None) -> Path:
    records = [(p, resummarize(r)) for p, r in load_records(results_dir or RESULTS_DIR)]
    output = Path(output) if output else REPORT_PATH
    plots_dir = Path(plots_dir) if plots_dir else PLOTS_DIR
    try:
        plots = make_plots({name: latest_with(records, name) for name in ("serve", "single_stream")}, plots_dir)
    except ImportError:  # matplotlib is optional: the tables still get written
        import sys

        print("matplotlib is not installed (pip install matplotlib): BENCHMARKS.md without plots", file=sys.stderr)
        plots = {}
    text = render(records, plots, output.parent.resolve())
    # Hand-written sections (benchmarks that are scripts, not `zili bench` records) follow the tables.
    for note in sorted((REPO_ROOT / "benchmarks" / "notes").glob("*.md")):
        text += "\n" + note.read_text()
    output.write_text(text)
    return output
