"""The packed-matmul choice per layer shape: a saved tune entry is keyed by CPU model + flags + kernel
level and applied by the engine; an untuned machine calibrates once within its budget, logs and caches
the choices, and the next start reads them; ZILI_CPU_ISA changes the key and the candidates."""

from __future__ import annotations

import itertools
import json
import logging

import pytest
import torch

from tests.tiny_models import write_tiny_llama
from zili.config import EngineConfig
from zili.engine.builder import build_engine
from zili.kernels import cpu_isa
from zili.layers import quant_calibration
from zili.layers.quant_calibration import KernelChoice, calibrate_kernels, choose, shape_key
from zili.platforms.cpu import CpuPlatform
from zili.platforms.tuning import TuneCache, fingerprint_key, load_tuning


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def cache_path(tmp_path, monkeypatch):
    path = tmp_path / "tune.json"
    monkeypatch.setenv("ZILI_TUNE_CACHE", str(path))
    monkeypatch.delenv("ZILI_PACKED_KERNELS", raising=False)
    threads = torch.get_num_threads()
    yield path
    torch.set_num_threads(threads)


def _engine(tiny_dir, **overrides):
    return build_engine(EngineConfig(model=str(tiny_dir), dtype="float32", quantization="int4",
                                     kv_cache_memory=2**20, **overrides))


def _layers(engine) -> dict[str, tuple[str, int]]:
    """shape_key -> (kernel, max_rows) of the engine's quantized layers (one value per shape)."""
    found: dict[str, set] = {}
    for m in engine.runner.model.modules():
        q = getattr(m, "quant", None)
        if q is not None:
            form = "int4" if type(q).__name__ == "Int4Weight" else "int8"
            key = shape_key(form, m.out_features, m.in_features, torch.float32)
            found.setdefault(key, set()).add((q.isa or "torch", q.max_rows))
    assert all(len(v) == 1 for v in found.values()), found
    return {k: next(iter(v)) for k, v in found.items()}


def test_choose_takes_the_kernel_that_wins_where_packed_beats_dense():
    timings = {1: {"avx512": 10, "torch": 30, "dense": 100},
               2: {"avx512": 20, "torch": 30, "dense": 100},
               4: {"avx512": 60, "torch": 40, "dense": 100},
               8: {"avx512": 150, "torch": 90, "dense": 100},
               16: {"avx512": 300, "torch": 200, "dense": 100}}
    # geometric means over rows 1..8: avx512 (10*20*60*150)^(1/4) ~ 39 < torch (30*30*40*90)^(1/4) ~ 43;
    # avx512 beats dense up to 4 rows (150 >= 100 at 8)
    assert choose(timings, ["avx512", "torch"]) == KernelChoice("avx512", 4)
    assert choose(timings, ["torch"]) == KernelChoice("torch", 8)
    dense_always = {1: {"avx2": 200, "torch": 300, "dense": 100}}
    assert choose(dense_always, ["avx2", "torch"]) == KernelChoice("avx2", 0)


def test_budget_is_enforced_before_each_measurement():
    shapes = {"int4:32x64:float32": ("int4", 32, 64, 2), "int8:16x64:float32": ("int8", 16, 64, 1)}
    nothing = calibrate_kernels(shapes, torch.float32, ["torch"], budget_s=0.0)
    assert nothing.choices == {} and nothing.timings_us == {} and sorted(nothing.cut) == sorted(shapes)
    # A clock that advances 1 s per reading, budget 2.5 s: the largest shape is started (t=1), its first
    # row count measured (t=2), then the deadline stops it (t=3) and the second shape is never started.
    ticks = itertools.count()
    cal = calibrate_kernels(shapes, torch.float32, ["torch"], budget_s=2.5, clock=lambda: float(next(ticks)))
    assert list(cal.timings_us) == ["int4:32x64:float32"] and list(cal.timings_us["int4:32x64:float32"]) == [1]
    assert "int8:16x64:float32" in cal.cut
    assert set(cal.choices) | set(cal.cut) == set(shapes)


def _scripted_race(times_us):
    """A stand-in for `quant_calibration.race`: each candidate's time at a row count from `times_us`
    (name -> rows -> us), read off the activation the call was bound to; records what was timed."""
    timed: list[tuple[int, tuple[str, ...]]] = []

    def race(calls, repeats):
        rows = next(iter(calls.values())).args[0].shape[0]
        timed.append((rows, tuple(sorted(calls))))
        return {name: float(times_us[name](rows)) for name in calls}
    return race, timed


