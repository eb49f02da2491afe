"""Which packed matmul each quantized layer shape runs, and up to how many rows: chosen by measurement.

A quantized `Linear` holds one packed copy of its weight (two would double the resident weights)
and a row limit past which it takes the dense matmul (`Linear.forward`). So the choice per layer
shape is a pair, a `KernelChoice`:

  kernel    "torch" (aten's int4 / int8 kernels, bf16 activations) or a zili kernel level
            ("avx512", "avx2", "portable": zili.kernels.cpu_isa, int8 activations per block of 32)
  max_rows  the packed kernel serves up to this many rows (a decode batch); dense above

`calibrate_kernels` times every candidate and the dense matmul on random weights of each shape
(a matmul's time does not depend on the values) at row counts 1, 2, 4 ... 64, and picks:
  - the kernel with the best geometric mean of time over the row counts where a packed kernel
    beats dense (decode's row counts: where the choice matters);
  - max_rows: the last row count, going up, where that kernel still beats dense; where it still
    wins at 64, prefill row counts (128, 256, 512) are timed too, and a kernel that wins at all of
    them serves every row count (UNBOUNDED_ROWS).
"Dense" is the path the layer takes past its limit: for zili's kernels under ZILI_DENSE_WEIGHTS=dequant
(the default) the codes dequantized into scratch memory, then the dense matmul ("dequant" in the
timings; no dense copy held); for torch's kernels, or with ZILI_DENSE_WEIGHTS=copy, a dense copy
(oneDNN-packed where available, "dense").

Bounded: a deadline (`budget_s`) is checked before building each shape's candidates and before
each row count; past it, the shapes not finished get no measured choice (the caller falls back
to the default and does not cache them), so a start overruns the budget by at most one
measurement (a few tens of ms). Shapes are measured in order of the weight bytes they carry in
the model, so a short budget goes to the layers that cost the most. On an overloaded host (load
average above one per CPU) the engine does not calibrate at all: the timings would be other
processes' time slices. Deterministic in its data: a private generator (seed 0), never the
global RNG; only the kernel choice changes numerics.

The engine reads choices from the tune cache (zili.platforms.tuning, key "quant_kernels"),
calibrates the missing ones at start and stores them there (zili.engine.builder).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from zili import envs
from zili.kernels import cpu_isa
from zili.layers import onednn
from zili.layers.quant import DEFAULT_MAX_ROWS, Int4Weight, Int8Weight, float_group_quant

logger = logging.getLogger(__name__)

ROW_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)
# Prefill row counts, timed for a shape whose chosen kernel still beats its reference at the last
# decode row count (a second pass, after every shape's decode rows, within the same budget). On an
# AVX2-only Zen 3 zili's int4 kernel took 0.56-0.75x the dequantize-then-dense time at 128 rows and
# 0.68-0.98x at 512 on SmolLM2's projections (fp32 dense: no bf16 hardware), so a 64-row cap sent
# every prefill chunk to the slower path (benchmarks/notes/cpu-isa.md, 2026-11-30 Zen 3 section).
PREFILL_ROW_CANDIDATES = (128, 256, 512)
# max_rows of a kernel that still won at the last prefill candidate: every row count. Past 512 rows
# both paths are linear in the rows (the packed kernel computes each row alone; the dense one is
# compute-bound), so the ratio at 512 holds for larger chunks (Zen 3, 2,048 rows: 0.72-1.02x).
UNBOUNDED_ROWS = 1 << 30
DEFAULT_BUDGET_S = 5.0  # start-up calibration: a few seconds on 2 cores (SmolLM2-135M measured ~2-3 s)
TORCH = "torch"
# Past this many output features a matrix-vector product is memory-bound and its time linear in N,
# so a tall weight (an LM head: 49,152 rows) is timed on its first TIMED_MAX_OUT rows.
TIMED_MAX_OUT = 16384
BUSY_LOAD_PER_CPU = 1.0
# On an overloaded host, zili's kernels run calls below this much work on one thread
# (`parallel_min_bytes`): every per-layer product and attention call of a small model's decode step.
BUSY_PARALLEL_MIN_BYTES = 2 << 20


def load_per_cpu() -> float:
    """The 1-minute load average per CPU this process may run on (0 where the OS does not say)."""
    try:
        return os.getloadavg()[0] / max(1, len(os.sched_getaffinity(0)))
    except (OSError, AttributeError):
        return 0.0


def raised_priority() -> bool:
    """Whether this process runs at a negative nice value (a benchmark run at `nice -n -10`): its threads then
    take a core back from the load at once, so a loaded host does not make its parallel regions wait."""
    try:
        return os.getpriority(os.PRIO_PROCESS, 0) < 0
    except (OSError, AttributeError):
        return False


def parallel_min_bytes(busy: bool) -> int:
    """The work threshold for zili's kernels (`cpu_isa.set_parallel_min_bytes`): ZILI_PARALLEL_MIN_BYTES
    when set, else BUSY_PARALLEL_MIN_BYTES on a `busy` host and 0 (every call split over the threads)
    otherwise. Why: a parallel region's fork and join wait for every thread to be scheduled, and with
    more runnable threads than CPUs that is a time slice (milliseconds) per region; a decode step of
    SmolLM2-135M has ~180 of them. On an idle host the second thread is worth its few microseconds of
    synchronisation (benchmarks/notes/cpu-speed.md, 2026-11-30 breakdown)."""
    forced = envs.parallel_min_bytes()
    if forced is not None:
        return forced
    return BUSY_PARALLEL_MIN_BYTES if busy else 0


@dataclass(frozen=True)
class KernelChoice:
    """The packed kernel one layer shape runs ("torch" or a zili level) and its row limit."""

    kernel: str
    max_rows: int

    def to_json(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "max_rows": self.max_rows, "prefill_timed": True,
                "kernels_source": cpu_isa.source_version()}

    @classmethod
    def from_json(cls, value: Any) -> KernelChoice | None:
        """A cached entry, or None when it is malformed (a hand-edited cache must not stop a start) or was
        measured against another version of zili's kernel sources (`cpu_isa.source_version`: the winner
        and its row limit may have moved with them, so the shape is measured again)."""
        if not isinstance(value, dict):
            return None
        kernel, rows = value.get("kernel"), value.get("max_rows")
        if not isinstance(kernel, str) or not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            return None
        if rows == ROW_CANDIDATES[-1] and value.get("prefill_timed") is not True:
            return None  # cached before prefill row counts were timed: it may win past 64 rows, measure again
        if value.get("kernels_source") != cpu_isa.source_version():
            return None
        return cls(kernel, rows)


@dataclass
class Calibration:
    """What `calibrate_kernels` measured: a choice per finished shape, microseconds per call of
    every candidate ("dense" included) per shape and row count, the shapes the budget cut, seconds."""

    choices: dict[str, KernelChoice] = field(default_factory=dict)
    timings_us: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    cut: list[str] = field(default_factory=list)
    seconds: float = 0.0
    load_per_cpu: float = 0.0  # the higher of the host's load averages per CPU before and after

    @property
    def busy(self) -> bool:
        """More runnable threads than CPUs while measuring: the times are partly other processes'
        time slices (measured: every call of a 2-thread matmul took 7-20 ms at load 5 per CPU), so
        they rank nothing."""
        return self.load_per_cpu > BUSY_LOAD_PER_CPU


def shape_key(form: str, out_features: int, in_features: int, dtype: torch.dtype) -> str:
    """"int4:960x576:bfloat16": the weight form, [N x K] and the activation dtype a choice holds for."""
    return f"{form}:{out_features}x{in_features}:{str(dtype).removeprefix('torch.')}"


def forced_kernel() -> str | None:
    """The kernel ZILI_PACKED_KERNELS forces ("torch", or "zili": this CPU's selected level), None
    when unset ("auto" too): measured. ValueError for another value."""
    value = (envs.get_str(envs.ZILI_PACKED_KERNELS) or "auto").lower()
    if value == "auto":
        return None
    if value == TORCH:
        return TORCH
    if value == "zili":
        return cpu_isa.selected() if usable(cpu_isa.selected()) else TORCH
    raise ValueError(f"{envs.ZILI_PACKED_KERNELS.name} must be zili, torch or auto, got {value!r}")


def usable(kernel: str) -> bool:
    """Whether `kernel` runs here: "torch" always; a zili level when the kernels are on
    (ZILI_CPU_KERNELS), the CPU executes it and its build loads."""
    if kernel == TORCH:
        return True
    if not cpu_isa.enabled() or kernel not in cpu_isa.executable_levels():
        return False
    return cpu_isa.load(kernel)


def candidates() -> list[str]:
    """The kernels calibration races: the forced one alone, else this process's zili level
    (ZILI_CPU_ISA lowers it) where it builds, and torch's."""
    forced = forced_kernel()
    if forced is not None:
        return [forced]
    level = cpu_isa.selected() if cpu_isa.enabled() else None
    return [level, TORCH] if level is not None and usable(level) else [TORCH]


def default_choice() -> KernelChoice:
    """Uncalibrated (ZILI_CALIBRATE=0, --no-calibrate, or past the budget): the forced kernel, else
    torch's (the accuracy-safest: bf16 activations), up to DEFAULT_MAX_ROWS rows."""
    return KernelChoice(forced_kernel() or TORCH, DEFAULT_MAX_ROWS)


# Row limit of `busy_choice` per kernel level, dense above: where the packed kernel won on the shapes
# calibrated so far. avx512 (bf16 activations, dense bf16 on AMX/oneDNN): tune entries' limits 2-16.
# avx2 (fp32 activations, dense fp32): SmolLM2's int4 shapes beat MKL's fp32 matmul up to 32-64 rows
# (2026-11-30, forced avx2 on the Xeon, e.g. 3072x576 at 16 rows 298 us against 604 dense). Others: 4.
BUSY_MAX_ROWS = {"avx512": 4, "avx2": 32}
BUSY_MAX_ROWS_OTHER = 4
# The same when the layer holds no dense copy (ZILI_DENSE_WEIGHTS=dequant): above its limit it dequantizes
# into scratch memory first, which zili's int4 kernel beat at 64 rows on all four SmolLM2 shapes (avx512,
# bf16; benchmarks/notes/memory.md), so its limit goes up to the calibration's largest row count.
BUSY_MAX_ROWS_DEQUANT = {"avx512": 64, "avx2": 64}


def busy_choice() -> KernelChoice:
    """An overloaded host's choice (start-up calibration skipped or its timings dropped): the forced
    kernel, else zili's kernel at this CPU's level where it runs (int8 activations and integer dot
    products, llama.cpp's scheme, which beat torch's int4/int8 kernels at 1-4 rows on every level and
    shape measured), up to BUSY_MAX_ROWS[level] rows; torch's where no level runs. Unlike the uncalibrated
    `default_choice` (`--no-calibrate`), a busy start is not a request for torch's kernels: it is the
    same server on a machine that happened to be loaded, so it should not be the slow one."""
    forced = forced_kernel()
    if forced is not None:
        return KernelChoice(forced, DEFAULT_MAX_ROWS)
    level = cpu_isa.selected() if cpu_isa.enabled() else None
    if level is not None and usable(level):
        limits = BUSY_MAX_ROWS_DEQUANT if envs.dense_weights() == "dequant" else BUSY_MAX_ROWS
        return KernelChoice(level, limits.get(level, BUSY_MAX_ROWS_OTHER))
    return KernelChoice(TORCH, DEFAULT_MAX_ROWS)


def row_invariant_choice() -> KernelChoice:
    """For batch-invariant mode (EngineConfig.deterministic): zili's kernel at this CPU's level where it
    runs, whose rows are each computed alone whatever the row count (`Int4Weight.row_invariant`), else
    torch's (which `Linear` then calls in fixed row tiles). Its row limit is not consulted there."""
    level = cpu_isa.selected() if cpu_isa.enabled() else None
    return KernelChoice(level if level is not None and usable(level) else TORCH, DEFAULT_MAX_ROWS)


def _packed(form: str, weight: torch.Tensor, kernel: str):
    if form == "int4":
        return Int4Weight(float_group_quant(weight), isa=kernel)
    return Int8Weight(weight, isa=kernel)


def _dense(weight: torch.Tensor, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """The dense path a layer of this dtype takes past its row limit (oneDNN-packed bf16 where available)."""
    if onednn.available(dtype):
        return onednn.PackedDense(weight.to(dtype)).matmul
    w = weight.to(dtype)
    return lambda x: F.linear(x, w)


def _reference_name(candidates: Collection[str], kernel: str) -> str:
    """The path a layer on `kernel` takes past its row limit, among the timed `candidates`: the
    dequantize-then-dense path where it is one (zili's kernels, ZILI_DENSE_WEIGHTS=dequant), else the
    dense copy."""
    return "dequant" if kernel != TORCH and "dequant" in candidates else "dense"


def _reference(timing: dict[str, float], kernel: str) -> float:
    """The time of that path (`_reference_name`) in one row count's timings."""
    return timing[_reference_name(timing, kernel)]


def race(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Best-of-`repeats` microseconds per call of each candidate, timed round-robin (the order
    rotating each round) after one warm-up call each, so a load change on a shared host hits every
    candidate alike instead of whichever was timed during it."""
    names = list(calls)
    for name in names:
        calls[name]()  # first touch of the packed weight, kernel dispatch
    best = dict.fromkeys(names, math.inf)
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            start = time.perf_counter()
            calls[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: round(1e6 * t, 2) for name, t in best.items()}


def choose(timings: dict[int, dict[str, float]], kernels: Sequence[str]) -> KernelChoice:
    """The choice from one shape's timings {rows: {candidate or "dense": us}} (see the module doc)."""
    rows = sorted(timings)
    winning = [r for r in rows if any(timings[r][k] < _reference(timings[r], k) for k in kernels)]
    if not winning:
        return KernelChoice(min(kernels, key=lambda k: timings[rows[0]][k]) if rows else kernels[0], 0)

    def score(k: str) -> float:
        return statistics.fmean(math.log(timings[r][k]) for r in winning)

    kernel = min(kernels, key=score)
    limit = 0
    for r in rows:
        if timings[r][kernel] >= _reference(timings[r], kernel):
            break
        limit = r
    return KernelChoice(kernel, limit)


def _extend_to_prefill(choice: KernelChoice, k: int, calls: dict[str, Callable[[torch.Tensor], Any]],
                       dtype: torch.dtype, prefill_rows: Sequence[int], repeats: int, gen: torch.Generator,
                       timings: dict[int, dict[str, float]], clock: Callable[[], float],
                       deadline: float) -> KernelChoice:
    """`choice` with its limit moved up through `prefill_rows` while its kernel beats its reference
    (see `calibrate_kernels`); records the timings in `timings`."""
    reference = _reference_name(calls, choice.kernel)
    timed = {choice.kernel: calls[choice.kernel], reference: calls[reference]}
    limit = choice.max_rows
    for r in prefill_rows:
        if clock() >= deadline:
            return KernelChoice(choice.kernel, limit)
        x = torch.randn(r, k, generator=gen).to(dtype)
        timings[r] = race({name: functools.partial(fn, x) for name, fn in timed.items()}, repeats)
        if timings[r][choice.kernel] >= timings[r][reference]:
            return KernelChoice(choice.kernel, limit)
        limit = r
    return KernelChoice(choice.kernel, UNBOUNDED_ROWS)


def calibrate_kernels(shapes: dict[str, tuple[str, int, int, int]], dtype: torch.dtype,
                      kernels: Sequence[str] | None = None, budget_s: float | None = DEFAULT_BUDGET_S,
                      rows: Sequence[int] = ROW_CANDIDATES, repeats: int = 5, seed: int = 0,
                      clock: Callable[[], float] = time.perf_counter,
                      prefill_rows: Sequence[int] = PREFILL_ROW_CANDIDATES,
                      per_sequence: Collection[str] = ()) -> Calibration:
    """Measure and choose a `KernelChoice` per shape (`.busy` says whether the host was overloaded).

    `shapes`: shape_key -> (form "int4"/"int8", out_features N, in_features K, number of layers);
    `dtype`: the activations' (the model's) dtype; `kernels`: candidates (default `candidates()`);
    `budget_s`: the deadline from the start (None: unbounded, `zili tune`); `clock`: seconds (tests
    pass a fake one). Shapes not finished within the budget are listed in `.cut` with no choice.

    Then, with the budget left, `prefill_rows` (ascending) for each finished shape whose kernel won at
    the last of `rows`, except the `per_sequence` shapes (an LM head: one row per sequence, never a
    prefill chunk): its limit moves up to the last of them it still wins, and to UNBOUNDED_ROWS when it
    wins at every one. Only the chosen kernel and its reference are timed there; a shape the deadline
    cuts in this pass keeps the limit it has reached."""
    kernels = list(kernels or candidates())
    result = Calibration(load_per_cpu=load_per_cpu())
    start = clock()
    deadline = math.inf if budget_s is None else start + budget_s
    gen = torch.Generator().manual_seed(seed)
    order = sorted(shapes, key=lambda key: -shapes[key][1] * shapes[key][2] * shapes[key][3])
    extend: list[tuple[str, int, dict[str, Callable[[torch.Tensor], Any]]]] = []
    with torch.inference_mode():
        for key in order:
            form, n, k, _ = shapes[key]
            if clock() >= deadline:
                result.cut.append(key)
                continue
            weight = torch.randn(min(n, TIMED_MAX_OUT), k, generator=gen) * 0.05
            packed = {kernel: _packed(form, weight, kernel) for kernel in kernels}
            calls = {kernel: p.matmul for kernel, p in packed.items()}
            calls["dense"] = _dense(weight, dtype)
            dequantizing = [p for p in packed.values() if getattr(p, "dequantizes", False)]
            if dequantizing and envs.dense_weights() == "dequant":
                calls["dequant"] = dequantizing[0].dense_matmul
            timings: dict[int, dict[str, float]] = {}
            for r in rows:
                if clock() >= deadline:
                    break
                x = torch.randn(r, k, generator=gen).to(dtype)
                timings[r] = race({name: functools.partial(fn, x) for name, fn in calls.items()}, repeats)
                if all(timings[r][kn] >= _reference(timings[r], kn) for kn in kernels):
                    break  # dense wins from here on: larger row counts favour it more
            result.timings_us[key] = timings
            finished = bool(timings) and (len(timings) == len(rows) or
                                          all(timings[max(timings)][kn] >= _reference(timings[max(timings)], kn)
                                              for kn in kernels))
            if finished:
                result.choices[key] = choose(timings, kernels)
                if result.choices[key].max_rows == rows[-1] and prefill_rows and key not in per_sequence:
                    extend.append((key, k, calls))
            else:
                result.cut.append(key)
        for key, k, calls in extend:
            if clock() >= deadline:
                break
            result.choices[key] = _extend_to_prefill(result.choices[key], k, calls, dtype, prefill_rows, repeats,
                                                     gen, result.timings_us[key], clock, deadline)
    result.seconds = clock() - start
    result.load_per_cpu = max(result.load_per_cpu, load_per_cpu())
    return result
