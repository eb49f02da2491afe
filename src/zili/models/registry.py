"""The model-family table: the one place that says which architectures zili runs and how.

Each `ModelFamily` entry names its model class, the HF architecture names (config.json's
`architectures` / `model_type`) and GGUF architecture names (`general.architecture`) it reads, the
GGUF tokenizer kinds it accepts, and its capabilities, which the engine asks instead of comparing
family names. Adding a family means adding its entry here and its model file; the model file keeps
its own per-format hooks (HF config fields, the GGUF layout) and the entry points at them.

`ModelConfig.architecture` holds the entry's `name`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from zili.config import ModelConfig, parse_dtype
from zili.models.base import CausalLM
from zili.models.deepseek import (
    DEEPSEEK2_GGUF_LAYOUT,
    DeepseekForCausalLM,
    deepseek_v2_hf_fields,
    deepseek_v3_hf_fields,
)
from zili.models.gemma3 import GEMMA3_GGUF_LAYOUT, Gemma3ForCausalLM, gemma3_hf_fields
from zili.models.llama import LLAMA_GGUF_LAYOUT, QWEN2_GGUF_LAYOUT, QWEN3_GGUF_LAYOUT, LlamaForCausalLM
from zili.weights.errors import UnsupportedModelError
from zili.weights.gguf import GGUFLayout


@dataclass(frozen=True)
class Capabilities:
    """What the engine may do with a family's model (each flag is checked where the choice is made).

    graph_safe_decode: the decode forward has static shapes and no data-dependent host control
        flow, so it can be captured as a device graph (CUDA graphs) and replayed.
    compiled_decode: the decode forward compiles into one torch.compile graph (fullgraph).
    mla: the KV cache holds Multi-head Latent Attention latents (DeepSeek-V2, arXiv:2405.04434),
        one [kv_lora_rank + qk_rope_head_dim] vector per token, not per-head keys and values.
    data_dependent_routing: Mixture-of-Experts routing decides per token which weights run.
    """

    graph_safe_decode: bool = False
    compiled_decode: bool = False
    mla: bool = False
    data_dependent_routing: bool = False


@dataclass(frozen=True)
class HFArchitecture:
    """One HF architecture a family reads: the class name config.json lists, its `model_type`
    (used when `architectures` is absent) and the context length its HF config class defaults to."""

    name: str
    model_type: str
    default_max_positions: int


@dataclass(frozen=True)
class ModelFamily:
    """One row of the family table (see the module docstring)."""

    name: str  # ModelConfig.architecture
    model_class: type[CausalLM]
    hf_architectures: tuple[HFArchitecture, ...]
    gguf: GGUFLayout | None = None  # the GGUF dialect, None when no GGUF architecture maps here
    # GGUF `tokenizer.ggml.model` values this family's files may carry ("gpt2": byte-level BPE).
    tokenizer_kinds: tuple[str, ...] = ("gpt2",)
    capabilities: Capabilities = field(default_factory=Capabilities)
    # ModelConfig fields this family fixes whatever config.json says (e.g. Qwen2's q/k/v bias).
    hf_overrides: Mapping[str, Any] = field(default_factory=dict)
    # Family-specific ModelConfig fields read from config.json (beyond the Llama-shaped ones).
    hf_fields: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    @property
    def gguf_architectures(self) -> tuple[str, ...]:
        return (self.gguf.architecture,) if self.gguf is not None else ()


_DENSE = Capabilities(graph_safe_decode=True, compiled_decode=True)
_MLA_MOE = Capabilities(mla=True, data_dependent_routing=True)

FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily("llama", LlamaForCausalLM,
                (HFArchitecture("LlamaForCausalLM", "llama", 2048),
                 HFArchitecture("MistralForCausalLM", "mistral", 4096 * 32)),
                gguf=LLAMA_GGUF_LAYOUT, capabilities=_DENSE,
                tokenizer_kinds=("gpt2", "llama")),  # Llama 3 byte-level BPE; Llama 2 / Mistral SentencePiece
    ModelFamily("qwen2", LlamaForCausalLM, (HFArchitecture("Qwen2ForCausalLM", "qwen2", 32768),),
                gguf=QWEN2_GGUF_LAYOUT, capabilities=_DENSE,
                hf_overrides={"attention_bias": True, "o_proj_bias": False}),
    ModelFamily("qwen3", LlamaForCausalLM, (HFArchitecture("Qwen3ForCausalLM", "qwen3", 32768),),
                gguf=QWEN3_GGUF_LAYOUT, capabilities=_DENSE, hf_overrides={"qk_norm": True}),
    # llama.cpp writes both DeepSeek generations as "deepseek2"; its layout tells V3 apart.
    ModelFamily("deepseek_v2", DeepseekForCausalLM,
                (HFArchitecture("DeepseekV2ForCausalLM", "deepseek_v2", 2048),),
                gguf=DEEPSEEK2_GGUF_LAYOUT, capabilities=_MLA_MOE, hf_fields=deepseek_v2_hf_fields),
    ModelFamily("deepseek_v3", DeepseekForCausalLM,
                (HFArchitecture("DeepseekV3ForCausalLM", "deepseek_v3", 4096),),
                capabilities=_MLA_MOE, hf_fields=deepseek_v3_hf_fields),
    ModelFamily("gemma3", Gemma3ForCausalLM, (HFArchitecture("Gemma3ForCausalLM", "gemma3_text", 131072),),
                gguf=GEMMA3_GGUF_LAYOUT, tokenizer_kinds=("llama",), capabilities=_DENSE,
                hf_fields=gemma3_hf_fields),
)

_BY_NAME = {f.name: f for f in FAMILIES}
_BY_HF = {a.name: (f, a) for f in FAMILIES for a in f.hf_architectures}
_BY_MODEL_TYPE = {a.model_type: a.name for f in FAMILIES for a in f.hf_architectures}
_BY_GGUF = {f.gguf.architecture: f for f in FAMILIES if f.gguf is not None}

# HF architecture names (as config.json declares them) and GGUF architecture names zili runs.
SUPPORTED: tuple[str, ...] = tuple(_BY_HF)
SUPPORTED_GGUF: tuple[str, ...] = tuple(_BY_GGUF)


def supported_text() -> str:
    """Both lists, for error messages."""
    return f"supported: {', '.join(SUPPORTED)} (HF config.json); {', '.join(SUPPORTED_GGUF)} (GGUF)"


def family(name: str) -> ModelFamily:
    """The entry whose `name` is `name` (ModelConfig.architecture); ValueError naming the supported ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"architecture {name!r} is not supported; {supported_text()}") from None


