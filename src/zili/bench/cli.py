"""`zili bench`: serve (load generator against any OpenAI-compatible endpoint) and offline (engine speed).

The peer comparisons (llama.cpp, transformers) and the report live in the repository's
`benchmarks/` (`python -m benchmarks compare|report|build-peers`), not in the installed package.

Registered by zili.cli as `app.add_typer(bench_app, name="bench")`; also runnable as
`python -m zili.bench.cli`.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer

from zili.bench.cost import DEFAULT_PRICE_PER_HOUR, CostBasis
from zili.cli_options import engine_options

bench_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Benchmarks: serving load against an OpenAI-compatible endpoint, offline engine speed.")

DEFAULT_MODEL = "smollm2-135m"
PriceOpt = typer.Option(DEFAULT_PRICE_PER_HOUR, "--price-per-hour",
                        help="Machine price in $/hour for cost per token (default: AWS r7i.large on-demand, "
                             "see BENCHMARKS.md).")
WattsOpt = typer.Option(None, "--watts", help="Average power draw in watts; adds energy per token.")
OutputOpt = typer.Option(None, "--output", "-o", help="A .json file or a directory (default: benchmarks/results/).")
LabelOpt = typer.Option(None, "--label", help="A short name added to the result file name.")
NoteOpt = typer.Option(None, "--note", help="Free text kept in the record, e.g. the state of the machine.")
SeedOpt = typer.Option(0, "--seed", help="Seed of the workload (prompts and lengths).")


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"{what} must be comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        _fail(f"{what} must be positive integers, got {text!r}")
    return values


def _lengths(text: str, what: str):
    from zili.bench.workload import LengthSpec

    try:
        return LengthSpec.parse(text)
    except ValueError as e:
        _fail(f"{what}: {e}")


def _basis(price: float, watts: Optional[float]) -> CostBasis:
    from zili.bench.cost import DEFAULT_PRICE_SOURCE

    try:
        return CostBasis(price, DEFAULT_PRICE_SOURCE if price == DEFAULT_PRICE_PER_HOUR else "--price-per-hour", watts)
    except ValueError as e:
        _fail(str(e))


def _set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _save(record: dict, output: Optional[Path], label: Optional[str], quiet: bool = False) -> Path:
    from zili.bench.results import write_record

    path = write_record(record, output, label)
    if not quiet:
        typer.echo(f"wrote {path}", err=True)
    return path


def _resolve_path(model: Optional[str], weights_required: bool = True) -> Path:
    from zili.weights.resolve import resolve_model

    try:
        return resolve_model(model, weights_required).path
    except ValueError as e:
        _fail(str(e))


# --- serve ---------------------------------------------------------------------------------------

@bench_app.command()
def serve(
    url: str = typer.Option(..., "--url", help="Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000"),
    model: Optional[str] = typer.Option(None, "--model", help="Model name sent in requests (default: the "
                                        "first one GET /v1/models lists)."),
    endpoint: str = typer.Option("completions", "--endpoint", help="completions or chat."),
    concurrency: Optional[str] = typer.Option(None, "--concurrency", "-c",
                                              help="Comma-separated levels, e.g. 1,4,16,32 (default 1)."),
    request_rate: Optional[float] = typer.Option(None, "--request-rate",
                                                 help="Poisson arrivals in requests/s (with --concurrency: capped)."),
    num_prompts: Optional[int] = typer.Option(None, "--num-prompts", "-n",
                                              help="Requests per level (default max(4, 2 x concurrency); 32 with "
                                                   "a rate)."),
    input_len: str = typer.Option("128", "--input-len", help="Prompt tokens: N or LOW:HIGH (uniform)."),
    output_len: str = typer.Option("128", "--output-len", help="Output tokens: N or LOW:HIGH (uniform)."),
    prompt_source: str = typer.Option("random-ids", "--prompt-source",
                                      help="random-ids (token ids: exact lengths), random-words or file."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Text to cut prompts from (words)."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size",
                                             help="For random ids (default: from the server's /v1/models, else "
                                                  "32000)."),
    extra_body: Optional[str] = typer.Option(None, "--extra-body", help="JSON merged into every request body."),
    warmup: int = typer.Option(2, "--warmup", help="Unrecorded short requests sent first."),
    timeout: float = typer.Option(600.0, "--timeout", help="Per-request timeout in seconds."),
    keep_requests: bool = typer.Option(False, "--keep-requests", help="Also record every request's timings."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY",
                                          help="Sent as 'Authorization: Bearer KEY' (not recorded)."),
    seed: int = SeedOpt,
    price_per_hour: float = PriceOpt,
    watts: Optional[float] = WattsOpt,
    output: Optional[Path] = OutputOpt,
    label: Optional[str] = LabelOpt,
    note: Optional[str] = NoteOpt,
) -> None:
    """Load an OpenAI-compatible endpoint at fixed concurrencies and/or a Poisson rate; write JSON."""
    from zili.bench.results import new_record, with_cost
    from zili.bench.serve import LoadSpec, default_num_prompts, discover_model_name, run_load, wait_until_ready, warm_up
    from zili.bench.workload import LengthSpec, make_requests

    if endpoint not in ("completions", "chat"):
        _fail(f"--endpoint must be completions or chat, got {endpoint!r}")
    if endpoint == "chat" and prompt_source == "random-ids":
        prompt_source = "random-words"
    levels = _ints(concurrency, "--concurrency") if concurrency else ([None] if request_rate else [1])
    loads = [LoadSpec(concurrency=c, request_rate=request_rate) for c in levels]
    extra = json.loads(extra_body) if extra_body else None
    in_len, out_len = _lengths(input_len, "--input-len"), _lengths(output_len, "--output-len")
    try:
        asyncio.run(wait_until_ready(url, timeout_s=300))
    except (TimeoutError, RuntimeError) as e:
        _fail(str(e))
    model = model or _try(lambda: asyncio.run(discover_model_name(url))) or "default"
    vocab = vocab_size or _server_vocab(url) or 32000
    basis = _basis(price_per_hour, watts)
    config = {"url": url, "model": model, "endpoint": endpoint, "loads": [load.label for load in loads],
              "input_len": str(in_len), "output_len": str(out_len), "prompt_source": prompt_source,
              "prompt_file": str(prompt_file) if prompt_file else None, "vocab_size": vocab, "seed": seed,
              "extra_body": extra, "warmup": warmup, "num_prompts": num_prompts}
    record = new_record("serve", config, basis, argv=_without_secrets(sys.argv[1:]))
    record["note"] = note
    warm = make_requests(warmup, LengthSpec(16, 16), LengthSpec(8, 8), prompt_source, vocab, seed + 99_999, prompt_file)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    errors = asyncio.run(warm_up(url, model, warm, endpoint, extra, timeout, headers=headers))
    if errors:
        _fail(f"warm-up requests failed: {errors[0]}")
    for i, load in enumerate(loads):
        n = num_prompts
        if not n:  # closed loop: waves of the concurrency; Poisson arrivals (LoadSpec has one or both): 32
            n = default_num_prompts(load.concurrency) if load.request_rate is None and load.concurrency is not None else 32
        reqs = make_requests(n, in_len, out_len, prompt_source, vocab, seed + i, prompt_file)
        row = asyncio.run(run_load(url, model, reqs, load, endpoint, extra, timeout, seed, keep_requests,
                                   headers=headers))
        row["engine"] = label or model
        record["runs"].append(with_cost(row, basis))
        typer.echo(_serve_line(row), err=True)
    _save(record, output, label)


def _without_secrets(argv: list[str]) -> list[str]:
    """argv with the value of --api-key replaced, so that records never hold a key."""
    out = []
    for i, arg in enumerate(argv):
        if i > 0 and argv[i - 1] == "--api-key":
            arg = "***"
        elif arg.startswith("--api-key="):
            arg = "--api-key=***"
        out.append(arg)
    return out


def _try(fn):
    try:
        return fn()
    except Exception:
        return None


def _server_vocab(url: str) -> int | None:
    """llama-server lists n_vocab in /v1/models' meta; other servers do not."""
    import httpx

    data = _try(lambda: httpx.get(url.rstrip("/") + "/v1/models", timeout=10).json())
    meta = _try(lambda: data["data"][0]["meta"]) or {}
    return meta.get("n_vocab")


