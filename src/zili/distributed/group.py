"""Joining and leaving the tensor-parallel process group.

Rank 0 hosts a TCPStore (an ephemeral port on the address it listens on) that the workers join;
the store carries start-up facts (each worker's readiness or load error, the KV pool size), and
torch.distributed builds the process group on it with the platform's collective backend (gloo on
CPU, nccl on CUDA, whatever a plugin names). Collectives time out after `timeout`: a worker that
stops answering fails the step instead of hanging it; one that dies fails it at once (its
connections close).
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _set_pg_timeout  # no public way to change it after creation

from zili.layers.parallel import TensorParallel

# How long start-up (loading the weights) may take before a rank gives up on the others.
STARTUP_TIMEOUT = timedelta(minutes=30)


def create_store(host: str, size: int) -> dist.TCPStore:
    """Rank 0's store, on a free port (`store.port`)."""
    return dist.TCPStore(host, 0, size, is_master=True, timeout=STARTUP_TIMEOUT, wait_for_workers=False)


def join_store(host: str, port: int, size: int) -> dist.TCPStore:
    return dist.TCPStore(host, port, size, is_master=False, timeout=STARTUP_TIMEOUT)


def init_group(store: dist.TCPStore, rank: int, size: int, backend: str, timeout_s: float
               ) -> tuple[TensorParallel, object]:
    """Join the process group; returns this rank's TensorParallel and the group plans travel on
    (gloo, since plans are host-side ints; None means the default group, when that is gloo)."""
    if dist.is_initialized():
        raise RuntimeError("this process is already in a torch.distributed process group; "
                           "run one tensor-parallel engine per process")
    # Joining may wait for a worker still starting up; only then do collectives get the short timeout.
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=STARTUP_TIMEOUT)
    control = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=STARTUP_TIMEOUT)
    timeout = timedelta(seconds=timeout_s)
    for group in {None, control}:
        _set_pg_timeout(timeout, group)
    return TensorParallel(rank, size), control


def destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device(platform, rank: int) -> torch.device:
    """The device of `rank` (the platform's answer), made this process's current one."""
    device = platform.device_for_rank(rank)
    if device.index is not None and torch.accelerator.is_available():
        torch.accelerator.set_device_index(device.index)  # kernels and collectives default to it
    return device
