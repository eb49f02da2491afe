"""Executor: what the engine drives to turn a step plan into logits.

Two implementations: `ModelRunner` (zili.engine.runner), one process and one device, and
`TensorParallelExecutor` (zili.distributed.executor), which sends each plan to its worker ranks and
runs rank 0's shard through its own ModelRunner. The engine only calls these two methods.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from zili.engine.prompt_outputs import StepExtras
from zili.engine.runner import StepInput


@runtime_checkable
class Executor(Protocol):
    def execute(self, step: StepInput) -> torch.Tensor:
        """Run one forward pass over the step's new tokens, writing their K/V into the paged cache.

        Returns float32 logits [number of sequences with `step.sample` set, vocab], in step order.
        Raises whatever the forward raises; the tensor-parallel executor raises TensorParallelError
        once any rank has failed (and on every later call)."""
        ...

    def step_extras(self) -> StepExtras | None:
        """The prompt logprobs and pooled states the last `execute` computed (when its step asked for
        them: `StepInput.prompt_scoring` / `pooling`), else None."""
        ...

    def close(self) -> None:
        """Release workers and process groups, if any. Idempotent."""
        ...
