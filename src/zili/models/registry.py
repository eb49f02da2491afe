"""Architecture family -> model class, and building a model on a device in a dtype."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from zili.config import ModelConfig
from zili.models.deepseek import DeepseekForCausalLM
from zili.models.hf_config import HF_ARCHITECTURES
from zili.models.llama import LlamaForCausalLM

_MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "deepseek_v2": DeepseekForCausalLM,
    "deepseek_v3": DeepseekForCausalLM,
}
# HF architecture names (as config.json declares them) that zili runs; for error messages.
SUPPORTED: tuple[str, ...] = tuple(name for name, family in HF_ARCHITECTURES.items() if family in _MODEL_CLASSES)


def model_class(config: ModelConfig) -> type[nn.Module]:
    try:
        return _MODEL_CLASSES[config.architecture]
    except KeyError:
        raise ValueError(f"architecture {config.architecture!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED)}") from None


def build_model(config: ModelConfig, dtype: torch.dtype | str, device: torch.device | str | None = None) -> nn.Module:
    """An inference-only model with uninitialised weights (fill them with `load_weights`)."""
    if isinstance(dtype, str):
        dtype = _parse_dtype(dtype)
    cls = model_class(config)
    device = torch.device(device) if device is not None else torch.get_default_device()
    with torch.device(device), _default_dtype(dtype):
        model = cls(config)
    return model.requires_grad_(False).eval()


def _parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype {name!r} is not a floating-point torch dtype")
    return dtype


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
