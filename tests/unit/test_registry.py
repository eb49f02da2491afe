"""The model-family table: lookups by HF / GGUF name, errors that list what is supported, capabilities
the engine asks, and that no other module names an architecture."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from torch import nn

import zili
from zili.models import registry
from zili.models.deepseek import DeepseekForCausalLM
from zili.models.hf_config import model_config_from_hf
from zili.models.llama import LlamaForCausalLM
from zili.weights.errors import UnsupportedModelError

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100)


def test_every_entry_is_complete_and_names_are_unique() -> None:
    hf_names = [a.name for f in registry.FAMILIES for a in f.hf_architectures]
    gguf_names = [n for f in registry.FAMILIES for n in f.gguf_architectures]
    assert len(set(hf_names)) == len(hf_names) and len(set(gguf_names)) == len(gguf_names)
    assert len({f.name for f in registry.FAMILIES}) == len(registry.FAMILIES)
    for entry in registry.FAMILIES:
        assert issubclass(entry.model_class, nn.Module) and entry.hf_architectures and entry.tokenizer_kinds
        if entry.gguf is not None:
            assert entry.gguf.family == entry.name  # the layout builds configs of its own entry
            assert entry.gguf.hf_architecture in [a.name for a in entry.hf_architectures] or entry.name == "deepseek_v2"


@pytest.mark.parametrize("hf,family,cls", [
    ("LlamaForCausalLM", "llama", LlamaForCausalLM), ("MistralForCausalLM", "llama", LlamaForCausalLM),
    ("Qwen2ForCausalLM", "qwen2", LlamaForCausalLM), ("Qwen3ForCausalLM", "qwen3", LlamaForCausalLM),
    ("DeepseekV2ForCausalLM", "deepseek_v2", DeepseekForCausalLM),
    ("DeepseekV3ForCausalLM", "deepseek_v3", DeepseekForCausalLM),
])
def test_hf_names_reach_their_entry(hf, family, cls) -> None:
    entry, arch = registry.hf_family({"architectures": ["SomethingElse", hf]})
    assert (entry.name, arch.name, entry.model_class) == (family, hf, cls)
    assert registry.hf_family({"model_type": arch.model_type})[1].name == hf  # no `architectures` key


def test_gguf_names_reach_their_entry() -> None:
    assert registry.gguf_family("llama", "gpt2").name == "llama"
    assert registry.gguf_family("qwen3").name == "qwen3"
    assert set(registry.SUPPORTED_GGUF) >= {"llama", "qwen2", "qwen3"}


def test_unsupported_names_list_both_formats() -> None:
    with pytest.raises(ValueError) as e:
        registry.hf_family({"architectures": ["GPT2LMHeadModel"]})
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg and all(n in msg for n in registry.SUPPORTED + registry.SUPPORTED_GGUF)
    with pytest.raises(UnsupportedModelError) as e:
        registry.gguf_family("phi2", "gpt2", "/x/phi.gguf")
    msg = str(e.value)
    assert "/x/phi.gguf" in msg and "'phi2'" in msg and all(n in msg for n in registry.SUPPORTED_GGUF)
    assert "LlamaForCausalLM" in msg
    with pytest.raises(UnsupportedModelError, match=r"tokenizer model 'bert'.*'llama'.*supported: 'gpt2'"):
        registry.gguf_family("llama", "bert")
    with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported; supported: .*LlamaForCausalLM"):
        registry.family("gpt2")


def test_capabilities_drive_engine_choices() -> None:
    llama = registry.build_model(model_config_from_hf(dict(BASE, architectures=["LlamaForCausalLM"])), "float32")
    caps = registry.capabilities_of(llama)
    assert caps.graph_safe_decode and caps.compiled_decode and not caps.mla
    ds = registry.family("deepseek_v3").capabilities
    assert ds.mla and ds.data_dependent_routing and not ds.graph_safe_decode and not ds.compiled_decode
    assert registry.capabilities_of(nn.Linear(2, 2)) == registry.Capabilities()  # a foreign module: nothing


def test_family_overrides_come_from_the_table() -> None:
    qwen2 = model_config_from_hf(dict(BASE, architectures=["Qwen2ForCausalLM"]))
    assert qwen2.attention_bias and not qwen2.o_proj_bias and not qwen2.qk_norm
    llama = model_config_from_hf(dict(BASE, architectures=["LlamaForCausalLM"], attention_bias=True))
    assert llama.attention_bias and llama.o_proj_bias
    model = registry.build_model(qwen2, "float32")
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None


def test_no_module_outside_the_table_and_model_files_names_an_architecture() -> None:
    """Adding a family touches registry.py and its model file: no other module in src/zili names an
    HF architecture of the table or compares against a family or GGUF architecture name (a tokenizer's
    pre-tokenizer names or a reasoning parser's are other tables' keys, not architectures)."""
    src = Path(zili.__file__).parent
    allowed = {src / "models" / "registry.py"} | {
        Path(__import__(f.model_class.__module__, fromlist=["x"]).__file__) for f in registry.FAMILIES}
    hf = "|".join(re.escape(n) for n in registry.SUPPORTED)
    gguf = "|".join(re.escape(n) for n in registry.SUPPORTED_GGUF + tuple(f.name for f in registry.FAMILIES))
    # An HF class name anywhere, or a family / GGUF name compared against (== "llama", .startswith("qwen")).
    pattern = re.compile(rf"\b({hf})\b|[\"']({gguf})[\"']\s*(?:==|!=)|(?:==|!=)\s*[\"']({gguf})[\"']"
                         rf"|startswith\(\s*[\"'](?:{gguf}|deepseek|qwen|llama|mistral)")
    offenders = []
    for path in src.rglob("*.py"):
        if path in allowed or path.name == "tokenizer.py":  # tokenizer kinds share names ("llama": SentencePiece)
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line.split("#")[0]):
                offenders.append(f"{path.relative_to(src)}:{lineno}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
