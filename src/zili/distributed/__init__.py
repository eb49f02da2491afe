"""Scale-out: tensor parallelism over torch.distributed (`executor`, `worker`) and engine replicas
on Ray (`replicas`). See docs/distributed.md."""

from zili.distributed.errors import TensorParallelError

__all__ = ["TensorParallelError"]
