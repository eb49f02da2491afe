"""zili's C++ CPU kernels, one library per instruction-set level, chosen at load time.

The sources in kernels/csrc (paged decode attention, packed 4/8-bit matmuls) are compiled once per
level, each with its own flags, never `-march=native`:

  avx512    -mavx512f/bw/vl/dq -mavx512vnni -mavx512bf16 (+ AVX2, FMA, F16C): vpdpbusd integer dot
            products, vdpbf16ps attention scores
  avx2      -mavx2 -mfma -mf16c: vpmaddubsw/vpmaddwd integer dot products, fp32 FMAs
  neon      -march=armv8.2-a+dotprod (AArch64): sdot integer dot products for the packed matmuls (the
            attention kernel runs its portable loops there)
  portable  no ISA flags (the compiler's baseline): plain C++ loops it vectorises as it can

Each build registers its operators under its own namespace (`torch.ops.zili_cpu_avx2.q4_gemm`, ...)
so all of a machine's levels can live in one process: the tests run every level the machine can
execute. Which one the engine uses comes from the CPU's flags (`zili.platforms.cpu.cpu_isa`:
/proc/cpuinfo, read at run time), lowered by ZILI_CPU_ISA={avx512,avx2,neon,portable}; asking for a
level the CPU cannot execute is a ValueError. The NEON matmul paths are checked on x86 machines by
cross-compiling them without torch and running them under qemu-user (tests/native,
test_cpu_kernels_neon.py). Built with torch.utils.cpp_extension on first use (about 30 s per level on
2 cores: the sources include ATen and the op registry only, not torch/extension.h, whose Python
bindings tripled each file's compile time), then loaded from ~/.cache/zili/torch_extensions.
ZILI_CPU_KERNELS=0 turns all of them off.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from zili import envs
from zili.platforms.cpu import cpu_isa, executable_cpu_isas

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
SOURCES = (_CSRC / "paged_decode_cpu.cpp", _CSRC / "quant_gemm_cpu.cpp")
ISA_FLAGS: dict[str, list[str]] = {
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
               "-mavx512vnni", "-mavx512bf16", "-DZILI_ISA_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DZILI_ISA_AVX2"],
    "neon": ["-march=armv8.2-a+dotprod", "-DZILI_ISA_NEON"],
    "portable": [],
}
ISA_LEVEL_NUMBER = {"portable": 0, "avx2": 1, "avx512": 2, "neon": 3}  # what each build's isa_level() returns

_lock = threading.Lock()
_loaded: dict[str, bool] = {}


def enabled() -> bool:
    return envs.cpu_kernels_enabled()


def namespace(isa: str) -> str:
    """The torch.ops namespace of the `isa` build."""
    return f"zili_cpu_{isa}"


def ops(isa: str | None = None):
    """`torch.ops.<namespace>` of the given level's build (default: `selected()`); loads it."""
    isa = isa or selected()
    if not (_loaded.get(isa) or load(isa)):
        raise RuntimeError(f"zili's {isa} CPU kernels could not be built here (see the log)")
    return getattr(torch.ops, namespace(isa))


def selected() -> str:
    """The level this process runs (the CPU's, or lower under ZILI_CPU_ISA)."""
    return cpu_isa()


# A constant for torch.compile: the compiled decode step calls the kernels through `ops()`, and
# dynamo must not trace the /proc/cpuinfo read behind this (it cannot trace `open`). This is what
# `torch.compiler.assume_constant_result` sets; the decorator itself imports torch._dynamo (and with
# it much of Inductor: ~170 MiB resident) into every process that loads the kernels, compiling or not.
selected._dynamo_marked_constant = True  # type: ignore[attr-defined]


def set_parallel_min_bytes(nbytes: int, isa: str | None = None) -> int:
    """Below `nbytes` of work (packed weight bytes of a q4/q8 product, KV bytes of a decode-attention
    call) the `isa` build's kernels run on the calling thread, with no parallel region; returns the
    previous value. ValueError on a negative count."""
    if not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative integer, got {nbytes!r}")
    return int(ops(isa).set_parallel_min_bytes(nbytes))


