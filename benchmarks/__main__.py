"""Benchmarks that compare zili with its peers, and the report built from every record.

These are the repository's tools, not part of the installed package:

    python -m benchmarks compare [...]      # zili against llama.cpp / transformers / the roofline, interleaved
    python -m benchmarks compare-extract    # the extraction workload: zili serve against llama-server
    python -m benchmarks report             # BENCHMARKS.md and benchmarks/plots/*.png from benchmarks/results/
    python -m benchmarks build-peers        # build llama.cpp's llama-server and llama-bench once
    python -m benchmarks structured [...]   # structured-output masking cost (benchmarks/structured_decode.py)

They reuse the installed `zili bench` pieces (workloads, the serving load generator, records).
"""

from __future__ import annotations

import gc
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

import zili.bench.cli as zb
import zili.bench.offline as off
from benchmarks import compare as cmp
from benchmarks import compare_extract as cx
from benchmarks import peers as pr
from benchmarks import report as rp
from benchmarks import structured_decode
from zili.bench.results import new_record, write_record

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="zili against its peers (llama.cpp, transformers, roofline) and the benchmark report.")

# Options more than one command takes (the record's own: zili.bench.cli's SeedOpt, PriceOpt, ...).
ModelOpt = typer.Option(None, "--model", "-m", help="A .gguf file or alias (default smollm2-135m); every engine "
                        "loads this same file.")
RepeatsOpt = typer.Option(3, "--repeats", help="Interleaved rounds (zili, peer, zili, peer, ...).")
ThreadsOpt = typer.Option(os.cpu_count() or 2, "--threads", "-t", help="Threads for every engine.")
LlamaCppVersionOpt = typer.Option("0.3.36", "--llama-cpp-version", help="llama-cpp-python sdist version.")
BuildPeersOpt = typer.Option(True, "--build-peers/--no-build-peers", help="Build llama.cpp when missing.")


# --- compare -------------------------------------------------------------------------------------

