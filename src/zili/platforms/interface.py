"""The questions the engine asks of a device. One subclass per kind of device.

A Platform is stateless apart from what it caches about its device; the engine asks it, never the
other way round. Out-of-tree devices subclass `Platform` (or `AcceleratorPlatform`, which answers
from `torch.<device_type>` for any device PyTorch knows, PrivateUse1 plugins such as `npu`
included) and register through the entry-point group `zili.platforms` (see `zili.platforms`).
"""

from __future__ import annotations

import platform as _host
from typing import Any, Protocol

import torch


class DeviceGraph(Protocol):
    """A captured sequence of device work (torch.cuda.CUDAGraph and its kind on other devices)."""

    def replay(self) -> None: ...


class Platform:
    """What the engine asks of a device. Subclasses answer for one kind of device."""

    name: str = "base"
    device_type: str = "cpu"

    @classmethod
    def is_available(cls) -> bool:
        """Whether this process can run on the device (checked before the platform is chosen)."""
        return False

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_type)

    def device_for_rank(self, local_rank: int) -> torch.device:
        """The device a tensor-parallel worker of this local rank runs on."""
        return self.device

    def device_name(self) -> str:
        return self.name

    def default_dtype(self) -> torch.dtype:
        return torch.float32

    def default_max_num_batched_tokens(self, model_dtype: torch.dtype) -> int:
        """The step token budget (chunked prefill) when EngineConfig.max_num_batched_tokens is None,
        for a model computing in `model_dtype`: 2048 (vLLM's default for chunked prefill)."""
        return 2048

    def default_kv_cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's element type for kv_cache_dtype="auto" when the model's dtype was also
        left to the platform (`default_dtype`): the model's own, unless a platform stores it
        narrower (see CpuPlatform)."""
        return model_dtype

    def total_memory(self) -> int:
        raise NotImplementedError

    def free_memory(self) -> int:
        raise NotImplementedError

    def default_kv_cache_fraction(self) -> float:
        """Share of free memory the KV pool takes when kv_cache_memory is not given. A host shares its
        RAM with everything else on the machine, so a small share."""
        return 0.10

    def synchronize(self) -> None:
        pass

    def empty_cache(self) -> None:
        """Hand memory the framework's caching allocator holds back to the device."""

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_num_threads(self, threads: int | None) -> None:
        """Threads for host-side compute; None keeps the platform's default."""

    def prepare_host_allocator(self) -> None:
        """Set up the process's host memory allocator for inference steps (once per engine)."""

    def release_host_memory(self) -> None:
        """Hand freed host memory back to the OS (after loading, quantizing, compiling: the
        temporaries of a one-off stage must not stay resident for the server's lifetime)."""

    def collective_backend(self) -> str:
        """torch.distributed backend for tensor parallelism on this device."""
        return "gloo"

    def attention_backend(self) -> str:
        """Default attention backend (a name in `zili.kernels.backends`) when nothing is tuned."""
        return "sdpa"

    def attention_backends(self) -> list[str]:
        """Every attention backend that can run here; the tuner measures these."""
        return ["sdpa"]

    def matmul_backend(self) -> str:
        """How weight matmuls run: "dense" (F.linear on the model dtype) or "cpu-packed" (int4/int8
        weights in torch's CPU packing below a measured row count, dense above)."""
        return "dense"

    def thread_candidates(self) -> list[int]:
        """Host thread counts worth measuring (`zili tune`); empty where threads do not matter."""
        return []

    def supports_graph_capture(self) -> bool:
        """Whether the decode step may be captured as a device graph and replayed."""
        return False

    def pins_host_memory(self) -> bool:
        """Whether host staging buffers should be page-locked, so that copies to the device are
        asynchronous DMA (CUDA's pinned memory)."""
        return False

    def fuses_elementwise(self) -> bool:
        """Whether the decoder layers' elementwise chains (norms, rotary, SwiGLU) run as compiled
        kernels (zili.layers.fused) unless EngineConfig.enforce_eager says otherwise: worth it where
        every kernel launch has a fixed cost, as on GPUs."""
        return False

    def compiles_decode_step(self) -> bool:
        """Whether the decode step runs as one torch.compile graph (zili.engine.compiled_decode)
        unless EngineConfig.enforce_eager says otherwise. Devices with graph capture use that instead."""
        return False

    def new_graph(self) -> DeviceGraph:
        """An empty device graph (with `.replay()`), for `graph_capture`."""
        raise NotImplementedError(f"{self.name} has no graph capture")

    def graph_capture(self, graph: Any, pool: Any = None) -> Any:
        """Context manager: device work issued inside is recorded into `graph`, not run."""
        raise NotImplementedError(f"{self.name} has no graph capture")

    def graph_pool(self) -> Any:
        """A memory pool handle that several captured graphs may share."""
        return None

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this device for the tune cache: a change in any of it means re-tune."""
        return {"platform": self.name, "device": self.device_name(), "torch": torch.__version__,
                "machine": _host.machine()}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: {self.device_name()}>"


class AcceleratorPlatform(Platform):
    """A device PyTorch exposes as `torch.<device_type>` (cuda, xpu, or a PrivateUse1 plugin such as
    Ascend's npu). The answers come from that module; subclasses set `name`, `device_type`,
    `collective` and override what differs."""

    collective: str = "gloo"

    @classmethod
    def is_available(cls) -> bool:
        module = getattr(torch, cls.device_type, None)
        try:
            return bool(module is not None and module.is_available())
        except Exception:  # a half-installed plugin must not take the CPU down with it
            return False

    @property
    def module(self) -> Any:
        return torch.get_device_module(self.device_type)

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_type, self.module.current_device())

    def device_for_rank(self, local_rank: int) -> torch.device:
        return torch.device(self.device_type, local_rank)

    def device_name(self) -> str:
        try:
            return str(self.module.get_device_name(self.device))
        except Exception:
            return self.device_type

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def total_memory(self) -> int:
        return int(self.module.mem_get_info(self.device)[1])

    def free_memory(self) -> int:
        return int(self.module.mem_get_info(self.device)[0])

    def default_kv_cache_fraction(self) -> float:
        # The device is the engine's own (asked after the weights are loaded): most of what is free,
        # leaving room for activations, graphs and the sampler's logits.
        return 0.80

    def synchronize(self) -> None:
        self.module.synchronize()

    def empty_cache(self) -> None:
        if hasattr(self.module, "empty_cache"):
            self.module.empty_cache()

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)  # seeds every device's default generator too
        self.module.manual_seed_all(seed)

    def collective_backend(self) -> str:
        return self.collective