def executable_levels() -> list[str]:
    """Every level this CPU can execute, lowest first (portable, avx2 and avx512 on an AVX-512 machine;
    portable and neon on an AArch64 CPU with the dot-product extension)."""
    return executable_cpu_isas()


def load(isa: str | None = None) -> bool:
    """Build (once per machine and source version) and load one level; False, with the reason
    logged, where it cannot be built (no compiler, not an x86 CPU for avx2/avx512)."""
    isa = isa or selected()
    if isa not in ISA_FLAGS:
        raise ValueError(f"unknown CPU kernel level {isa!r}; one of {', '.join(ISA_FLAGS)}")
    if not enabled():
        return False
    with _lock:
        if isa not in _loaded:
            _loaded[isa] = _build_and_load(isa)
    return _loaded[isa]


def source_version() -> str:
    """A digest of the kernels' source text (not their path): stored with each cached kernel choice
    (`quant_calibration.KernelChoice`), so that winners measured against another version of these
    kernels are measured again."""
    h = hashlib.sha1()
    for path in SOURCES:
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _source_digest() -> str:
    h = hashlib.sha1()
    for path in SOURCES:  # the path too: another checkout's build would otherwise rebuild this one's
        h.update(str(path.resolve()).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:10]


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """Serialise builds of one directory across processes with a lock the kernel drops when its holder
    dies. torch's own `lock` file stays behind when a build is killed (Ctrl-C, a test timeout), and
    every later load then waits on it forever; while we hold ours, no zili process is building here,
    so such a file is stale and is removed."""
    with open(build_dir / ".zili-build.flock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # say why a start may pause here for minutes
            logger.info("CPU kernels: another process is building %s; waiting for it", build_dir.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_and_load(isa: str) -> bool:
    if isa not in executable_cpu_isas():
        logger.warning("CPU kernels: level %s cannot run on this CPU", isa)
        return False
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    build_dir = base / "zili" / "torch_extensions" / f"cpu_kernels_{isa}_{_source_digest()}"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        from torch.utils.cpp_extension import load

        with _build_lock(build_dir):
            if not (build_dir / f"zili_cpu_kernels_{isa}.so").exists():
                logger.info("CPU kernels: compiling the %s level for this checkout (once; half a minute or more, "
                            "longer on a busy machine)", isa)
            load(name=f"zili_cpu_kernels_{isa}", sources=[str(s) for s in SOURCES], build_directory=str(build_dir),
                 extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", f"-DZILI_OPS_NS={namespace(isa)}",
                               *ISA_FLAGS[isa]],
                 extra_ldflags=["-fopenmp", "-lmvec"], is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler, no ninja, an unsupported platform: the torch paths stay
        logger.warning("zili's %s CPU kernels unavailable, using the torch paths (%s: %s)", isa,
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return False
    _register_fakes(namespace(isa))
    built = int(getattr(torch.ops, namespace(isa)).isa_level())
    if built != ISA_LEVEL_NUMBER[isa]:  # the flags did not reach the compiler: refuse, do not guess
        logger.warning("CPU kernels: the %s build reports level %d; not used", isa, built)
        return False
    logger.info("zili CPU kernels: %s level loaded (%s)", isa, " ".join(ISA_FLAGS[isa]) or "no ISA flags")
    return True


def _register_fakes(ns: str) -> None:
    """Shape functions so that torch.compile can put the operators inside a graph."""

    @torch.library.register_fake(f"{ns}::paged_decode")
    def _(q, kv_cache, block_tables, seq_lens, scale, window=0):
        return torch.empty_like(q)

    @torch.library.register_fake(f"{ns}::q4_gemm")
    def _(x, qs, dm, n_out):
        return x.new_empty(x.shape[0], n_out)

    @torch.library.register_fake(f"{ns}::q8_gemm")
    def _(x, qs, d, n_out):
        return x.new_empty(x.shape[0], n_out)

    @torch.library.register_fake(f"{ns}::q4_dequant_linear")
    def _(x, qs, dm, n_out):
        return x.new_empty(x.shape[0], n_out)

    @torch.library.register_fake(f"{ns}::q8_dequant_linear")
    def _(x, qs, d, n_out):
        return x.new_empty(x.shape[0], n_out)