@app.command()
def compare(
    model: Optional[str] = ModelOpt,
    mode: str = typer.Option("offline,serve", "--mode", help="offline (pp / tg single stream), serve, or both."),
    peers: str = typer.Option("llama.cpp", "--peers", help="Comma-separated: llama.cpp, transformers "
                              "(offline only; fp32 and bf16), roofline (offline: the memory-bandwidth bound of "
                              "tgN, measured each round), zili-spec (serve only: zili serve with n-gram "
                              "speculation, against zili without). On a GPU use transformers,roofline."),
    repeats: int = RepeatsOpt,
    concurrency: str = typer.Option("1,4,16,32", "--concurrency", "-c"),
    input_len: str = typer.Option("128", "--input-len"),
    output_len: str = typer.Option("128", "--output-len"),
    num_prompts: Optional[int] = typer.Option(None, "--num-prompts", "-n",
                                              help="Requests per level (default max(min-prompts, waves x "
                                                   "concurrency))."),
    waves: int = typer.Option(2, "--waves", help="Full batches of requests per level when --num-prompts is not given."),
    min_prompts: int = typer.Option(4, "--min-prompts",
                                    help="Fewest requests per level when --num-prompts is not given."),
    pp: int = typer.Option(512, "--pp"),
    tg: int = typer.Option(128, "--tg"),
    repetitions: int = typer.Option(2, "--repetitions", "-r", help="Single-stream repetitions inside each round."),
    threads: int = ThreadsOpt,
    llama_cpp_version: str = LlamaCppVersionOpt,
    build_peers: bool = BuildPeersOpt,
    zili_serve_args: str = typer.Option("", "--zili-serve-args", help="Extra arguments for `zili serve`."),
    llama_server_args: str = typer.Option("", "--llama-server-args", help="Extra arguments for llama-server."),
    timeout: float = typer.Option(900.0, "--timeout", help="Per-request timeout in seconds."),
    seed: int = zb.SeedOpt,
    price_per_hour: float = zb.PriceOpt,
    watts: Optional[float] = zb.WattsOpt,
    output: Optional[Path] = zb.OutputOpt,
    label: Optional[str] = zb.LabelOpt,
    note: Optional[str] = zb.NoteOpt,
) -> None:
    """zili against its peers on the same model file and workload, interleaved; medians and ratios."""

    model = model or zb.DEFAULT_MODEL
    path = zb._resolve_path(model)
    modes = {m.strip() for m in mode.split(",") if m.strip()}
    peer_list = [p.strip() for p in peers.split(",") if p.strip()]
    if not modes <= {"offline", "serve"}:
        zb._fail(f"--mode takes offline and/or serve, got {mode!r}")
    if not set(peer_list) <= {"llama.cpp", "transformers", "roofline", "zili-spec"}:
        zb._fail(f"--peers takes llama.cpp, transformers, roofline and/or zili-spec, got {peers!r}")
    levels = zb._ints(concurrency, "--concurrency")
    in_len, out_len = zb._lengths(input_len, "--input-len"), zb._lengths(output_len, "--output-len")
    basis = zb._basis(price_per_hour, watts)
    zb._set_threads(threads)
    bin_dir = None
    if "llama.cpp" in peer_list:
        try:
            bin_dir = pr.ensure_llama_cpp(llama_cpp_version, build=build_peers)
        except Exception as e:
            zb._fail(f"llama.cpp is not available: {e}")
    shapes = off.model_shapes(path)
    config: dict[str, Any] = {
              "model": model, "model_path": str(path), "model_bytes": zb._model_bytes(path), "modes": sorted(modes),
              "peers": peer_list, "repeats": repeats, "threads": threads, "seed": seed,
              "llama_cpp": {"version": llama_cpp_version, "bin_dir": str(bin_dir) if bin_dir else None,
                            "repack": pr.repack_default()},
              "single_stream": {"pp": pp, "tg": tg, "repetitions": repetitions},
              "serve": {"concurrency": levels, "input_len": str(in_len), "output_len": str(out_len),
                        "num_prompts": num_prompts or {c: cmp.default_num_prompts(c, waves, min_prompts)
                                                       for c in levels},
                        "zili_serve_args": zili_serve_args, "llama_server_args": llama_server_args}}
    record = new_record("compare", config, basis, program="python -m benchmarks")
    record["note"] = note
    out_path = write_record(record, output, label)  # rewritten after every part, so a cut-off run keeps its data
    typer.echo(f"writing {out_path}", err=True)

    if "offline" in modes:
        single = [_zili_single_peer(model, pp, tg, repetitions, seed, config)]
        if "llama.cpp" in peer_list:
            single.append(cmp.SingleStreamPeer("llama.cpp", lambda r: _llama_bench(path, pp, tg, threads,
                                                                                    repetitions, bin_dir)))
        if "transformers" in peer_list:
            single += [_hf_single_peer(path, dt, pp, tg, repetitions, seed) for dt in ("float32", "bfloat16")]
        if "roofline" in peer_list:
            single.append(_roofline_peer(path, tg, shapes["config"]))
        runs, summary = cmp.compare_single_stream(single, repeats, basis)
        record["runs"] += [dict(r, mode="offline") for r in runs]
        record["summary"]["single_stream"] = summary
        del single
        gc.collect()
        write_record(record, out_path)

    if "serve" in modes:
        ctx = _round_up(in_len.high + out_len.high + 64, 256)
        zili_args = shlex.split(zili_serve_args)
        if not any(a.startswith("--kv-cache-memory") for a in zili_args):
            # The same KV capacity as llama-server's slots (bf16 / f16 caches: equal bytes per token), so
            # neither engine wins throughput or loses memory by holding a bigger cache.
            zili_args += ["--kv-cache-memory", str(max(levels) * ctx * shapes["config"].kv_bytes_per_token("bfloat16"))]
        config["serve"]["zili_serve_args"] = shlex.join(zili_args)
        # The decode step compiled before /health answers, so no round measures the eager-to-compiled switch.
        steady = {"ZILI_BACKGROUND_COMPILE": "0"}
        config["serve"]["zili_env"] = steady
        engines = {"zili": lambda: pr.zili_server(model, extra_args=zili_args, threads=threads, env=steady)}
        if "zili-spec" in peer_list:  # issue 20: speculation must not slow plain chat (ratio zili / zili-spec)
            spec_args = zili_args + ["--speculative-config", zb.NGRAM_DEFAULT]
            config["serve"]["zili_spec_serve_args"] = shlex.join(spec_args)
            engines["zili-spec"] = lambda: pr.zili_server(model, extra_args=spec_args, threads=threads, env=steady)
        if "llama.cpp" in peer_list:
            engines["llama.cpp"] = lambda: pr.llama_server(path, max(levels), ctx, threads, bin_dir,
                                                           extra_args=shlex.split(llama_server_args))
        workload = cmp.ServeWorkload(levels, in_len, out_len, num_prompts, waves, min_prompts, shapes["vocab_size"],
                                     seed,
                                     timeout_s=timeout)
        serve_runs: list[dict] = []
        for r in range(repeats):
            for name, start in engines.items():
                serve_runs += cmp.serve_round(name, start, workload, r, basis)
                record["runs"] = [x for x in record["runs"] if x.get("mode") != "serve"] + \
                                 [dict(x, mode="serve") for x in serve_runs]
                record["summary"]["serve"] = cmp.summarize_serve(serve_runs, basis)
                write_record(record, out_path)
    write_record(record, out_path)
    _print_compare_summary(record)
    typer.echo(f"wrote {out_path}", err=True)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _zili_single_peer(model: str, pp: int, tg: int, repetitions: int, seed: int, config: dict):

    state: dict[str, Any] = {}

    def run(r: int) -> dict:
        if "llm" not in state:
            t0 = time.perf_counter()
            state["llm"] = zb._zili_llm(model, {"threads": config["threads"]})  # else the engine takes its tuned count
            config["zili_load_s"] = time.perf_counter() - t0
        return off.zili_single_stream(state["llm"], pp, tg, repetitions, seed + r, warmup=(r == 0))

    return cmp.SingleStreamPeer("zili", run)