@pytest.mark.parametrize("packed_us, expected", [
    (lambda r: 0.5 * r, quant_calibration.UNBOUNDED_ROWS),       # wins at every prefill count too
    (lambda r: 0.5 * r if r <= 256 else 2 * r, 256),             # loses at 512
    (lambda r: 0.5 * r if r <= 64 else 2 * r, 64),               # loses at the first prefill count
])
def test_a_kernel_that_wins_at_64_rows_is_timed_at_prefill_row_counts(monkeypatch, packed_us, expected):
    race, timed = _scripted_race({"torch": packed_us, "dense": lambda r: float(r)})
    monkeypatch.setattr(quant_calibration, "race", race)
    shapes = {"int4:32x64:float32": ("int4", 32, 64, 2)}
    cal = calibrate_kernels(shapes, torch.float32, ["torch"], budget_s=None)
    assert cal.choices["int4:32x64:float32"] == KernelChoice("torch", expected)
    prefill = [(rows, names) for rows, names in timed if rows > 64]
    # the prefill pass times only the chosen kernel and its reference, and stops at the first loss
    assert all(names == ("dense", "torch") for _, names in prefill)
    # timed up to and including the first row count where the kernel lost (every one when it never did)
    assert [rows for rows, _ in prefill] == [r for r in (128, 256, 512) if r <= 2 * min(expected, 256)]


def test_prefill_rows_are_not_timed_for_a_head_or_a_kernel_that_lost_at_decode_rows(monkeypatch):
    race, timed = _scripted_race({"torch": lambda r: 0.5 * r if r < 32 else 2 * r, "dense": lambda r: float(r)})
    monkeypatch.setattr(quant_calibration, "race", race)
    shapes = {"int4:32x64:float32": ("int4", 32, 64, 2)}
    assert calibrate_kernels(shapes, torch.float32, ["torch"], budget_s=None).choices == \
        {"int4:32x64:float32": KernelChoice("torch", 16)}
    assert max(rows for rows, _ in timed) == 32
    race, timed = _scripted_race({"torch": lambda r: 0.5 * r, "dense": lambda r: float(r)})
    monkeypatch.setattr(quant_calibration, "race", race)
    head = {"int8:96x64:float32": ("int8", 96, 64, 1)}
    cal = calibrate_kernels(head, torch.float32, ["torch"], budget_s=None, per_sequence={"int8:96x64:float32"})
    assert cal.choices == {"int8:96x64:float32": KernelChoice("torch", 64)} and max(r for r, _ in timed) == 64


def test_the_prefill_pass_keeps_the_limit_reached_when_the_budget_ends(monkeypatch):
    race, _ = _scripted_race({"torch": lambda r: 0.5 * r, "dense": lambda r: float(r)})
    monkeypatch.setattr(quant_calibration, "race", race)
    # A clock that advances 1 s per reading: the start (0), the shape (1), rows 1..64 (2-8), the prefill
    # pass (9), 128 rows (10), 256 rows (11): a 10.5 s budget times 128 rows and stops before 256.
    ticks = itertools.count()
    cal = calibrate_kernels({"int4:32x64:float32": ("int4", 32, 64, 2)}, torch.float32, ["torch"], budget_s=10.5,
                            clock=lambda: float(next(ticks)))
    assert cal.choices["int4:32x64:float32"] == KernelChoice("torch", 128)
    assert max(cal.timings_us["int4:32x64:float32"]) == 128


def test_a_cached_64_row_limit_from_before_the_prefill_rows_is_measured_again():
    source = cpu_isa.source_version()
    assert KernelChoice.from_json({"kernel": "avx2", "max_rows": 64, "kernels_source": source}) is None
    assert KernelChoice.from_json({"kernel": "avx2", "max_rows": 32, "kernels_source": source}) == KernelChoice("avx2", 32)
    fresh = KernelChoice("avx2", 64).to_json()
    assert KernelChoice.from_json(fresh) == KernelChoice("avx2", 64)
    assert KernelChoice.from_json(KernelChoice("avx2", quant_calibration.UNBOUNDED_ROWS).to_json()) == \
        KernelChoice("avx2", quant_calibration.UNBOUNDED_ROWS)


def test_a_choice_measured_against_other_kernel_sources_is_measured_again(monkeypatch):
    cached = KernelChoice("avx2", 32).to_json()
    assert cached["kernels_source"] == cpu_isa.source_version()
    assert KernelChoice.from_json(cached) == KernelChoice("avx2", 32)
    monkeypatch.setattr(cpu_isa, "source_version", lambda: "another-version")  # the kernels were edited
    assert KernelChoice.from_json(cached) is None
    assert KernelChoice.from_json({"kernel": "avx2", "max_rows": 32}) is None  # cached before versions were kept


