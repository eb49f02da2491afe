"""load_model: reference -> files -> ModelConfig -> nn.Module with weights, plus the tokenizer."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from rich.console import Console

from zili.config import ModelConfig
from zili.layers.parallel import TensorParallel, active
from zili.tokenizer import Tokenizer
from zili.weights import ModelSource, UnsupportedModelError, open_checkpoint, resolve_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: ModelConfig
    tokenizer: Tokenizer
    source: ModelSource
    dtype: torch.dtype


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """"auto" (or None) asks the platform; otherwise one of float32, bfloat16, float16."""
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif dtype is None or dtype == "auto":
        from zili.platforms import current_platform

        return current_platform().default_dtype()
    elif isinstance(dtype, str):
        name = dtype.lower().removeprefix("torch.")
        name = _DTYPE_ALIASES.get(name, name)
        if name in _DTYPES:
            return _DTYPES[name]
    raise ValueError(f"dtype {dtype!r} is not supported; supported: auto, {', '.join(_DTYPES)}")


@contextlib.contextmanager
def _progress(message: str) -> Iterator[None]:
    """A spinner on stderr when it is a terminal; silent otherwise (logs, pipes, tests)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    start = time.perf_counter()
    with console.status(message):
        yield
    console.print(f"[dim]{message.rstrip('.')} done in {time.perf_counter() - start:.1f} s[/dim]")


LOAD_FORMATS = ("auto", "dummy")


def load_model(
    ref: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    tp: TensorParallel | None = None,
    load_format: str = "auto",
    seed: int = 0,
) -> LoadedModel:
    """Resolve `ref` (path or alias; None = the default model), build the model and load its weights.

    With `tp` (tensor parallelism), build this rank's shard of the model and read only its slice of
    each checkpoint tensor where the format allows (see `zili.distributed.weights`).

    load_format "dummy" (vLLM's name) reads only the architecture (an HF directory's config.json
    is enough) and fills the weights with seeded random values: for speed work on model shapes
    whose weights are not on the machine. Without a tokenizer.json it gets a placeholder tokenizer
    (one made-up word per token id), so prompts must be token ids."""
    from zili.models.registry import build_model

    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    dummy = load_format == "dummy"
    torch_dtype = resolve_dtype(dtype)
    source = resolve_model(ref, weights_required=not dummy)
    if device is None:
        from zili.platforms import current_platform

        device = current_platform().device
    with _progress(f"Loading {source.ref} ({source.format}, {str(torch_dtype).removeprefix('torch.')})..."):
        checkpoint = open_checkpoint(source)
        config = checkpoint.config()
        tokenizer = _placeholder_tokenizer_if_missing(checkpoint, config) if dummy else checkpoint.tokenizer()
        if active(tp):
            model = _build_shard(config, torch_dtype, device, tp)
            if not dummy:
                from zili.distributed.weights import shard_specs, sharded_tensors

                weights = sharded_tensors(checkpoint, shard_specs(model), torch_dtype)
        else:
            model = build_model(config, torch_dtype, device)
            if not dummy:
                weights = checkpoint.tensors(torch_dtype)
        with torch.no_grad():
            if dummy:
                fill_dummy_weights(model, seed)
            else:
                model.load_weights(weights)
        model.eval()
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, source=source, dtype=torch_dtype)


def fill_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Seeded random weights: RMSNorm scales 1, everything else uniform in +-0.02 (small enough that
    activations stay finite through many layers). Generated on the parameters' own device."""
    from zili.layers.norm import RMSNorm

    norm_scales = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    for i, param in enumerate(model.parameters()):
        if id(param) in norm_scales:
            param.fill_(1.0)
        else:
            param.uniform_(-0.02, 0.02, generator=torch.Generator(device=param.device).manual_seed(seed * 100_003 + i))


def _placeholder_tokenizer_if_missing(checkpoint, config: ModelConfig) -> Tokenizer:
    try:
        return checkpoint.tokenizer()
    except UnsupportedModelError:  # no tokenizer.json next to a bare config.json (a broken one still fails)
        eos = getattr(checkpoint, "hf_config", {}).get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        return Tokenizer.placeholder(config.vocab_size, eos_ids)


def _build_shard(config: ModelConfig, dtype: torch.dtype, device: str | torch.device, tp: TensorParallel
                 ) -> torch.nn.Module:
    """Like `registry.build_model`, for one tensor-parallel rank."""
    from zili.models.registry import model_class

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(config)(config, tp)
    finally:
        torch.set_default_dtype(previous)
    return model.requires_grad_(False).eval()
