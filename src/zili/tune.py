"""`zili tune [MODEL]`: measure what runs fastest on this device at this model's shapes, keep the winners.

What is measured (each only where the platform says it matters):
  threads            host threads, end-to-end decode tokens/s   (Platform.thread_candidates(): CPUs)
  triton             launch configs of the Triton kernels        (when "triton" runs here: GPUs)
  attention_backend  every backend the platform offers, at each candidate block size, on the
  block_size           model's attention shapes (decode at short and long contexts, a prefill chunk)
  graph_batch_sizes  the decode-graph ladder: batch sizes where a replayed graph beats eager (GPUs)
  quant_kernels      per quantized layer shape: the packed kernel (zili's at this CPU's level, or
                     torch's int4/int8) and the row count up to which it beats dense, measured at
                     rows 1..64, then 128..512 while it still wins (zili.layers.quant_calibration,
                     no time budget here); the engine
                     applies them (`Linear.quant`), and calibrates shapes missing here at start
  compiled_decode    the compiled decode step (CPUs) against eager, decode tokens/s at the comparison
                     batch sizes; the engine stays eager where compiling does not pay (unless
                     --compile / enforce_eager=False asks for it)
  quant_max_rows     up to how many rows the packed int4/int8 matmuls beat dense, timed on the
                     whole forward (CPU packed kernels); overrides the per-shape limits
  quant kernels      (recorded) per shape and row count, zili's kernel on every instruction-set
                     level the CPU executes (zili.kernels.cpu_isa), torch's kernel and dense
Winners go to the tune cache (`zili.platforms.tuning`), keyed by the device fingerprint; the engine
reads it at start (`EngineConfig.use_tune_cache`, `--no-tune-cache`). With --compare (the default) the
same decode workload runs with defaults and with the winners, interleaved, and the speed-up is
reported. The machine's load average is recorded next to every figure: shared machines are noisy.

The lead registers it: `app.command("tune")(tune)` in zili.cli.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from zili.cli_options import engine_options

if TYPE_CHECKING:  # torch is imported where it is used: `zili --help` should not pay for it
    import torch

logger = logging.getLogger(__name__)

QUANT_ROW_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)
PROMPT_TOKENS = 64  # prompt length of every decode measurement (its prefill is not timed)
GRAPH_GAIN = 1.03  # a ladder size is kept when its graph is at least this much faster than eager
COMPILE_GAIN = 1.03  # the compiled decode step is kept when at least this much faster than eager


@dataclass
class TuneOptions:
    model: str | None = None
    dtype: str = "auto"
    quantization: str = "auto"
    block_sizes: tuple[int, ...] = (16, 32, 64, 128)
    repeats: int = 5
    compare: bool = True
    compare_rounds: int = 3
    measure_compile: bool = True
    decode_tokens: int = 32
    decode_batches: tuple[int, ...] = (1, 8)
    max_num_seqs: int = 64
    cache: Path | None = None
    write_cache: bool = True
    load_format: str = "auto"  # "dummy": random weights on the architecture (shapes are what is timed)


@dataclass
class TuneReport:
    fingerprint: dict[str, Any]
    model_key: str = ""
    device: dict[str, Any] = field(default_factory=dict)  # device winners
    model: dict[str, Any] = field(default_factory=dict)  # model winners
    measurements: dict[str, Any] = field(default_factory=dict)
    comparison: dict[str, Any] = field(default_factory=dict)
    cache_path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("fingerprint", "model_key", "device", "model", "measurements",
                                                "comparison", "cache_path")}


# ---- timing ------------------------------------------------------------------------------------

def best_time(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    """Best of `repeats` timed calls after one warm-up, in seconds (best-of resists a noisy host)."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def decode_rate(engine, batch: int, prompt_len: int, new_tokens: int, seed: int = 0) -> float:
    """Decode tokens/s of `batch` greedy sequences after their prefill (which is not timed)."""
    import torch

    from zili.sampling import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(None, torch.randint(engine.model_config.vocab_size, (prompt_len,), generator=gen).tolist(),
                           params)
    base = engine.generation_tokens_total
    while engine.generation_tokens_total - base < batch:  # prefill: every sequence gets its first token
        engine.step()
    done, start = engine.generation_tokens_total, time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    engine.platform.synchronize()
    return (engine.generation_tokens_total - done) / (time.perf_counter() - start)


