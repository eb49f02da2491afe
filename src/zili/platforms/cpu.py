from __future__ import annotations

import os

import torch

from zili.platforms.interface import Platform


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"

    def default_dtype(self) -> torch.dtype:
        # bf16 matmuls run about twice as fast as fp32 on CPUs with AVX512-BF16/AMX; fp16 has no
        # fast path on CPUs at all. Elsewhere fp32 is the safe choice.
        flags = _cpu_flags()
        return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32

    def set_num_threads(self, threads: int | None) -> None:
        # One thread per physical core: SMT siblings share the FMA units and only add
        # synchronisation cost to the matmuls.
        torch.set_num_threads(threads or physical_cores())

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


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
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