def test_packed_kernels_env_is_validated(monkeypatch):
    monkeypatch.setenv("ZILI_PACKED_KERNELS", "fastest")
    with pytest.raises(ValueError, match="ZILI_PACKED_KERNELS"):
        quant_calibration.candidates()
    monkeypatch.setenv("ZILI_PACKED_KERNELS", "torch")
    assert quant_calibration.candidates() == ["torch"]


def test_saved_entry_is_applied_per_layer_shape(tiny_dir, cache_path):
    """The engine runs the kernel and row limit the tune entry names, shape by shape (ZILI_CALIBRATE=0
    here, as in the whole suite: nothing is measured)."""
    untuned = _layers(_engine(tiny_dir))
    assert set(untuned.values()) == {("torch", 16)}  # the defaults
    level = cpu_isa.selected()
    shapes = sorted(untuned)
    entry = {key: KernelChoice(level if i % 2 == 0 else "torch", 3 + i).to_json() for i, key in enumerate(shapes)}
    TuneCache().store(CpuPlatform(), {"quant_kernels": entry})
    applied = _layers(_engine(tiny_dir))
    assert applied == {key: (e["kernel"], e["max_rows"]) for key, e in entry.items()}
    # An entry naming a kernel this process cannot run (here: a malformed one) is ignored, not fatal.
    malformed = {shapes[0]: {**KernelChoice("avx2", 2).to_json(), "kernel": "avx9000"},
                 shapes[1]: {**KernelChoice("torch", 2).to_json(), "max_rows": -1}}
    TuneCache().store(CpuPlatform(), {"quant_kernels": malformed})
    assert set(_layers(_engine(tiny_dir)).values()) == {("torch", 16)}


def test_untuned_engine_calibrates_once_logs_and_caches(tiny_dir, cache_path, monkeypatch, caplog):
    monkeypatch.setenv("ZILI_CALIBRATE", "1")
    monkeypatch.setattr("zili.models.quantize.load_per_cpu", lambda: 0.1)  # an idle host: worth measuring
    monkeypatch.setattr(quant_calibration, "load_per_cpu", lambda: 0.1)
    calls = []
    real = quant_calibration.calibrate_kernels

    def counting(shapes, *args, **kwargs):
        calls.append(sorted(shapes))
        return real(shapes, *args, **kwargs)

    monkeypatch.setattr("zili.models.quantize.calibrate_kernels", counting)
    with caplog.at_level(logging.INFO):
        first = _layers(_engine(tiny_dir))
    assert len(calls) == 1 and calls[0] == sorted(first)
    assert "calibrated the packed matmuls" in caplog.text and "saved the packed-matmul choices" in caplog.text
    for key, (kernel, rows) in first.items():  # every choice is logged with its shape
        said = "at every row count" if rows == quant_calibration.UNBOUNDED_ROWS else f"up to {rows} rows"
        assert f"packed matmul {key}:" in caplog.text and said in caplog.text
        assert kernel in quant_calibration.candidates()
        assert rows in {0, *quant_calibration.ROW_CANDIDATES, *quant_calibration.PREFILL_ROW_CANDIDATES,
                        quant_calibration.UNBOUNDED_ROWS}
    saved = json.loads(cache_path.read_text())["devices"][fingerprint_key(CpuPlatform().fingerprint())]
    assert {k: (v["kernel"], v["max_rows"]) for k, v in saved["device"]["quant_kernels"].items()} == first
    caplog.clear()
    with caplog.at_level(logging.INFO):
        second = _layers(_engine(tiny_dir))
    assert len(calls) == 1 and second == first  # read from the cache, not measured again
    assert "(tune cache)" in caplog.text and "calibrated the packed matmuls" not in caplog.text
    # --no-tune-cache: neither read nor written; --no-calibrate with it: the defaults
    assert set(_layers(_engine(tiny_dir, use_tune_cache=False, calibrate=False)).values()) == {("torch", 16)}


def test_busy_host_is_not_calibrated(tiny_dir, cache_path, monkeypatch, caplog):
    """Load above one per CPU: timings would be other processes' time slices, so no measurement and
    nothing cached; a host that gets busy during the measurement drops its result. Either way the
    layers get this CPU level's kernel up to BUSY_MAX_ROWS rows, not the uncalibrated defaults
    (torch's, up to 16): a loaded host is not a request for torch's kernels."""
    loads = iter([3.0])
    monkeypatch.setattr(quant_calibration, "load_per_cpu", lambda: next(loads, 3.0))
    monkeypatch.setattr("zili.models.quantize.load_per_cpu", quant_calibration.load_per_cpu)
    with caplog.at_level(logging.WARNING):
        busy = _layers(_engine(tiny_dir, calibrate=True))
    level = cpu_isa.selected() if cpu_isa.enabled() and quant_calibration.usable(cpu_isa.selected()) else None
    limits = quant_calibration.BUSY_MAX_ROWS_DEQUANT  # ZILI_DENSE_WEIGHTS=dequant, the default
    expected = {(level, limits.get(level, 4))} if level else {("torch", 16)}
    assert "the host is busy" in caplog.text and set(busy.values()) == expected
    assert load_tuning(CpuPlatform()) is None
    caplog.clear()
    loads = iter([0.1, 0.1])  # idle before (the builder's check, the calibration's own), busy after
    with caplog.at_level(logging.WARNING):
        dropped = _layers(_engine(tiny_dir, calibrate=True))
    assert "got busy while calibrating" in caplog.text and set(dropped.values()) == expected
    assert load_tuning(CpuPlatform()) is None
    # Not calibrating on request keeps the defaults (torch's kernels).
    assert set(_layers(_engine(tiny_dir, calibrate=False)).values()) == {("torch", 16)}