# ---- attention: backend x block size, on the model's shapes -----------------------------------

@dataclass
class AttentionCase:
    name: str
    query_lens: list[int]
    seq_lens: list[int]


def attention_cases() -> list[AttentionCase]:
    """Decode alone at a long context, a batch of mixed contexts, and a prefill chunk over a prefix."""
    mixed = [256 + (i * 97) % 257 for i in range(16)]
    return [AttentionCase("decode b1 ctx1024", [1], [1024]),
            AttentionCase("decode b16 ctx256-512", [1] * 16, mixed),
            AttentionCase("prefill 256 over 256", [256], [512])]


def _case_inputs(case: AttentionCase, mc, block_size: int, dtype: torch.dtype, device: torch.device):
    import torch

    from zili.kernels.attention import AttentionMetadata

    tables, next_block = [], 0
    for s in case.seq_lens:
        n = -(-s // block_size)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    meta = AttentionMetadata.build(case.query_lens, case.seq_lens, tables, block_size, device)
    gen = torch.Generator().manual_seed(0)  # host RNG, then moved: same data on every device
    T = sum(case.query_lens)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    cache = rand(*mc.kv_cache_shape(next_block, block_size))
    return meta, cache, T, rand


def attention_timer(backend, case: AttentionCase, mc, block_size: int, dtype: torch.dtype,
                    device: torch.device) -> Callable[[], Any]:
    """One layer's attention for `case`, as a zero-argument call."""
    meta, cache, T, rand = _case_inputs(case, mc, block_size, dtype, device)
    H = mc.num_attention_heads
    if mc.use_mla:
        from zili.kernels.mla_attention import mla_attention

        r, dr, dn, dv = mc.kv_lora_rank, mc.qk_rope_head_dim, mc.qk_nope_head_dim, mc.v_head_dim
        q_nope, q_rope, w = rand(T, H, dn), rand(T, H, dr), rand(H, dn + dv, r) * 0.05
        scale = (dn + dr) ** -0.5
        if meta.is_decode_only:
            return lambda: backend.mla_decode(q_nope, q_rope, cache, meta.block_tables, meta.seq_lens,
                                              max(meta.seq_lens_cpu), w, scale)
        latent, k_rope = rand(T, r), rand(T, dr)
        return lambda: mla_attention(q_nope, q_rope, latent, k_rope, cache, meta, w, scale)
    d, n_kv = mc.head_dim, mc.num_key_value_heads
    q, k, v = rand(T, H, d), rand(T, n_kv, d), rand(T, n_kv, d)
    return lambda: backend.paged_attention(q, k, v, cache, meta, d ** -0.5)


def tune_attention(platform, mc, dtype: torch.dtype, block_sizes, repeats: int) -> tuple[dict, dict]:
    """Time every (backend, block size) on every case; the winner has the best geometric mean of
    time relative to the fastest per case. Returns (winner, per-candidate milliseconds per layer)."""
    from zili.kernels.backends import get_attention_backend, is_installed

    results: dict[str, dict[str, float]] = {}
    for name in platform.attention_backends():
        if not is_installed(name):
            continue
        backend = get_attention_backend(name)
        for bs in block_sizes:
            label = f"{name}/bs{bs}"
            try:
                results[label] = {c.name: 1e3 * best_time(attention_timer(backend, c, mc, bs, dtype, platform.device),
                                                          repeats, platform.synchronize)
                                  for c in attention_cases()}
            except Exception as e:  # a config that does not compile or fit: not a candidate
                logger.warning("attention %s failed: %s", label, e)
    if not results:
        raise RuntimeError("no attention backend could run")
    best_per_case = {c: min(r[c] for r in results.values()) for c in next(iter(results.values()))}

    def score(label: str) -> float:
        r = results[label]
        return math.exp(statistics.fmean(math.log(r[c] / best_per_case[c]) for c in r))

    winner = min(results, key=score)
    name, bs = winner.split("/bs")
    return {"attention_backend": name, "block_size": int(bs)}, results


# ---- Triton launch configs (GPUs; not run in CI) ----------------------------------------------

TRITON_SWEEP = {
    "decode": [{"decode_block_n": n, "decode_warps": w} for n in (32, 64, 128) for w in (2, 4, 8)],
    "prefill": [{"prefill_block_m": m, "prefill_block_n": n, "prefill_warps": w, "prefill_stages": s}
                for m in (32, 64, 128) for n in (32, 64) for w in (4, 8) for s in (1, 2, 3)],
    "mla": [{"mla_block_n": n, "mla_warps": w, "mla_block_h": h} for n in (16, 32, 64) for w in (4, 8) for h in (16, 32)],
}


def tune_triton(platform, mc, dtype: torch.dtype, block_size: int, repeats: int) -> tuple[dict, dict]:
    """Sweep each kernel's launch settings at the model's shapes. UNTESTED on a GPU."""
    from zili.kernels import triton_attention
    from zili.kernels.backends import get_attention_backend

    backend = get_attention_backend("triton")
    cases = attention_cases()
    groups = {"mla": cases[:2]} if mc.use_mla else {"decode": cases[:2], "prefill": cases[2:]}
    chosen: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    for group, group_cases in groups.items():
        best, best_ms = None, math.inf
        for candidate in TRITON_SWEEP[group]:
            triton_attention.set_config({**chosen, **candidate})
            try:
                ms = sum(1e3 * best_time(attention_timer(backend, c, mc, block_size, dtype, platform.device),
                                         repeats, platform.synchronize) for c in group_cases)
            except Exception as e:  # too much shared memory, too many registers...
                logger.info("triton %s %s failed: %s", group, candidate, e)
                continue
            timings[f"{group} {candidate}"] = round(ms, 4)
            if ms < best_ms:
                best, best_ms = candidate, ms
        if best is not None:
            chosen.update(best)
    triton_attention.set_config(chosen)
    return chosen, timings


# ---- decode-graph ladder (GPUs; not run in CI) -----------------------------------------------

def tune_graph_ladder(engine, max_batch: int, repeats: int) -> tuple[list[int], dict]:
    """Capture each candidate size and keep those where replay beats the eager step (forward and
    logits, as the runner executes it). Run on an H100 (benchmarks/gpu/extras.sh)."""
    from zili.engine.cuda_graphs import DecodeGraphs, batch_ladder
    from zili.engine.runner import StepInput

    runner, platform = engine.runner, engine.platform
    ladder = batch_ladder(max_batch)
    blocks_per_seq = 2  # a short context: graphs matter most where kernels are small
    graphs = DecodeGraphs(runner.model, runner.kv_caches, platform, ladder, blocks_per_seq, runner.block_size,
                          runner.device, runner.attention)
    graphs.capture()
    kept, timings = [], {}
    previous = runner.decode_graphs
    for size in ladder:
        # One decode token per sequence at position block_size, as the engine's runner receives it.
        tables = [[(i * blocks_per_seq + j) % engine.kv_cache.num_blocks for j in range(blocks_per_seq)]
                  for i in range(size)]
        step = StepInput([[0]] * size, [runner.block_size] * size, tables, [True] * size)
        try:
            runner.decode_graphs = None
            eager = best_time(lambda: runner.execute(step), repeats, platform.synchronize)  # noqa: B023 (called at once)
            runner.decode_graphs = graphs
            replay = best_time(lambda: runner.execute(step), repeats, platform.synchronize)  # noqa: B023 (called at once)
        finally:
            runner.decode_graphs = previous
        timings[size] = {"eager_ms": round(1e3 * eager, 4), "graph_ms": round(1e3 * replay, 4)}
        if eager >= GRAPH_GAIN * replay:
            kept.append(size)
        else:
            break  # larger batches gain even less: the ladder stops here
    return kept, timings


# ---- the quantized/dense switch point, on the whole forward ------------------------------------

def tune_quant_rows(engine, repeats: int, max_rows: int) -> tuple[int, dict]:
    """Largest decode batch up to which the packed int4/int8 matmuls beat dense, each batch timed
    as a whole forward + logits (what a decode step costs). Stops at the first loss."""
    from zili.engine.runner import StepInput
    from zili.models.quantize import set_quant_max_rows

    runner, model = engine.runner, engine.runner.model
    ctx = runner.block_size  # one block per sequence is enough to time the matmuls
    chosen, timings = 0, {}
    for rows in [r for r in QUANT_ROW_CANDIDATES if r <= max_rows]:
        if rows > engine.kv_cache.num_blocks:
            break
        step = StepInput([[1]] * rows, [ctx - 1] * rows, [[i] for i in range(rows)], [True] * rows)
        set_quant_max_rows(model, 1 << 30)
        quant = best_time(lambda: runner.execute(step), repeats, engine.platform.synchronize)  # noqa: B023 (called at once)
        set_quant_max_rows(model, 0)
        dense = best_time(lambda: runner.execute(step), repeats, engine.platform.synchronize)  # noqa: B023 (called at once)
        timings[rows] = {"quantized_ms": round(1e3 * quant, 3), "dense_ms": round(1e3 * dense, 3)}
        if quant >= dense:
            break
        chosen = rows
    set_quant_max_rows(model, chosen)
    return chosen, timings


def tune_quant_kernels(model, repeats: int, rows_list: tuple[int, ...] = (1, 4, 16)) -> dict[str, Any]:
    """Microseconds per call of each packed-matmul candidate at each quantized layer shape of `model`
    (random codes of the same shape: the time does not depend on the values) and row count, with
    the winner per shape and row count. Candidates: zili's kernel on each level this CPU executes,
    torch's own kernel ("torch"), the dense matmul in the model's dtype ("dense")."""
    import torch

    from zili.kernels import cpu_isa
    from zili.layers.quant import Int4Weight, Int8Weight, float_group_quant

    shapes = sorted({(type(m.quant).__name__, m.out_features, m.in_features, m.weight.dtype)
                     for m in model.modules() if getattr(m, "quant", None) is not None}, key=str)
    levels = cpu_isa.executable_levels() if cpu_isa.enabled() else []
    out: dict[str, Any] = {}
    for form, n, k, dtype in shapes:
        w = torch.randn(n, k) * 0.05
        kernels = {}
        for level in [*levels, "torch"]:
            kernels[level] = (Int4Weight(float_group_quant(w), isa=level) if form == "Int4Weight"
                              else Int8Weight(w, isa=level)).matmul
        dense = w.to(dtype)
        kernels["dense"] = lambda x: torch.nn.functional.linear(x, dense)  # noqa: B023 (called at once)
        for rows in rows_list:
            x = torch.randn(rows, k, dtype=dtype)
            us = {name: round(1e6 * best_time(lambda: fn(x), repeats, lambda: None), 1) for name, fn in kernels.items()}  # noqa: B023 (called at once)
            out[f"{form}:{n}x{k}:rows{rows}"] = {"us": us, "winner": min(us, key=us.__getitem__)}
    return out


# ---- the whole run -----------------------------------------------------------------------------

def _engine(loaded, options: TuneOptions, kernel_config: dict | None = None, **overrides):
    """An engine on the already loaded model, tune cache off, sized for the measurements."""
    from zili.config import EngineConfig
    from zili.engine.builder import build_engine
    from zili.engine.runner import kv_bytes_per_block
    from zili.kernels.backends import use_attention_backend

    need = max(options.decode_batches) * (PROMPT_TOKENS + options.decode_tokens + 1)
    settings = dict(model=options.model, dtype=options.dtype, quantization=options.quantization,
                    max_num_seqs=max(options.max_num_seqs, max(options.decode_batches)), use_tune_cache=False,
                    max_model_len=min(loaded.config.max_position_embeddings, 4096),
                    enforce_eager=True)  # candidates are timed on the eager step; the graph ladder on its own
    settings.update(overrides)
    block = settings.get("block_size", EngineConfig.block_size)
    per_block = kv_bytes_per_block(loaded.config, block, loaded.dtype)
    blocks = max(-(-need // block) + 8, max(QUANT_ROW_CANDIDATES) + 8, 4 * max(options.decode_batches))
    engine = build_engine(EngineConfig(**settings, kv_cache_memory=blocks * per_block), loaded=loaded)
    if kernel_config:  # the engine installed the backend with default launch settings
        use_attention_backend(engine.attention_backend, kernel_config)
    return engine


def _load(options: TuneOptions, platform):
    """The model, quantized as the engine would with every layer shape's packed kernel measured
    (no time budget, no tune cache): (loaded, layers per form, the QuantizeReport)."""
    from zili.models.loader import load_model, open_checkpoint
    from zili.models.quantize import quantize_and_calibrate

    loaded = load_model(options.model, dtype=options.dtype, device=platform.device, load_format=options.load_format)
    source = loaded.source
    report = quantize_and_calibrate(loaded.model, options.quantization, loaded.dtype, platform.matmul_backend(),
                                    (lambda: open_checkpoint(source)) if source.format == "gguf" else None,
                                    calibrate=True, budget_s=None, trust_busy=True)
    return loaded, report.counts, report


def run_tuning(options: TuneOptions, say: Callable[[str], None] = print) -> TuneReport:
    from zili.kernels.backends import use_attention_backend
    from zili.platforms import current_platform
    from zili.platforms.tuning import TuneCache, model_key

    platform = current_platform()
    report = TuneReport(fingerprint=platform.fingerprint())
    m = report.measurements
    m["load_average_start"] = load_average()
    say(f"device: {platform.device_name()} ({platform.name}); load average {m['load_average_start']}")
    loaded, counts, quant_report = _load(options, platform)
    mc = loaded.config
    report.model_key = model_key(mc, loaded.dtype, options.quantization)
    say(f"model: {loaded.source.ref} -> {report.model_key}; weights {counts or 'dense'}")
    quantized = bool(set(counts) - {"dense"})
    if quant_report.kernels:
        report.device["quant_kernels"] = {key: c.to_json() for key, c in quant_report.kernels.items()}
        if quant_report.calibration is not None:
            m["quant_calibration_us"] = quant_report.calibration.timings_us
        say("packed matmul per layer shape: " + ", ".join(
            f"{key} -> {c.kernel} up to {c.max_rows} rows" for key, c in quant_report.kernels.items()))
    default_rows = quant_rows(loaded.model)  # per layer, what the engine's start-up calibration chooses

    threads = platform.thread_candidates()
    if len(threads) > 1:
        engine = _engine(loaded, options)
        rates: dict[int, list[float]] = {t: [] for t in threads}
        for _ in range(2):  # interleaved, best of two: the host's load drifts
            for t in threads:
                platform.set_num_threads(t)
                rates[t].append(decode_rate(engine, 1, PROMPT_TOKENS, options.decode_tokens))
        report.device["threads"] = max(threads, key=lambda t: max(rates[t]))
        m["threads_decode_tok_s"] = {t: round(max(r), 2) for t, r in rates.items()}
        say(f"threads: {m['threads_decode_tok_s']} tok/s (b=1) -> {report.device['threads']}")
    platform.set_num_threads(report.device.get("threads"))

    if "triton" in platform.attention_backends():
        try:
            report.device["triton"], m["triton_ms"] = tune_triton(platform, mc, loaded.dtype, 16, options.repeats)
            say(f"triton configs: {report.device['triton']}")
        except Exception as e:
            m["triton_error"] = repr(e)
            say(f"triton configs: failed ({e}); defaults kept")

    winner, m["attention_ms_per_layer"] = tune_attention(platform, mc, loaded.dtype, options.block_sizes,
                                                         options.repeats)
    report.device["attention_backend"] = winner["attention_backend"]
    report.model["block_size"] = winner["block_size"]
    say(f"attention: {winner} (ms per layer: {m['attention_ms_per_layer']})")
    use_attention_backend(winner["attention_backend"], report.device.get("triton"))

    engine = _engine(loaded, options, report.device.get("triton"), block_size=winner["block_size"],
                     attention_backend=winner["attention_backend"], threads=report.device.get("threads"))
    if quantized and platform.matmul_backend() == "cpu-packed":
        m["quant_kernels_us"] = tune_quant_kernels(loaded.model, options.repeats)
        wins = [v["winner"] for v in m["quant_kernels_us"].values()]
        say(f"packed matmul kernels (winner per layer shape and rows): {wins}")
    if quantized:
        report.model["quant_max_rows"], m["quant_rows_ms"] = tune_quant_rows(engine, options.repeats,
                                                                             options.max_num_seqs)
        calibrated = sorted(set(default_rows.values()))
        say(f"quantized matmuls up to {report.model['quant_max_rows']} rows (per-shape calibration: {calibrated})")

    from zili.kernels.backends import get_attention_backend

    if platform.supports_graph_capture() and get_attention_backend(winner["attention_backend"]).graph_safe_decode:
        try:
            report.device["graph_batch_sizes"], m["graph_ms"] = tune_graph_ladder(engine, options.max_num_seqs,
                                                                                  options.repeats)
            say(f"graph ladder: {report.device['graph_batch_sizes']}")
        except Exception as e:
            m["graph_error"] = repr(e)
            say(f"graph ladder: failed ({e})")

    if options.measure_compile and platform.compiles_decode_step():
        try:
            report.model["compiled_decode"], m["compiled_decode_tok_s"] = tune_compiled_decode(loaded, options, report)
            say(f"decode step: {'compiled' if report.model['compiled_decode'] else 'eager'} "
                f"({m['compiled_decode_tok_s']})")
        except Exception as e:  # a compiler limitation: the engine's own default stays
            m["compiled_decode_error"] = repr(e)
            say(f"compiled decode: failed ({e})")

    if options.compare:
        report.comparison = compare(loaded, options, report, default_rows if quantized else None, say)
    m["load_average_end"] = load_average()
    if options.write_cache:
        cache = TuneCache(options.cache)
        device = {k: v for k, v in report.device.items() if k != "quant_kernels"}
        report.cache_path = str(cache.store(platform, device, report.model_key, {
            **report.model, "measured": {"comparison": report.comparison, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}}))
        if "quant_kernels" in report.device:  # merged: other models' shapes stay
            cache.merge_device_entries(platform, "quant_kernels", report.device["quant_kernels"])
        say(f"saved to {report.cache_path}")
    return report


def tune_compiled_decode(loaded, options: TuneOptions, report: TuneReport) -> tuple[bool, dict[str, Any]]:
    """Decode tokens/s of the compiled step (zili.engine.compiled_decode) against the eager one at each
    comparison batch size, with the tuned settings, interleaved rounds; compiled is kept when the
    geometric mean of its speed-up is at least COMPILE_GAIN. The compile itself (a minute or two the
    first time, seconds from Inductor's cache) is not timed."""
    tuned = dict(threads=report.device.get("threads"), block_size=report.model.get("block_size"),
                 attention_backend=report.device.get("attention_backend"))
    tuned = {k: v for k, v in tuned.items() if v is not None}
    engines = {"eager": _engine(loaded, options, report.device.get("triton"), **tuned),
               "compiled": _engine(loaded, options, report.device.get("triton"), **tuned, enforce_eager=False)}
    rates: dict[str, dict[int, list[float]]] = {name: {b: [] for b in options.decode_batches} for name in engines}
    for _ in range(options.compare_rounds):
        for batch in options.decode_batches:
            for name, engine in engines.items():
                rates[name][batch].append(decode_rate(engine, batch, PROMPT_TOKENS, options.decode_tokens))
    med = {name: {b: statistics.median(r) for b, r in per.items()} for name, per in rates.items()}
    gain = math.exp(statistics.fmean(math.log(med["compiled"][b] / med["eager"][b]) for b in options.decode_batches))
    return gain >= COMPILE_GAIN, {f"b{b}": {n: round(med[n][b], 2) for n in engines} for b in options.decode_batches} | {
        "gain": round(gain, 3)}


def quant_rows(model) -> dict[str, int]:
    """Each quantized layer's row limit, by module name."""
    return {name: m.quant.max_rows for name, m in model.named_modules() if getattr(m, "quant", None) is not None}


def set_quant_rows(model, rows: int | dict[str, int]) -> None:
    """One row limit for every quantized layer, or each layer's own (`quant_rows`)."""
    for name, m in model.named_modules():
        if getattr(m, "quant", None) is not None:
            m.quant.max_rows = rows if isinstance(rows, int) else rows.get(name, m.quant.max_rows)


def compare(loaded, options: TuneOptions, report: TuneReport, default_rows: dict[str, int] | None,
            say: Callable[[str], None]) -> dict[str, Any]:
    """Decode tokens/s with the defaults and with the winners, interleaved rounds, median of each.
    Both run the packed kernels chosen per layer shape; "default" has the calibrated per-shape row
    limits, "tuned" the whole-forward one (quant_max_rows), threads, block size and backend."""

    tuned_rows = report.model.get("quant_max_rows")
    setups = {
        "default": (dict(), default_rows, None),
        "tuned": (dict(threads=report.device.get("threads"), block_size=report.model["block_size"],
                       attention_backend=report.device["attention_backend"]), tuned_rows, report.device.get("triton")),
    }
    result: dict[str, Any] = {"decode_tokens": options.decode_tokens, "prompt_tokens": PROMPT_TOKENS,
                              "rounds": options.compare_rounds, "load_average_before": load_average()}
    for batch in options.decode_batches:
        rates: dict[str, list[float]] = {name: [] for name in setups}
        for _ in range(options.compare_rounds):
            for name, (overrides, rows, kernels) in setups.items():
                engine = _engine(loaded, options, kernels, **{k: v for k, v in overrides.items() if v is not None})
                if rows is not None:
                    set_quant_rows(loaded.model, rows)
                rates[name].append(decode_rate(engine, batch, PROMPT_TOKENS, options.decode_tokens))
        med = {name: statistics.median(r) for name, r in rates.items()}
        result[f"b{batch}"] = {"default_tok_s": round(med["default"], 2), "tuned_tok_s": round(med["tuned"], 2),
                               "speedup": round(med["tuned"] / med["default"], 3),
                               "all_tok_s": {n: [round(x, 2) for x in r] for n, r in rates.items()}}
        say(f"decode b={batch}: default {med['default']:.1f} tok/s, tuned {med['tuned']:.1f} tok/s "
            f"-> x{med['tuned'] / med['default']:.3f}")
    result["load_average_after"] = load_average()
    if tuned_rows is not None:
        set_quant_rows(loaded.model, tuned_rows)
    return result


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter(f"{what}: comma-separated positive integers, got {text!r}")
    return values


@engine_options("dtype", "quantization", "load_format")  # as the engine will run the model
def tune(
    model: Annotated[Optional[str], typer.Argument(help="Path to a .gguf file, an HF checkpoint directory, or an "
                                                    "alias (see `zili models`). Default: smollm2-135m.")] = None,
    block_sizes: Annotated[str, typer.Option(help="KV block sizes to measure, comma-separated.")] = "16,32,64,128",
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats per candidate (best of).")] = 5,
    decode_tokens: Annotated[int, typer.Option(min=4, help="Tokens generated per decode measurement.")] = 32,
    batches: Annotated[str, typer.Option(help="Decode batch sizes for the comparison, comma-separated.")] = "1,8",
    compare: Annotated[bool, typer.Option("--compare/--no-compare",
                                          help="Measure decode tokens/s with defaults and tuned.")] = True,
    cache: Annotated[Optional[Path], typer.Option(help="Tune cache file (default: $ZILI_TUNE_CACHE or "
                                                  "~/.cache/zili/tune.json).")] = None,
    measure_compile: Annotated[bool, typer.Option(
        "--measure-compile/--no-measure-compile",
        help="Time the compiled decode step against eager (compiles it: a minute or two the first time).")] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Measure and report; leave the cache alone.")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the full report here.")] = None,
    engine_args: dict[str, Any] | None = None,  # dtype, quantization, load_format (zili.cli_options)
) -> None:
    """Measure kernels and settings on this device at the model's shapes; save the winners for `zili serve`."""
    from zili.choices import QUANTIZATION_MODES

    engine_args = engine_args or {}  # TuneOptions fields, like EngineConfig's
    if engine_args.get("quantization", TuneOptions.quantization) not in QUANTIZATION_MODES:
        raise typer.BadParameter(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}")
    options = TuneOptions(model=model, block_sizes=_ints(block_sizes, "--block-sizes"), repeats=repeats, compare=compare,
                          decode_tokens=decode_tokens, decode_batches=_ints(batches, "--batches"), cache=cache,
                          write_cache=not dry_run, measure_compile=measure_compile, **engine_args)
    try:
        report = run_tuning(options, say=lambda line: typer.echo(line, err=True))
    except (ValueError, FileNotFoundError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e
    if json_out is not None:
        json_out.write_text(json.dumps(report.to_json(), indent=1, default=str))
    typer.echo(json.dumps({"device": report.device, "model": report.model, "comparison": report.comparison},
                          default=str))
