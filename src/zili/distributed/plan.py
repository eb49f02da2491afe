"""The step plan rank 0 sends its workers: one broadcast of a small header, one of packed ints.

A plan is the runner's `StepInput` (new token ids, start positions, block tables, which sequences
sample) flattened into one int64 tensor, so the workers run exactly the forward pass rank 0 runs,
with no pickling and no per-request objects on the wire:

    header   [op, payload length]
    payload  [num_seqs, (num_new, start, num_blocks, sample) per sequence, token ids..., block ids...]

Ops besides a step: IDLE (a keep-alive while rank 0 has nothing to run, so a worker's wait for the
next plan can have a timeout) and STOP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from zili.engine.runner import StepInput

OP_STEP, OP_IDLE, OP_STOP = 1, 2, 3
_FIELDS = 4  # per sequence: num_new, start, num_blocks, sample


def pack_step(step: StepInput) -> torch.Tensor:
    meta = [len(step.token_ids)]
    for tokens, start, table, sample in zip(step.token_ids, step.start_positions, step.block_tables, step.sample):
        meta += (len(tokens), start, len(table), int(sample))
    tokens = [t for chunk in step.token_ids for t in chunk]
    blocks = [b for table in step.block_tables for b in table]
    return torch.tensor(meta + tokens + blocks, dtype=torch.int64)


def unpack_step(packed: torch.Tensor) -> StepInput:
    values = packed.tolist()
    n = values[0]
    meta = values[1:1 + _FIELDS * n]
    pos = 1 + _FIELDS * n
    token_ids, starts, tables, sample = [], [], [], []
    for i in range(n):
        num_new, start, num_blocks, samples = meta[_FIELDS * i:_FIELDS * (i + 1)]
        token_ids.append(values[pos:pos + num_new])
        pos += num_new
        starts.append(start)
        sample.append(bool(samples))
    for i in range(n):
        num_blocks = meta[_FIELDS * i + 2]
        tables.append(values[pos:pos + num_blocks])
        pos += num_blocks
    return StepInput(token_ids, starts, tables, sample)


class PlanChannel:
    """Rank 0 sends ops and plans; every other rank receives them in the same order.

    `group` is a gloo group (plans are host-side ints whatever the device), `None` for the default
    group when that is gloo already."""

    def __init__(self, group=None) -> None:
        self.group = group
        self._header = torch.zeros(2, dtype=torch.int64)

    def send(self, op: int, step: StepInput | None = None) -> None:
        payload = pack_step(step) if step is not None else None
        self._header[0], self._header[1] = op, 0 if payload is None else payload.numel()
        dist.broadcast(self._header, src=0, group=self.group)
        if payload is not None:
            dist.broadcast(payload, src=0, group=self.group)

    def receive(self) -> tuple[int, StepInput | None]:
        dist.broadcast(self._header, src=0, group=self.group)
        op, length = self._header.tolist()
        if op != OP_STEP:
            return op, None
        payload = torch.empty(length, dtype=torch.int64)
        dist.broadcast(payload, src=0, group=self.group)
        return op, unpack_step(payload)