def spec_decode_line(spec: dict) -> str:
    """One line of speculative-decoding figures (zili.bench.offline.spec_decode_row)."""
    return (f"proposed {spec['num_draft_tokens']}  accepted {spec['num_accepted_tokens']}  acceptance rate "
            f"{spec['acceptance_rate']:.1%}  mean accepted length {spec['mean_accepted_length']:.2f}")


def _serve_line(row: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    return (f"{row['load']:>12s}  out {f(row['output_throughput'])} tok/s  total {f(row['total_token_throughput'])} "
            f"tok/s  {f(row['request_throughput'])} req/s  TTFT p50/p99 {f(row['ttft_ms']['p50'])}/"
            f"{f(row['ttft_ms']['p99'])} ms  ITL p50/p99 {f(row['itl_ms']['p50'])}/{f(row['itl_ms']['p99'])} ms  "
            f"errors {row['errors']}  ${f(row['cost']['usd_per_1m_output_tokens'])}/1M out")


# --- offline -------------------------------------------------------------------------------------

@bench_app.command()
@engine_options("dtype", "max_model_len", "max_num_seqs", "kv_cache_memory", "kv_cache_dtype", "quantization",
                "attention_backend", "use_tune_cache", "enforce_eager", "load_format", "speculative_config",
                "speculative_model", "deterministic", defaults={"enforce_eager": False})
def offline(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A .gguf file, an HF checkpoint dir or an "
                                        "alias (default smollm2-135m)."),
    num_prompts: int = typer.Option(256, "--num-prompts", "-n", help="Requests in the throughput test."),
    input_len: str = typer.Option("128", "--input-len", help="N or LOW:HIGH."),
    output_len: str = typer.Option("128", "--output-len", help="N or LOW:HIGH."),
    pp: int = typer.Option(512, "--pp", help="Prompt tokens of the single-stream prefill test."),
    tg: int = typer.Option(128, "--tg", help="Tokens of the single-stream decode test."),
    repetitions: int = typer.Option(3, "--repetitions", "-r", help="Repetitions of each single-stream test."),
    throughput: bool = typer.Option(True, "--throughput/--no-throughput", help="Run the engine throughput test."),
    single_stream: bool = typer.Option(True, "--single-stream/--no-single-stream", help="Run pp / tg."),
    peers: str = typer.Option("", "--peers", help="Comma-separated: transformers (HF generate, offline peer)."),
    hf_dtypes: str = typer.Option("float32,bfloat16", "--hf-dtypes", help="dtypes of the transformers peer."),
    hf_batch_size: int = typer.Option(32, "--hf-batch-size"),
    roofline: bool = typer.Option(True, "--roofline/--no-roofline",
                                  help="Measure copy bandwidth and report the decode roofline."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's)."),
    hf_num_prompts: Optional[int] = typer.Option(None, "--hf-num-prompts", help="The transformers peer's "
                                                 "throughput runs the first N requests only (default: all)."),
    tp_path: bool = typer.Option(False, "--tp-path", help="Run zili through its tensor-parallel executor at "
                                 "tp=1 (process group + step plans), to measure that path's overhead."),
    device: str = typer.Option("auto", "--device", help="Where the peers and the roofline run: auto (the "
                               "current zili platform's device) or a torch device string. zili always runs on "
                               "its current platform."),
    seed: int = SeedOpt,
    price_per_hour: float = PriceOpt,
    watts: Optional[float] = WattsOpt,
    output: Optional[Path] = OutputOpt,
    label: Optional[str] = LabelOpt,
    note: Optional[str] = NoteOpt,
    engine_args: dict[str, Any] | None = None,
) -> None:
    """zili's engine throughput (LLM.generate) and single-stream pp / tg, optionally HF transformers too.
    With --load-format dummy the transformers peer gets random weights too."""
    engine_args = dict(engine_args or {})
    load_format = engine_args.get("load_format", "auto")
    from zili.bench import offline as off
    from zili.bench.cost import cost_figures
    from zili.bench.results import new_record, with_cost
    from zili.bench.workload import make_requests

    _set_threads(threads)
    model = model or DEFAULT_MODEL
    path = _resolve_path(model, weights_required=load_format != "dummy")
    in_len, out_len = _lengths(input_len, "--input-len"), _lengths(output_len, "--output-len")
    basis = _basis(price_per_hour, watts)
    platform, dev, sync = _device(device)
    config = {"model": model, "model_path": str(path), "model_bytes": _model_bytes(path),
              "dtype": engine_args.get("dtype", "auto"), "num_prompts": num_prompts, "input_len": str(in_len),
              "output_len": str(out_len), "pp": pp, "tg": tg,
              "repetitions": repetitions, "peers": peers, "hf_dtypes": hf_dtypes, "hf_batch_size": hf_batch_size,
              "max_num_seqs": engine_args.get("max_num_seqs"), "threads": threads or _torch_threads(),
              "platform": platform, "device": str(dev), "seed": seed,
              "enforce_eager": engine_args.get("enforce_eager"), "load_format": load_format,
              "kv_cache_memory": engine_args.get("kv_cache_memory"), "max_model_len": engine_args.get("max_model_len"),
              "hf_num_prompts": hf_num_prompts, "tp_path": tp_path,
              "attention_backend": engine_args.get("attention_backend", "auto"),
              "kv_cache_dtype": engine_args.get("kv_cache_dtype", "auto"), "engine_args": engine_args}
    record = new_record("offline", config, basis)
    record["note"] = note
    runs = record["runs"]

    def add_single(engine: str, tests: dict) -> None:
        for test, fig in tests.items():
            tps = fig["tokens_per_s"]
            row = {"engine": engine, "test": test, **fig}
            row["cost"] = cost_figures(tps if test.startswith("tg") else None, tps if test.startswith("pp") else None,
                                       basis)
            runs.append(row)
            typer.echo(f"{engine:22s} {test:10s} {tps:9.1f} tok/s", err=True)

    def add_throughput(engine: str, row: dict) -> None:
        row = with_cost({"engine": engine, "test": "throughput", **row}, basis)
        runs.append(row)
        typer.echo(f"{engine:22s} throughput  out {row['output_throughput']:.1f} tok/s  total "
                   f"{row['total_token_throughput']:.1f} tok/s  {row['request_throughput']:.2f} req/s", err=True)
        if "spec_decode" in row:
            typer.echo(f"{'':22s} speculation {spec_decode_line(row['spec_decode'])}", err=True)

    reqs = make_requests(num_prompts, in_len, out_len, "random-ids", _vocab(path), seed)
    opts: dict[str, Any] = dict(engine_args)
    if threads:  # the engine sets its own thread count at build (EngineConfig.threads), over torch's
        opts["threads"] = threads
    if tp_path:
        opts["distributed_executor_backend"] = "mp"
    t0 = time.perf_counter()
    llm = _zili_llm(model, opts)
    config["zili_load_s"] = time.perf_counter() - t0
    config["zili_decode_graphs"] = getattr(llm.engine, "graph_batch_sizes", None)
    tg_tps = None
    if single_stream:
        single = off.zili_single_stream(llm, pp, tg, repetitions, seed)
        tg_tps = single[f"tg{tg}"]["tokens_per_s"]
        add_single("zili", single)
    if throughput:
        add_throughput("zili", off.zili_throughput(llm, reqs))
    if roofline:
        record["summary"]["roofline"] = roof = _roofline(path, dev, sync, llm)
        bound = roof.get("per_token_b1_tokens_per_s")
        if tg_tps and bound:
            roof["tg_fraction_of_roofline"] = tg_tps / bound
            typer.echo(f"zili tg{tg} = {tg_tps / bound:.1%} of the b=1 roofline ({bound:.0f} tok/s)", err=True)
    llm.engine.close()
    del llm
    gc.collect()
    _empty_device_cache()
    for peer in [p.strip() for p in peers.split(",") if p.strip()]:
        if peer != "transformers":
            _fail(f"unknown offline peer {peer!r}; offline peers: transformers (llama.cpp is in the repository's "
                  "`python -m benchmarks compare`)")
        for dt in [d.strip() for d in hf_dtypes.split(",") if d.strip()]:
            hf = off.load_hf_model(path, dt, dev, random_weights=load_format == "dummy")
            name = f"transformers-{dt}"
            if single_stream:
                add_single(name, off.hf_single_stream(hf, pp, tg, repetitions, seed, sync))
            if throughput:
                add_throughput(name, off.hf_throughput(hf, reqs[:hf_num_prompts or None], hf_batch_size, sync))
            del hf
            gc.collect()
            _empty_device_cache()
    _save(record, output, label)


# --- extract -------------------------------------------------------------------------------------

NGRAM_DEFAULT = '{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'


@bench_app.command()
@engine_options("dtype", "max_model_len", "max_num_seqs", "kv_cache_memory", "quantization", "attention_backend",
                "use_tune_cache", "enforce_eager", "speculative_config", "enable_jump_forward", "jump_forward_mode",
                defaults={"enforce_eager": False})
def extract(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A .gguf file, an HF checkpoint dir or an "
                                        "alias (default smollm2-135m)."),
    num_docs: int = typer.Option(10, "--num-docs", "-n", help="Generated documents (with true values)."),
    examples: Optional[Path] = typer.Option(Path("examples"), "--examples", help="A folder of */form.json + "
                                            "*.txt documents (speed only; skipped when absent)."),
    streams: str = typer.Option("1", "--streams", "-c", help="Comma-separated: requests at a time, e.g. 1,8."),
    repetitions: int = typer.Option(1, "--repetitions", "-r", help="Runs of the workload per engine."),
    max_tokens: int = typer.Option(384, "--max-tokens"),
    compare: bool = typer.Option(True, "--compare-speculation/--no-compare-speculation",
                                 help="Also run an engine without speculation, interleaved with the speculating one."),
    compare_jump_forward: bool = typer.Option(
        False, "--compare-jump-forward/--no-compare-jump-forward",
        help="Instead, run jump-forward structured decoding in verify mode, in append mode and off (all with "
             "--speculative-config), interleaved."),
    seed: int = SeedOpt,
    price_per_hour: float = PriceOpt,
    watts: Optional[float] = WattsOpt,
    output: Optional[Path] = OutputOpt,
    label: Optional[str] = LabelOpt,
    note: Optional[str] = NoteOpt,
    engine_args: dict[str, Any] | None = None,
) -> None:
    """The extraction workload: documents + forms as schema-constrained chat requests (temperature 0);
    output tokens/s, requests/s, field accuracy against the true values, and speculative decoding's
    figures. The speculating engine uses --speculative-config (default: n-gram, 5 tokens, n 2-4)."""
    from zili.bench import extract as ex
    from zili.bench.results import new_record, with_cost
    from zili.bench.stats import median

    engine_args = dict(engine_args or {})
    engine_args.setdefault("speculative_config", NGRAM_DEFAULT)
    model = model or DEFAULT_MODEL
    path = _resolve_path(model)
    levels = _ints(streams, "--streams")
    cases = ex.generated_cases(num_docs, seed) + (ex.example_cases(examples) if examples and examples.is_dir() else [])
    basis = _basis(price_per_hour, watts)
    config = {"model": model, "model_path": str(path), "num_docs": num_docs, "num_cases": len(cases),
              "examples": str(examples) if examples else None, "streams": levels, "repetitions": repetitions,
              "max_tokens": max_tokens, "seed": seed, "engine_args": engine_args, "compare_speculation": compare,
              "compare_jump_forward": compare_jump_forward}
    record = new_record("extract", config, basis)
    record["note"] = note
    if compare_jump_forward:
        compare = False
        jf_on = {**engine_args, "enable_jump_forward": True}
        engines = {"zili+jf": _zili_llm(model, {**jf_on, "jump_forward_mode": "verify"}),
                   "zili+jf-append": _zili_llm(model, {**jf_on, "jump_forward_mode": "append"}),
                   "zili": _zili_llm(model, {**engine_args, "enable_jump_forward": False, "jump_forward_mode": None})}
    else:
        engines = {"zili+spec": _zili_llm(model, engine_args)}
    if compare:
        engines["zili"] = _zili_llm(model, {**engine_args, "speculative_config": None})  # not the default's
    for level in levels:
        for rep in range(repetitions):
            for name, llm in engines.items():  # interleaved: the machine's state is shared alike
                row = with_cost({"engine": name, "test": f"extract-c{level}", "repetition": rep,
                                 **ex.run_workload(llm, cases, level, max_tokens)}, basis)
                record["runs"].append(row)
                _save(record, output, label, quiet=True)  # after each run: a cut-short run keeps what it measured
                acc = "n/a" if row["field_accuracy"] is None else f"{row['field_accuracy']:.1%}"
                typer.echo(f"{name:10s} c={level:<3d} out {row['output_throughput']:.1f} tok/s  "
                           f"{row['request_throughput']:.3f} req/s  field accuracy {acc}", err=True)
                if "spec_decode" in row:
                    typer.echo(f"{'':10s} speculation {spec_decode_line(row['spec_decode'])}", err=True)
                if "jump_forward" in row:
                    jf = row["jump_forward"]
                    drafted = f" of {jf['num_forced_draft_tokens']} drafted" if "num_forced_draft_tokens" in jf else ""
                    typer.echo(f"{'':10s} steps {row['num_steps']}  jumps {jf['num_jumps']}  forced tokens "
                               f"{jf['num_forced_tokens']}{drafted} ({jf['mode']})", err=True)
    for llm in engines.values():
        llm.engine.close()
    record["summary"]["speculation_speedup"] = speedups = {}
    for level in levels if compare else []:
        tps = {name: median([r["output_throughput"] for r in record["runs"]
                             if r["engine"] == name and r["test"] == f"extract-c{level}"]) for name in engines}
        on, off = tps["zili+spec"], tps["zili"]
        speedups[f"c{level}"] = ratio = on / off if on is not None and off else None
        shown = f"{ratio:.2f}x" if ratio is not None else "n/a"
        typer.echo(f"c={level}: speculation on / off = {shown} output tokens/s (median of {repetitions})", err=True)
    if compare_jump_forward:
        record["summary"]["jump_forward"] = _jump_forward_summary(record["runs"], levels)
    _save(record, output, label)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _jump_forward_summary(runs: list[dict], levels: list[int]) -> dict[str, Any]:
    """Per stream level, jump-forward in verify mode ("zili+jf") and append mode ("zili+jf-append")
    against off ("zili"): output tokens/s (ratio of medians and per-repetition ratios, the runs being
    interleaved), steps, output tokens and field accuracy of each."""
    from zili.bench.stats import median

    out: dict[str, Any] = {}
    for level in levels:
        test = f"extract-c{level}"
        by = {name: [r for r in runs if r["engine"] == name and r["test"] == test]
              for name in ("zili+jf", "zili+jf-append", "zili")}
        tps = {name: median([r["output_throughput"] for r in rows]) for name, rows in by.items()}
        off = by["zili"]
        row: dict[str, Any] = {
            "steps": {name: [r["num_steps"] for r in rows] for name, rows in by.items()},
            "output_tokens": {name: [r["output_tokens"] for r in rows] for name, rows in by.items()},
            "field_accuracy": {name: [r["field_accuracy"] for r in rows] for name, rows in by.items()},
        }
        for name, key in (("zili+jf", "verify"), ("zili+jf-append", "append")):
            on = by[name]
            row[f"{key}/off"] = {
                "output_throughput_ratio": _ratio(tps[name], tps["zili"]),
                "output_throughput_ratios": [a["output_throughput"] / b["output_throughput"] for a, b in zip(on, off)],
                "duration_ratios": [a["duration_s"] / b["duration_s"] for a, b in zip(on, off)]}
            ratio = row[f"{key}/off"]["output_throughput_ratio"]
            shown = f"{ratio:.2f}x" if ratio is not None else "n/a"
            typer.echo(f"c={level}: jump-forward {key} / off = {shown} output tokens/s (median of {len(on)}), "
                       f"steps {sum(r['num_steps'] for r in on)} / {sum(r['num_steps'] for r in off)}", err=True)
        out[f"c{level}"] = row
    return out