def _hf_single_peer(path: Path, dtype: str, pp: int, tg: int, repetitions: int, seed: int):

    state: dict[str, Any] = {}

    def run(r: int) -> dict:
        if "model" not in state:
            _, dev, sync = zb._device("auto")
            state["model"], state["sync"] = off.load_hf_model(path, dtype, dev), sync
        return off.hf_single_stream(state["model"], pp, tg, repetitions, seed + r, state["sync"])

    return cmp.SingleStreamPeer(f"transformers-{dtype}", run)


def _roofline_peer(path: Path, tg: int, model_config):
    """tgN's upper bound: every decode step reads the stored weights and the KV cache so far once, at the
    copy bandwidth measured on the current platform's device in this round."""

    def run(r: int) -> dict:
        _, dev, sync = zb._device("auto")
        bw = off.measure_copy_bandwidth(dev, synchronize=sync)["bandwidth_gb_s"]
        kv = model_config.kv_bytes_per_token("bfloat16")
        bound = off.decode_roofline(zb._model_bytes(path), kv, tg // 2, 1, bw)["tokens_per_s"]
        return {f"tg{tg}": {"tokens_per_s": bound, "samples_ts": [bound], "copy_bandwidth_gb_s": bw}}

    return cmp.SingleStreamPeer("roofline", run)


def _llama_bench(path: Path, pp: int, tg: int, threads: int, repetitions: int, bin_dir) -> dict:

    rows = pr.run_llama_bench(path, pp, tg, threads, repetitions, bin_dir)
    return {row["test"]: {"tokens_per_s": row["tokens_per_s"], "samples_ts": row["samples_ts"],
                          "build_commit": row["build_commit"]} for row in rows}


def _print_compare_summary(record: dict) -> None:
    f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for row in record["summary"].get("single_stream", []):
        for peer, rat in (row.get("ratios") or {}).items():
            typer.echo(f"{row['test']:8s} zili/{peer}: {f(rat['tokens_per_s'])}", err=True)
    for row in record["summary"].get("serve", []):
        for peer, rat in (row.get("ratios") or {}).items():
            typer.echo(f"c={row['concurrency']:<3d} zili/{peer}: output tok/s {f(rat['output_throughput'])}  "
                       f"TTFT p50 {f(rat['ttft_p50_ms'])}  ITL p50 {f(rat['itl_p50_ms'])}", err=True)


# --- compare-extract -----------------------------------------------------------------------------

LLAMA_SPEC_DEFAULT = "--spec-type ngram-simple --spec-ngram-simple-size-n 3 --spec-ngram-simple-size-m 8"


@app.command("compare-extract")
def compare_extract(
    model: Optional[str] = ModelOpt,
    num_docs: int = typer.Option(10, "--num-docs", "-n", help="Generated documents (with true values)."),
    streams: str = typer.Option("1,8", "--streams", "-c", help="Comma-separated: requests in flight."),
    repeats: int = RepeatsOpt,
    max_tokens: int = typer.Option(384, "--max-tokens"),
    threads: int = ThreadsOpt,
    zili_serve_args: str = typer.Option(
        "--speculative-config '" + zb.NGRAM_DEFAULT + "' --enable-jump-forward --jump-forward-mode verify",
        "--zili-serve-args", help="Arguments for `zili serve` (default: n-gram speculation and jump-forward)."),
    zili_jump_forward_modes: str = typer.Option(
        "", "--zili-jump-forward-modes",
        help="Also run zili with these jump-forward settings (comma-separated: verify, append, off), each as one "
             "more engine `zili-jf-MODE` with --zili-serve-args plus that setting, interleaved."),
    llama_server_args: str = typer.Option(LLAMA_SPEC_DEFAULT, "--llama-server-args",
                                          help="Arguments for llama-server (default: its n-gram speculation)."),
    plain_peers: bool = typer.Option(False, "--plain-peers/--no-plain-peers",
                                     help="Also run both servers without speculation (and zili without jump-forward)."),
    llama_cpp_version: str = LlamaCppVersionOpt,
    build_peers: bool = BuildPeersOpt,
    seed: int = zb.SeedOpt,
    price_per_hour: float = zb.PriceOpt,
    watts: Optional[float] = zb.WattsOpt,
    output: Optional[Path] = zb.OutputOpt,
    label: Optional[str] = zb.LabelOpt,
    note: Optional[str] = zb.NoteOpt,
) -> None:
    """The extraction workload (`zili bench extract`'s documents and forms) over HTTP: zili serve with
    speculation and jump-forward against llama-server with its n-gram speculation, same GGUF, interleaved."""
    from zili.bench import extract as ex

    model = model or zb.DEFAULT_MODEL
    path = zb._resolve_path(model)
    levels = zb._ints(streams, "--streams")
    basis = zb._basis(price_per_hour, watts)
    try:
        bin_dir = pr.ensure_llama_cpp(llama_cpp_version, build=build_peers)
    except Exception as e:
        zb._fail(f"llama.cpp is not available: {e}")
    cases = ex.generated_cases(num_docs, seed)
    warmup = ex.generated_cases(2, seed + 7919)
    slots = max(levels)
    ctx = 2048  # a generated document's prompt is 300-600 tokens, its form up to max_tokens
    zili_args = shlex.split(zili_serve_args) + ["--max-model-len", str(ctx)]
    if not any(a.startswith("--kv-cache-memory") for a in zili_args):  # llama-server's capacity (slots x ctx)
        zili_args += ["--kv-cache-memory",
                      str(slots * ctx * off.model_shapes(path)["config"].kv_bytes_per_token("bfloat16"))]
    llama_args = shlex.split(llama_server_args)
    def zili(args: list[str]) -> Callable[[], Any]:
        # The decode step compiled before /health answers, so no round measures the eager-to-compiled switch.
        return lambda: pr.zili_server(model, max_num_seqs=slots, extra_args=args, threads=threads,
                                      env={"ZILI_BACKGROUND_COMPILE": "0"})

    engines: dict[str, Callable[[], Any]] = {
        "zili": zili(zili_args),
        "llama-server": lambda: pr.llama_server(path, slots, ctx, threads, bin_dir, extra_args=llama_args)}
    for mode in [m.strip() for m in zili_jump_forward_modes.split(",") if m.strip()]:
        if mode not in ("verify", "append", "off"):
            zb._fail(f"--zili-jump-forward-modes: {mode!r} is not verify, append or off")
        extra = ["--no-enable-jump-forward"] if mode == "off" else ["--enable-jump-forward", "--jump-forward-mode", mode]
        base = [a for a in zili_args if a not in ("--enable-jump-forward", "--no-enable-jump-forward")]
        if "--jump-forward-mode" in base:
            i = base.index("--jump-forward-mode")
            del base[i:i + 2]
        engines[f"zili-jf-{mode}"] = zili(base + extra)
    if plain_peers:
        engines["zili-plain"] = zili(["--max-model-len", str(ctx), "--speculative-config", "off"]
                                     + zili_args[zili_args.index("--kv-cache-memory"):])
        engines["llama-server-plain"] = lambda: pr.llama_server(path, slots, ctx, threads, bin_dir)
    config: dict[str, Any] = {
        "model": model, "model_path": str(path), "num_docs": num_docs, "num_cases": len(cases), "streams": levels,
        "repeats": repeats, "max_tokens": max_tokens, "threads": threads, "seed": seed, "ctx_per_slot": ctx,
        "zili_serve_args": shlex.join(zili_args), "llama_server_args": shlex.join(llama_args),
        "llama_cpp": {"version": llama_cpp_version, "bin_dir": str(bin_dir)}, "engines": list(engines)}
    record = new_record("compare-extract", config, basis, program="python -m benchmarks")
    record["note"] = note
    out_path = write_record(record, output, label)
    typer.echo(f"writing {out_path}", err=True)
    for r in range(repeats):
        for name, start in engines.items():
            record["runs"] += cx.extract_round(name, start, cases, levels, max_tokens, r, warmup)
            record["summary"] = cx.summarize_extract(record["runs"], levels, list(engines))
            write_record(record, out_path)
    for level, row in record["summary"].items():
        for key, value in row.items():
            if "/" in key and value["output_throughput_ratio"] is not None:
                typer.echo(f"{level}: {key} output tok/s {value['output_throughput_ratio']:.2f}x", err=True)
        accuracy = {e: row[e]["field_accuracy"] for e in engines}
        typer.echo(f"{level}: field accuracy {accuracy}", err=True)
    typer.echo(f"wrote {out_path}", err=True)


# --- report / peers ------------------------------------------------------------------------------

@app.command()
def report(
    results_dir: Optional[Path] = typer.Option(None, "--results-dir", help="Default: benchmarks/results/."),
    plots_dir: Optional[Path] = typer.Option(None, "--plots-dir", help="Default: benchmarks/plots/."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Default: BENCHMARKS.md at the repo root."),
) -> None:
    """Regenerate BENCHMARKS.md and the PNG plots from every JSON result."""

    path = rp.write_report(results_dir, plots_dir, output)
    typer.echo(f"wrote {path}", err=True)


@app.command("build-peers")
def build_peers_cmd(
    llama_cpp_version: str = LlamaCppVersionOpt,
) -> None:
    """Build llama.cpp's llama-server and llama-bench (once; reused from the cache afterwards)."""

    typer.echo(str(pr.ensure_llama_cpp(llama_cpp_version)))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def structured(ctx: typer.Context) -> None:
    """Structured-output masking cost; options as `python benchmarks/structured_decode.py --help`."""
    structured_decode.main(list(ctx.args))


if __name__ == "__main__":
    app()