@pytest.mark.skipif(not cpu_isa.enabled(), reason="zili's CPU kernels are off (ZILI_CPU_KERNELS=0)")
def test_busy_host_keeps_small_kernel_calls_on_one_thread(tiny_dir, cache_path, monkeypatch):
    """An engine started on an overloaded host sets BUSY_PARALLEL_MIN_BYTES on its kernel level (a parallel
    region there waits a time slice for its second thread), an idle one 0, and so does one whose process runs
    at a raised priority; ZILI_PARALLEL_MIN_BYTES
    overrides both and a malformed value is a ValueError naming it."""
    level = cpu_isa.selected()
    load = [3.0]
    monkeypatch.setattr(quant_calibration, "load_per_cpu", lambda: load[0])
    monkeypatch.setattr("zili.models.quantize.load_per_cpu", quant_calibration.load_per_cpu)
    priority = [False]  # whatever nice value the test process itself runs at
    monkeypatch.setattr(quant_calibration, "raised_priority", lambda: priority[0])
    try:
        _engine(tiny_dir, calibrate=False)
        assert cpu_isa.set_parallel_min_bytes(0, level) == quant_calibration.BUSY_PARALLEL_MIN_BYTES
        cpu_isa.set_parallel_min_bytes(7, level)
        load[0] = 0.1
        _engine(tiny_dir, calibrate=False)
        assert cpu_isa.set_parallel_min_bytes(0, level) == 0
        load[0] = 3.0  # loaded, but this process outranks the load (nice < 0): its threads get their cores
        priority[0] = True
        cpu_isa.set_parallel_min_bytes(7, level)
        _engine(tiny_dir, calibrate=False)
        assert cpu_isa.set_parallel_min_bytes(0, level) == 0
        monkeypatch.setenv("ZILI_PARALLEL_MIN_BYTES", "12345")
        _engine(tiny_dir, calibrate=False)
        assert cpu_isa.set_parallel_min_bytes(0, level) == 12345
        monkeypatch.setenv("ZILI_PARALLEL_MIN_BYTES", "lots")
        with pytest.raises(ValueError, match="ZILI_PARALLEL_MIN_BYTES must be 'auto' or a non-negative integer"):
            _engine(tiny_dir, calibrate=False)
    finally:
        cpu_isa.set_parallel_min_bytes(0, level)


@pytest.mark.skipif(len(cpu_isa.executable_levels()) < 2, reason="one kernel level on this CPU: nothing lower")
def test_forced_lower_isa_changes_the_key_and_the_choice(tiny_dir, cache_path, monkeypatch):
    native = cpu_isa.selected()
    native_key = fingerprint_key(CpuPlatform().fingerprint())
    shapes = sorted(_layers(_engine(tiny_dir)))
    TuneCache().store(CpuPlatform(), {"quant_kernels": {k: KernelChoice(native, 5).to_json() for k in shapes}})
    assert set(_layers(_engine(tiny_dir)).values()) == {(native, 5)}
    lower = cpu_isa.executable_levels()[-2]
    monkeypatch.setenv("ZILI_CPU_ISA", lower)
    assert fingerprint_key(CpuPlatform().fingerprint()) != native_key  # another entry
    assert load_tuning(CpuPlatform()) is None
    assert quant_calibration.candidates() == [lower, "torch"]
    # even a hand-copied entry naming the higher level is refused under the forced one
    TuneCache().store(CpuPlatform(), {"quant_kernels": {k: KernelChoice(native, 5).to_json() for k in shapes}})
    assert set(_layers(_engine(tiny_dir)).values()) == {("torch", 16)}
    TuneCache().store(CpuPlatform(), {"quant_kernels": {k: KernelChoice(lower, 7).to_json() for k in shapes}})
    assert set(_layers(_engine(tiny_dir)).values()) == {(lower, 7)}
