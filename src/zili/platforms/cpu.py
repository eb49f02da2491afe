"""The CPU: always available; the fallback when no accelerator answers."""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from zili import envs
from zili.platforms.interface import Platform

# CPU flags that change which kernels win (the tune cache is keyed by them).
SIMD_FLAG_PREFIXES = ("avx", "amx", "sse", "ssse", "asimd", "sve", "sme2")
SIMD_FLAGS = {"fma", "f16c", "neon", "sve", "sme", "bf16", "i8mm"}


# zili's CPU kernel levels (zili.kernels.cpu_isa), lowest first within each architecture, and the CPU
# flags each needs (/proc/cpuinfo "flags" on x86, "Features" on ARM). The AVX-512 level takes VNNI
# (vpdpbusd) and BF16 (vdpbf16ps) with it: Zen 4, Sapphire Rapids, Cooper Lake. AVX-512 CPUs without them
# (Skylake-X, Ice Lake lacks BF16) run the AVX2 level. The NEON level is AArch64 with the dot-product
# extension (sdot: Armv8.2-A and later, e.g. Neoverse N1/V1, Graviton 2/3, Apple M, Ampere Altra).
CPU_ISA_LEVELS: dict[str, tuple[str, ...]] = {
    "portable": (),
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"),
    "neon": ("asimd", "asimddp"),
}
CPU_ISA_ENV = envs.ZILI_CPU_ISA.name

# mallopt parameters (glibc malloc.h) and whether this process has set them.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_malloc_tuned: list[bool] = []

