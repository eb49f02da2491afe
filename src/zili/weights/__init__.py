"""Model weights: find them (resolve), open them (GGUF or HF safetensors), stream HF-named tensors."""

from __future__ import annotations

from typing import TYPE_CHECKING

from zili.weights.errors import ModelNotFoundError, UnsupportedModelError
from zili.weights.resolve import ModelSource, list_aliases, resolve_model

if TYPE_CHECKING:
    from zili.weights.gguf import GGUFCheckpoint
    from zili.weights.safetensors import HFCheckpoint


def open_checkpoint(source: ModelSource) -> "GGUFCheckpoint | HFCheckpoint":
    """The checkpoint class for the source's format, without any model family's hooks: its
    metadata, tensor index and tokenizer are readable, its ModelConfig and HF-named tensors are
    not. `zili.models.loader.open_checkpoint` opens it with its family's."""
    if source.format == "gguf":
        from zili.weights.gguf import GGUFCheckpoint

        return GGUFCheckpoint(source.path)
    if source.format == "hf":
        from zili.weights.safetensors import HFCheckpoint

        return HFCheckpoint(source.path)
    raise UnsupportedModelError(f"checkpoint format {source.format!r} is not supported; supported: gguf, hf")


__all__ = [
    "ModelNotFoundError",
    "ModelSource",
    "UnsupportedModelError",
    "list_aliases",
    "open_checkpoint",
    "resolve_model",
]