def hf_family(cfg: Mapping[str, Any]) -> tuple[ModelFamily, HFArchitecture]:
    """The entry for an HF config.json (its `architectures`, else its `model_type`).

    ValueError naming what the config declares and what is supported."""
    names = list(cfg.get("architectures") or [])
    if not names and cfg.get("model_type") in _BY_MODEL_TYPE:
        names = [_BY_MODEL_TYPE[cfg["model_type"]]]
    for name in names:
        if name in _BY_HF:
            return _BY_HF[name]
    asked = ", ".join(map(str, names)) or f"model_type {cfg.get('model_type')!r}"
    raise ValueError(f"architecture {asked} is not supported; {supported_text()}")


def gguf_family(architecture: object, tokenizer_kind: object = None, source: str = "") -> ModelFamily:
    """The entry for a GGUF file's `general.architecture`, checking its `tokenizer.ggml.model` too.

    UnsupportedModelError (a ValueError) naming the architecture or tokenizer and the supported ones."""
    where = f"{source}: " if source else ""
    entry = _BY_GGUF.get(architecture) if isinstance(architecture, str) else None
    if entry is None:
        raise UnsupportedModelError(f"{where}GGUF architecture {architecture!r} is not supported; {supported_text()}.")
    if tokenizer_kind is not None and tokenizer_kind not in entry.tokenizer_kinds:
        raise UnsupportedModelError(
            f"{where}tokenizer model {tokenizer_kind!r} (tokenizer.ggml.model) is not supported for GGUF "
            f"architecture {architecture!r}; supported: {', '.join(map(repr, entry.tokenizer_kinds))}.")
    return entry


def capabilities_of(model: nn.Module) -> Capabilities:
    """The capabilities of a model built from this table; none at all for any other module."""
    architecture = getattr(getattr(model, "config", None), "architecture", None)
    entry = _BY_NAME.get(architecture) if isinstance(architecture, str) else None
    return entry.capabilities if entry is not None else Capabilities()


def model_class(config: ModelConfig) -> type[CausalLM]:
    """The nn.Module class for `config.architecture`; ValueError naming the supported ones."""
    return family(config.architecture).model_class


def build_model(config: ModelConfig, dtype: torch.dtype | str, device: torch.device | str | None = None) -> CausalLM:
    """An inference-only model with uninitialised weights (fill them with `load_weights`)."""
    dtype = parse_dtype(dtype, "dtype") if isinstance(dtype, str) else dtype
    cls = model_class(config)
    device = torch.device(device) if device is not None else torch.get_default_device()
    with torch.device(device), default_dtype(dtype):
        model = cls(config)
    return model.requires_grad_(False).eval()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default dtype set to `dtype` inside the block (modules create parameters in it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
