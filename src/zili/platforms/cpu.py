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
