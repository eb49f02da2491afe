"""A tensor-parallel rank's model: its shard of the checkpoint, loaded and quantized like the
single-process engine's (the slicing itself is `zili.models.sharding`)."""

from __future__ import annotations

import torch

from zili.models.loader import load_model, open_checkpoint
from zili.models.quantize import quantize_and_calibrate
from zili.models.sharding import ShardedRawCheckpoint, shard_specs
from zili.platforms import current_platform


def load_shard(config, tp, device: torch.device):
    """This rank's LoadedModel and its quantized layer counts, through the same
    `quantize_and_calibrate` as the single-process engine (with this rank's slice of GGUF blocks)."""
    loaded = load_model(config.model, dtype=config.dtype, device=device, tp=tp, load_format=config.load_format,
                        seed=config.seed + tp.rank)

    def sharded_checkpoint() -> ShardedRawCheckpoint:
        return ShardedRawCheckpoint(open_checkpoint(loaded.source), shard_specs(loaded.model))

    report = quantize_and_calibrate(loaded.model, config.quantization, loaded.dtype,
                                    current_platform().matmul_backend(),
                                    sharded_checkpoint if loaded.source.format == "gguf" else None,
                                    calibrate=config.calibrate)
    return loaded, report.counts
