"""load_model: reference -> files -> ModelConfig -> nn.Module with weights, plus the tokenizer.

`open_checkpoint` and `resolve_model` here are the family-aware versions of `zili.weights`'
(which reads formats and knows no families): they consult the family table, zili.models.registry.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console

from zili.choices import LOAD_FORMATS
from zili.config import ModelConfig, check_load_format, normalize_dtype, parse_dtype
from zili.layers.linear import NOT_LOADED, Linear
from zili.layers.norm import RMSNorm
from zili.layers.parallel import TensorParallel, active
from zili.models.base import CausalLM
from zili.models.hf_config import model_config_from_hf
from zili.models.quantize import deferrable_projections
from zili.models.registry import SUPPORTED, build_model, default_dtype, gguf_family, hf_family, model_class
from zili.models.sharding import shard_specs, sharded_tensors
from zili.platforms import current_platform
from zili.tokenizer import Tokenizer
from zili.weights import ModelSource, UnsupportedModelError
from zili.weights import resolve_model as resolve_files
from zili.weights.gguf import GGUFCheckpoint, read_gguf_header
from zili.weights.safetensors import HFCheckpoint

Checkpoint = GGUFCheckpoint | HFCheckpoint


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    source: ModelSource
    dtype: torch.dtype


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """"auto" (or None) asks the platform; otherwise a name or alias `zili.config.normalize_dtype`
    accepts (float32, bf16, half, torch.bfloat16...). ValueError naming `dtype` otherwise."""
    if dtype is None or normalize_dtype(dtype, "dtype") == "auto":
        return current_platform().default_dtype()
    return parse_dtype(dtype, "dtype")


def check_architecture(source: ModelSource, meta: dict[str, Any]) -> None:
    """UnsupportedModelError unless the family table runs this checkpoint: a GGUF's architecture and
    tokenizer kind, or an HF config.json's architecture and settings. The message names what the
    file declares and lists the supported HF and GGUF architectures."""
    if source.format == "gguf":
        gguf_family(meta.get("general.architecture"), meta.get("tokenizer.ggml.model"), str(source.path))
        return
    try:
        hf_family(meta)
    except ValueError as e:
        raise UnsupportedModelError(
            f"Checkpoint {source.ref!r} declares architectures {meta.get('architectures')} (model_type "
            f"{meta.get('model_type')!r}): {e}.") from None
    try:
        model_config_from_hf(meta)  # the rest of the config (rope type, activation, ...) is checked there
    except (ValueError, KeyError, TypeError) as e:
        raise UnsupportedModelError(f"Checkpoint {source.ref!r} cannot be run: {e}. "
                                    f"Supported architectures: {', '.join(SUPPORTED)}.") from e


def resolve_model(ref: str | None = None, weights_required: bool = True) -> ModelSource:
    """`zili.weights.resolve_model` plus the family table's check (`check_architecture`)."""
    return resolve_files(ref, weights_required, check_architecture)


def open_checkpoint(source: ModelSource) -> Checkpoint:
    """The checkpoint behind `source`, read with its family's hooks: a GGUF file with the family's
    GGUF layout, an HF directory with `model_config_from_hf`. UnsupportedModelError for an
    architecture or tokenizer the family table does not list (the message lists what it does)."""
    if source.format == "gguf":
        meta = read_gguf_header(source.path).metadata
        entry = gguf_family(meta.get("general.architecture"), meta.get("tokenizer.ggml.model"), str(source.path))
        assert entry.gguf is not None  # gguf_family only returns entries with a layout
        return GGUFCheckpoint(source.path, entry.gguf)
    if source.format == "hf":
        return HFCheckpoint(source.path, model_config_from_hf)
    raise UnsupportedModelError(f"checkpoint format {source.format!r} is not supported; supported: gguf, hf")


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


__all__ = ["LOAD_FORMATS", "LoadedModel", "load_model", "open_checkpoint", "resolve_dtype", "resolve_model"]