# Entries kept by the two caches of matmul primitives a dense CPU matmul fills, one per shape: torch's
# (ideep's LRU, LRU_CACHE_CAPACITY) and oneDNN's own (ONEDNN_PRIMITIVE_CACHE_CAPACITY); both default to
# 1,024. Prefill chunks have a new row count nearly every step, and each new one cost ~2.6 MiB held in
# the two caches (SmolLM2, 4 shapes a step): a server's resident memory grew ~1.1 + 1.5 MiB a request
# with no end in sight below ~2.6 GiB. 16 entries hold a step's shapes (every layer reuses them) and
# the next few steps'. Read by torch and oneDNN at their first matmul; a value the user set is kept.
MATMUL_PRIMITIVE_CACHE_CAPACITY = 16
PRIMITIVE_CACHE_ENV = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"

    @classmethod
    def is_available(cls) -> bool:
        return True

    def device_name(self) -> str:
        return _cpuinfo_field("model name") or _cpuinfo_field("Model") or "cpu"

    def default_dtype(self) -> torch.dtype:
        # bf16 matmuls run about twice as fast as fp32 on CPUs with AVX512-BF16/AMX; fp16 has no
        # fast path on CPUs at all. Elsewhere (AVX2 and below, or ZILI_CPU_ISA forcing such a
        # level) bf16 would be emulated: activations stay fp32, and the quantized kernels take
        # them to int8 per block themselves.
        flags = _cpu_flags()
        native_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
        return torch.bfloat16 if native_bf16 and cpu_isa() == "avx512" else torch.float32

    def default_max_num_batched_tokens(self, model_dtype: torch.dtype) -> int:
        # float32 activations (a CPU without native bf16, or dtype="float32"): a prefill step's
        # temporaries are twice bf16's, and zili's packed int4 kernels, which serve prefill rows there
        # (their time is linear in the rows), make a smaller chunk free. AVX2-only Zen 3, SmolLM2,
        # 16 prompts of 128 tokens, two interleaved pairs of processes: 1,024 -> 517 / 458 tok/s and
        # peak RSS 624-638 MiB, 2,048 -> 496 / 446 tok/s and 656-706 MiB (benchmarks/notes/cpu-isa.md).
        # With bf16 the dequantize-then-dense path serves prefill and amortises its dequantization
        # over the chunk's rows (Zen 4: 1,024 cost 4% of prefill throughput): 2048 there. A dense fp32
        # model (no packed kernel) gets 1024 too, for the memory; MKL's sgemm is at full speed at 1,024 rows.
        return 1024 if model_dtype == torch.float32 else 2048

    def default_kv_cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        # Where the platform computes in fp32 because bf16 would be emulated (AVX2), the cache is
        # still stored in bf16, as llama.cpp stores an f16 cache: a decode step at 64 sequences
        # mostly reads the KV pool, the kernels widen a bf16 row with one shift, and the pool holds
        # twice the tokens. Forced AVX2 on the dev VM, 64 sequences x 256+128 tokens: 1.29x the
        # output tok/s of the fp32 cache (benchmarks/notes/cpu-speed.md). Asking for dtype="float32"
        # keeps an fp32 cache (the exact path the HF comparisons use).
        return torch.bfloat16 if model_dtype == torch.float32 else model_dtype

    def set_num_threads(self, threads: int | None) -> None:
        # One thread per physical core: SMT siblings share the FMA units and only add
        # synchronisation cost to the matmuls.
        torch.set_num_threads(threads or physical_cores())

    def prepare_host_allocator(self) -> None:
        for name in PRIMITIVE_CACHE_ENV:  # before the first matmul of this process (see the constant)
            os.environ.setdefault(name, str(MATMUL_PRIMITIVE_CACHE_CAPACITY))
        # glibc serves blocks above its mmap threshold (128 KiB, raised adaptively up to 32 MiB) with
        # fresh mappings and returns them on free, so a step's large tensors (64 rows of fp32 logits
        # are 12.6 MB) are page-faulted in again every step: in a decode step at 64 sequences, one
        # kernel writing two such copies took 4.8 ms, 1.6 ms once they came from the reused heap.
        # Keep blocks up to 64 MiB on the heap and up to 256 MiB of free heap before trimming.
        # ZILI_MALLOC_TUNE=0 leaves the allocator alone.
        if _malloc_tuned or not envs.malloc_tune_enabled():
            return
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
            return
        if ok:
            _malloc_tuned.append(True)

    def release_host_memory(self) -> None:
        # The mallopt above keeps up to 256 MiB of free heap (and blocks up to 64 MiB on it) for the
        # steps' sake; loading and quantizing free far more than that in such blocks (dequantized
        # tensors, packing temporaries), which glibc would otherwise keep: malloc_trim(0) returns
        # every free page of every arena.
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass

    def total_memory(self) -> int:
        try:
            return _meminfo("MemTotal")
        except (OSError, KeyError):
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def free_memory(self) -> int:
        try:
            return _meminfo("MemAvailable")
        except (OSError, KeyError):
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

    def matmul_backend(self) -> str:
        return "cpu-packed"

    def compiles_decode_step(self) -> bool:
        return True  # Inductor's C++ backend, with the gcc every Linux CPU build of torch expects

    # The C++ decode kernel is the default wherever it builds: with its bf16 dot-product scores,
    # vector softmax and prefetched block rows it beats Inductor's fused in-place attention on the
    # 2-core VM (`zili bench offline --attention-backend {sdpa,cpp} -n 64 --max-num-seqs 32`: 831 vs
    # 590 output tok/s, tg128 148 vs 142). `zili tune` still measures both.
    # The platform names candidates; whether the C++ kernel builds here is the kernels' question
    # (`zili.kernels.backends.choose_attention_backend` falls back to sdpa where it does not).
    def attention_backend(self) -> str:
        return "cpp"

    def attention_backends(self) -> list[str]:
        return ["sdpa", "cpp"]

    def thread_candidates(self) -> list[int]:
        logical, physical = len(os.sched_getaffinity(0)), physical_cores()
        return sorted({1, max(1, physical // 2), physical, logical})

    def fingerprint(self) -> dict[str, Any]:
        flags = sorted(f for f in _cpu_flags() if f in SIMD_FLAGS or f.startswith(SIMD_FLAG_PREFIXES))
        # The kernel level is part of the key: a forced lower level (ZILI_CPU_ISA) is another
        # machine as far as the winners go.
        return {**super().fingerprint(), "physical_cores": physical_cores(),
                "logical_cpus": len(os.sched_getaffinity(0)), "flags": flags, "kernel_isa": cpu_isa()}


def executable_cpu_isas(flags: set[str] | frozenset[str] | None = None) -> list[str]:
    """The levels of `CPU_ISA_LEVELS` this CPU (or the given /proc/cpuinfo flags) can execute, lowest
    first: portable and its own architecture's levels (["portable", "avx2", "avx512"] on a Zen 4)."""
    flags = _cpu_flags() if flags is None else flags
    return [level for level, need in CPU_ISA_LEVELS.items() if all(f in flags for f in need)]


def native_cpu_isa(flags: set[str] | frozenset[str] | None = None) -> str:
    """The highest of `CPU_ISA_LEVELS` this CPU (or the given /proc/cpuinfo flags) can execute."""
    return executable_cpu_isas(flags)[-1]


def cpu_isa(flags: set[str] | frozenset[str] | None = None) -> str:
    """The kernel level to run: the CPU's own (`native_cpu_isa`), or a lower one forced by
    ZILI_CPU_ISA={avx512,avx2,neon,portable} (how one machine tests every path). ValueError for an
    unknown name or a level this CPU cannot execute (its code would die on SIGILL)."""
    native = native_cpu_isa(flags)
    forced = envs.cpu_isa() or ""
    if not forced or forced in ("auto", "native"):
        return native
    levels = list(CPU_ISA_LEVELS)
    if forced not in CPU_ISA_LEVELS:
        raise ValueError(f"{CPU_ISA_ENV} must be one of {', '.join(levels)} (or auto), got {forced!r}")
    if forced not in executable_cpu_isas(flags):
        missing = [f for f in CPU_ISA_LEVELS[forced] if f not in (_cpu_flags() if flags is None else flags)]
        raise ValueError(f"{CPU_ISA_ENV}={forced} cannot run on this CPU (its level: {native!r}; "
                         f"missing flags: {', '.join(missing)})")
    return forced


def _cpuinfo_field(key: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86, arm
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs this process may run on."""
    allowed = os.sched_getaffinity(0)
    cores = set()
    for cpu in allowed:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{base}/physical_package_id") as f:
                package = f.read().strip()
            with open(f"{base}/core_id") as f:
                cores.add((package, f.read().strip()))
        except OSError:
            return len(allowed)
    return max(1, len(cores))
