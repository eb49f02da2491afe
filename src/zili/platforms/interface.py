from __future__ import annotations

import torch


class Platform:
    """What the engine asks of a device. Subclasses answer for one kind of device."""

    name: str = "base"
    device_type: str = "cpu"

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_type)

    def default_dtype(self) -> torch.dtype:
        return torch.float32

    def total_memory(self) -> int:
        raise NotImplementedError

    def free_memory(self) -> int:
        raise NotImplementedError

    def synchronize(self) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_num_threads(self, threads: int | None) -> None:
        """Threads for host-side compute; None keeps the platform's default."""

    def collective_backend(self) -> str:
        return "gloo"

    def supports_graph_capture(self) -> bool:
        return False
