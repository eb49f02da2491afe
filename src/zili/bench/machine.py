"""What machine and code a result came from: CPU, cores, flags, memory, torch, git, load."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

from zili.platforms.cpu import cpu_isa

# Flags worth a glance in a report; the full list is recorded too.
NOTABLE_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                 "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_info(cpuinfo_text: str | None = None) -> dict:
    """Model name, flags and counts, parsed from /proc/cpuinfo (or the given text)."""
    if cpuinfo_text is None:
        try:
            cpuinfo_text = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo_text = ""
    model, flags = platform.processor() or "unknown", list[str]()
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("unknown", platform.processor()):
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = value.split()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "model": model,
        "logical_cores": os.cpu_count(),
        "usable_cores": affinity,
        "notable_flags": [f for f in NOTABLE_FLAGS if f in flags],
        "flags": flags,
    }


def memory_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def torch_info() -> dict:
    try:
        import torch
    except ImportError:
        return {"version": None}
    return {"version": torch.__version__, "num_threads": torch.get_num_threads()}


def git_info(repo: Path | None = None) -> dict:
    # The checkout the running zili was imported from (an editable install), if it is one.
    repo = repo or Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def accelerator_name() -> str | None:
    """The device zili's platform runs on, when it is not the CPU (e.g. "NVIDIA H100 80GB HBM3")."""
    try:
        from zili.platforms import current_platform
        from zili.platforms.cpu import CpuPlatform

        plat = current_platform()
        return None if isinstance(plat, CpuPlatform) else f"{plat.device_name()} ({plat.name})"
    except Exception:
        return None


def machine_info() -> dict:
    info = {
        "cpu": cpu_info(),
        "memory_bytes": memory_total_bytes(),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "torch": torch_info(),
        "load_average": load_average(),
        # What changes zili's kernels without showing in the command: a forced ISA level (ZILI_CPU_ISA),
        # kernels off, calibration off... and the CPU kernel level the run used.
        "zili_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("ZILI_")},
        # The same for torch's own kernels: a lowered ATen / oneDNN / MKL instruction set (a forced-AVX2 run).
        "isa_env": {k: os.environ[k] for k in ISA_ENV if k in os.environ},
    }
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        try:
            info["cpu_isa"] = cpu_isa()
        except ValueError as e:  # a forced level above the CPU's
            info["cpu_isa"] = f"invalid: {e}"
    accelerator = accelerator_name()
    if accelerator:
        info["accelerator"] = accelerator
    return info
