"""The CPU: always available; the fallback when no accelerator answers."""

from __future__ import annotations

import os
from typing import Any

import torch

from zili import envs
from zili.platforms.interface import Platform

# CPU flags that change which kernels win (the tune cache is keyed by them).
SIMD_FLAG_PREFIXES = ("avx", "amx", "sse", "ssse", "asimd", "sve", "sme2")
SIMD_FLAGS = {"fma", "f16c", "neon", "sve", "sme", "bf16", "i8mm"}


# mallopt parameters (glibc malloc.h) and whether this process has set them.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_malloc_tuned: list[bool] = []


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
        # fast path on CPUs at all. Elsewhere fp32 is the safe choice.
        flags = _cpu_flags()
        return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32

    def set_num_threads(self, threads: int | None) -> None:
        # One thread per physical core: SMT siblings share the FMA units and only add
        # synchronisation cost to the matmuls.
        torch.set_num_threads(threads or physical_cores())

    def prepare_host_allocator(self) -> None:
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
    def attention_backend(self) -> str:
        from zili.kernels.backends import is_installed

        return "cpp" if is_installed("cpp") else "sdpa"

    def attention_backends(self) -> list[str]:
        from zili.kernels.backends import is_installed

        return ["sdpa", "cpp"] if is_installed("cpp") else ["sdpa"]

    def thread_candidates(self) -> list[int]:
        logical, physical = len(os.sched_getaffinity(0)), physical_cores()
        return sorted({1, max(1, physical // 2), physical, logical})

    def fingerprint(self) -> dict[str, Any]:
        flags = sorted(f for f in _cpu_flags() if f in SIMD_FLAGS or f.startswith(SIMD_FLAG_PREFIXES))
        return {**super().fingerprint(), "physical_cores": physical_cores(),
                "logical_cpus": len(os.sched_getaffinity(0)), "flags": flags}


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


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86, arm
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


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