def load_model(
    ref: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    tp: TensorParallel | None = None,
    load_format: str = "auto",
    seed: int = 0,
    defer_packed: str | None = None,
) -> LoadedModel:
    """Resolve `ref` (path or alias; None = the default model), build the model and load its weights.

    With `tp` (tensor parallelism), build this rank's shard of the model and read only its slice of
    each checkpoint tensor where the format allows (see `zili.models.sharding`).

    load_format "dummy" (vLLM's name) reads only the architecture (an HF directory's config.json
    is enough) and fills the weights with seeded random values: for speed work on model shapes
    whose weights are not on the machine. Without a tokenizer.json it gets a placeholder tokenizer
    (one made-up word per token id), so prompts must be token ids.

    `defer_packed` (a quantization mode; only for a caller that runs `quantize_and_calibrate` with it on
    the cpu-packed matmul backend next): the projections of a GGUF checkpoint that will be packed from
    its own codes and keep no dense copy (`quantize.deferrable_projections`) are not read here: their
    weights stay unallocated (`Linear.weight_deferred`) instead of all being held dense at once before
    packing, the peak of the build. Ignored with `tp` and for other formats."""
    check_load_format(load_format, "load_format")
    dummy = load_format == "dummy"
    torch_dtype = resolve_dtype(dtype)
    source = resolve_model(ref, weights_required=not dummy)
    if device is None:
        device = current_platform().device
    with _progress(f"Loading {source.ref} ({source.format}, {str(torch_dtype).removeprefix('torch.')})..."):
        checkpoint = open_checkpoint(source)
        config = checkpoint.config()
        tokenizer = _placeholder_tokenizer_if_missing(checkpoint, config) if dummy else checkpoint.tokenizer()
        if active(tp):
            model = _build_shard(config, torch_dtype, device, tp)
            if not dummy:
                weights = sharded_tensors(checkpoint, shard_specs(model), torch_dtype)
        else:
            model = build_model(config, torch_dtype, device)
            if not dummy:
                deferred = _defer_weights(model, defer_packed, checkpoint) \
                    if defer_packed is not None and isinstance(checkpoint, GGUFCheckpoint) else set()
                weights = checkpoint.tensors(torch_dtype, skip=deferred, placeholder=NOT_LOADED) \
                    if isinstance(checkpoint, GGUFCheckpoint) else checkpoint.tensors(torch_dtype)
        with torch.no_grad():
            if dummy:
                fill_dummy_weights(model, seed)
            else:
                model.load_weights(weights)
        model.eval()
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, source=source, dtype=torch_dtype)


def _defer_weights(model: CausalLM, mode: str, checkpoint: GGUFCheckpoint) -> set[str]:
    """Mark the weights `deferrable_projections` names unread (an empty placeholder, `weight_deferred`);
    returns the checkpoint tensor names the loader then skips."""
    modules = dict(model.named_modules())
    names: set[str] = set()
    for module_name, shards in deferrable_projections(model, mode, checkpoint).items():
        module = modules[module_name]
        assert isinstance(module, Linear)
        module.weight.data = torch.empty(0, dtype=module.weight.dtype, device=module.weight.device)
        module.weight_deferred = True
        names.update(shards)
    return names


def fill_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Seeded random weights: RMSNorm scales 1, everything else uniform in +-0.02 (small enough that
    activations stay finite through many layers). Generated on the parameters' own device."""
    norm_scales = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    for i, param in enumerate(model.parameters()):
        if id(param) in norm_scales:
            param.fill_(1.0)
        else:
            param.uniform_(-0.02, 0.02, generator=torch.Generator(device=param.device).manual_seed(seed * 100_003 + i))


def _placeholder_tokenizer_if_missing(checkpoint: Checkpoint, config: ModelConfig) -> Tokenizer:
    try:
        return checkpoint.tokenizer()
    except UnsupportedModelError:  # no tokenizer.json next to a bare config.json (a broken one still fails)
        eos = getattr(checkpoint, "hf_config", {}).get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        return Tokenizer.placeholder(config.vocab_size, eos_ids)


def _build_shard(config: ModelConfig, dtype: torch.dtype, device: str | torch.device, tp: TensorParallel
                 ) -> CausalLM:
    """Like `registry.build_model`, for one tensor-parallel rank."""
    with torch.device(device), default_dtype(dtype):
        model = model_class(config)(config, tp)
    return model.requires_grad_(False).eval()
