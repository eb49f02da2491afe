"""NVIDIA GPUs (and ROCm builds of torch, which answer as `torch.cuda` too).

Not exercised by CI (no GPU there): the answers below are what the engine and `zili tune` ask on a
GPU machine; the Triton kernels they select are tested on the CPU with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from zili.platforms.interface import AcceleratorPlatform


class CudaPlatform(AcceleratorPlatform):
    name = "cuda"
    device_type = "cuda"

    def default_dtype(self) -> torch.dtype:
        # bf16 from Ampere on; older cards have no bf16 tensor cores, fp16 is their fast type.
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def collective_backend(self) -> str:
        return "nccl"  # RCCL answers to the same name on ROCm

    def attention_backend(self) -> str:
        return "triton" if _has_triton() else "sdpa"

    def attention_backends(self) -> list[str]:
        return ["triton", "sdpa"] if _has_triton() else ["sdpa"]

    def supports_graph_capture(self) -> bool:
        return True

    def pins_host_memory(self) -> bool:
        return True

    def fuses_elementwise(self) -> bool:
        return True  # Inductor writes Triton kernels; a launch costs a few microseconds whatever its size

    def new_graph(self) -> Any:
        return torch.cuda.CUDAGraph()

    def graph_capture(self, graph: Any, pool: Any = None) -> Any:
        return torch.cuda.graph(graph, pool=pool)

    def graph_pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def fingerprint(self) -> dict[str, Any]:
        props = torch.cuda.get_device_properties(self.device)
        return {**super().fingerprint(), "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30), "driver": _driver_version(),
                "cuda": torch.version.cuda or torch.version.hip, "triton": _triton_version()}


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _driver_version() -> str | None:
    """The kernel driver's version (a driver update can change which kernels win)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        pass
    try:
        with open("/proc/driver/nvidia/version") as f:
            return f.readline().strip()
    except OSError:
        return None