def _empty_device_cache() -> None:
    """Hand a freed model's device memory back, so that the next engine or peer can have it."""
    from zili.platforms import current_platform

    current_platform().empty_cache()


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _device(device: str):
    """(platform name, torch device, synchronize) for peers and the roofline; asked of zili's platform."""
    import torch

    from zili.platforms import current_platform

    plat = current_platform()
    dev = plat.device if device == "auto" else torch.device(device)
    return plat.name, dev, plat.synchronize


def _zili_llm(model: str, opts: dict):
    from zili.engine.llm import LLM

    try:
        return LLM(model, **opts)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))


def _model_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.glob("*.safetensors"))


def _vocab(path: Path) -> int:
    from zili.bench.offline import model_shapes

    return model_shapes(path)["vocab_size"]


def _roofline(path: Path, dev, sync, llm=None) -> dict:
    from zili.bench import offline as off
    from zili.bench.offline import model_shapes
    from zili.layers.onednn import packed_only_bytes

    cfg = model_shapes(path)["config"]
    bw = off.measure_copy_bandwidth(dev, synchronize=sync)
    file_bytes = _model_bytes(path)
    loaded = _try(lambda: sum(t.numel() * t.element_size() for t in
                              [*llm.engine.runner.model.parameters(), *llm.engine.runner.model.buffers()])
                  + packed_only_bytes(llm.engine.runner.model))
    per_token = _try(lambda: _weight_bytes_per_token(llm.engine, cfg))
    out = {"device": str(dev), "copy_bandwidth": bw, "weights_bytes_file": file_bytes, "weights_bytes_loaded": loaded,
           "weights_bytes_per_token": per_token,
           "note": "tokens/s upper bound: batch / ((weights + batch*context*KV bytes) / copy bandwidth); "
                   "'file' reads the checkpoint as stored, 'loaded' reads zili's in-memory weights, "
                   "'per_token' the weights one decode token must read (the embedding table is not read, "
                   "only one row of it).",
           "file": off.roofline_table(cfg, file_bytes, bw["bandwidth_gb_s"]) if file_bytes else None}
    if loaded:
        out["loaded"] = off.roofline_table(cfg, loaded, bw["bandwidth_gb_s"])
    if per_token:
        out["per_token"] = off.roofline_table(cfg, per_token, bw["bandwidth_gb_s"], context_len=0)
        out["per_token_b1_tokens_per_s"] = out["per_token"][0]["tokens_per_s"]
    shown = next((out[k][0]["tokens_per_s"], k) for k in ("per_token", "file", "loaded") if out.get(k))
    typer.echo(f"copy bandwidth {bw['bandwidth_gb_s']:.1f} GB/s; decode roofline b=1 ({shown[1]} bytes) "
               f"{shown[0]:.0f} tok/s", err=True)
    return out


def _weight_bytes_per_token(engine, cfg) -> int | None:
    """Bytes of weights one decode token reads on a dense model: every parameter except the
    embedding table, of which a token reads one row (unless it is also the LM head). None for a
    model with packed quantized layers (which of their two copies a step reads depends on the batch)."""
    from zili.layers.onednn import packed_only_bytes

    if set(engine.quantized) - {"dense"}:
        return None
    params = dict(engine.runner.model.named_parameters())
    total = sum(p.numel() * p.element_size() for p in params.values()) + packed_only_bytes(engine.runner.model)
    if not cfg.tie_word_embeddings:
        total -= sum(p.numel() * p.element_size() for n, p in params.items() if "embed_tokens" in n)
    return total


if __name__ == "__main__":
    bench_app()
