"""The one dtype parser, memory-size parser, load-format list and kv_bytes_per_token (MLA included),
and the ZILI_* environment table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from zili import envs
from zili.config import (
    LOAD_FORMATS,
    EngineConfig,
    ModelConfig,
    check_load_format,
    normalize_dtype,
    parse_dtype,
    parse_memory_size,
)
from zili.models.loader import load_model, resolve_dtype

GiB = 1024**3


@pytest.mark.parametrize("given,want", [
    ("bf16", "bfloat16"), ("BF16", "bfloat16"), ("bfloat16", "bfloat16"), ("torch.bfloat16", "bfloat16"),
    (torch.bfloat16, "bfloat16"), ("fp16", "float16"), ("half", "float16"), ("f16", "float16"),
    ("fp32", "float32"), ("float", "float32"), (" float32 ", "float32"), (torch.float32, "float32"),
    ("auto", "auto"), ("AUTO", "auto"),
])
def test_dtype_names_and_aliases(given, want) -> None:
    assert normalize_dtype(given) == want
    if want != "auto":
        assert parse_dtype(given) == getattr(torch, want)


def test_bf16_passes_engine_config_and_loader_alike() -> None:
    # The bug this parser fixes: "bf16" passed load_model and failed EngineConfig.
    assert EngineConfig(dtype="bf16").dtype == "bfloat16"
    assert EngineConfig(dtype="torch.float16").dtype == "float16"
    assert resolve_dtype("bf16") == torch.bfloat16


@pytest.mark.parametrize("bad", ["int8", "float64", "", "bf 16", torch.int8, 3, None, ["bf16"]])
def test_bad_dtype_is_a_value_error_naming_the_field(bad) -> None:
    with pytest.raises(ValueError, match=r"^EngineConfig\.dtype .* is not supported; supported: auto, float32"):
        EngineConfig(dtype=bad)
    with pytest.raises(ValueError, match=r"^my_field "):
        normalize_dtype(bad, "my_field")
    with pytest.raises(ValueError, match="'auto' must be resolved"):
        parse_dtype("auto")


@pytest.mark.parametrize("given,want", [
    ("4GiB", 4 * GiB), ("4 GiB", 4 * GiB), ("4gib", 4 * GiB), ("2G", 2 * GiB), ("512MiB", 512 * 2**20),
    ("512M", 512 * 2**20), ("512MB", 512 * 10**6), ("1kB", 1000), ("1KiB", 1024), ("1.5GiB", int(1.5 * GiB)),
    ("1073741824", GiB), ("100B", 100), (" 0.5 ", 0.5), ("1.0", 1.0), (".25", 0.25),
    (0.5, 0.5), (1.0, 1.0), (GiB, GiB),
])
def test_memory_sizes(given, want) -> None:
    got = parse_memory_size(given, "kv")
    assert got == want and type(got) is type(want)
    assert EngineConfig(kv_cache_memory=given).kv_cache_memory == want


@pytest.mark.parametrize("bad", ["", "abc", "4 GB GB", "-1", "0", "0.0", "1.5", "2.0", "4XiB", "iB", "1e9",
                                 "nan", 0, -5, 0.0, 1.5, float("inf"), float("nan"), True, [1], "4Gi"])
def test_bad_memory_size_is_a_value_error_naming_the_field(bad) -> None:
    with pytest.raises(ValueError, match=r"^EngineConfig\.kv_cache_memory"):
        EngineConfig(kv_cache_memory=bad)
    with pytest.raises(ValueError, match=r"^--kv-cache-memory"):
        parse_memory_size(bad, "--kv-cache-memory")


def test_one_list_of_load_formats(tmp_path: Path) -> None:
    assert LOAD_FORMATS == ("auto", "dummy")
    for fmt in LOAD_FORMATS:
        assert check_load_format(fmt) == fmt and EngineConfig(load_format=fmt).load_format == fmt
    with pytest.raises(ValueError, match=r"^EngineConfig\.load_format must be one of auto, dummy, got 'pt'"):
        EngineConfig(load_format="pt")
    with pytest.raises(ValueError, match=r"^load_format must be one of auto, dummy, got 'safetensors'"):
        load_model(str(tmp_path), load_format="safetensors")


def _config(**kw) -> ModelConfig:
    base = dict(architecture="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    return ModelConfig(**{**base, **kw})


def test_kv_bytes_per_token_standard_attention() -> None:
    cfg = _config()  # head_dim 16: k and v, 2 KV heads, 3 layers
    assert cfg.kv_bytes_per_token(torch.bfloat16) == 2 * 2 * 16 * 3 * 2
    assert cfg.kv_bytes_per_token("float32") == 2 * 2 * 16 * 3 * 4
    assert cfg.kv_bytes_per_token("bf16") == cfg.kv_bytes_per_token(torch.bfloat16)
    # What a real KV tensor of one block holds, per token.
    block = torch.empty(cfg.kv_cache_shape(1, 16), dtype=torch.bfloat16)
    assert cfg.kv_bytes_per_token(torch.bfloat16) * 16 == block.numel() * block.element_size() * 3


def test_kv_bytes_per_token_mla_counts_the_latent_not_heads() -> None:
    # DeepSeek-V3's shapes: 128 heads would need 2*128*192 elements per layer; the latent is 512 + 64.
    cfg = _config(architecture="deepseek_v3", num_attention_heads=128, num_key_value_heads=128, hidden_size=7168,
                  head_dim=192, num_hidden_layers=61, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                  v_head_dim=128, q_lora_rank=1536)
    assert cfg.kv_bytes_per_token(torch.bfloat16) == (512 + 64) * 61 * 2
    assert cfg.kv_bytes_per_token(torch.bfloat16) < 2 * 128 * 192 * 61 * 2 / 50


def test_offline_roofline_uses_the_latent_for_mla() -> None:
    from zili.bench.offline import roofline_table

    mla = _config(architecture="deepseek_v3", num_attention_heads=4, num_key_value_heads=4, head_dim=48,
                  kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=24)
    rows = roofline_table(mla, weight_bytes=0, bandwidth_gb_s=1.0, context_len=10, batches=(1,))
    assert rows[0]["bytes_per_step"] == 10 * (32 + 16) * 3 * 2


def test_env_table_documents_every_variable_read_in_src() -> None:
    """Every ZILI_* name in src/zili is a documented entry of zili.envs, and os.environ is read only
    there (plus XDG directory lookups and non-ZILI variables)."""
    src = Path(envs.__file__).parent
    named = set()
    for path in src.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        named |= set(re.findall(r"\bZILI_[A-Z0-9_]+\b", text))
        if path.name != "envs.py":
            assert not re.search(r"environ(\.get)?\(?\[?[\"']ZILI_", text), f"{path} reads a ZILI_ variable itself"
    assert named <= set(envs.ENVIRONMENT_VARIABLES), named - set(envs.ENVIRONMENT_VARIABLES)
    for var in envs.ENVIRONMENT_VARIABLES.values():
        assert var.kind in ("bool", "int", "str", "path") and len(var.help) > 20


def test_env_values_are_parsed_and_bad_ones_named(monkeypatch) -> None:
    monkeypatch.delenv("ZILI_ENFORCE_EAGER", raising=False)
    assert envs.enforce_eager() is False
    for value, want in (("1", True), ("yes", True), ("TRUE", True), ("0", False), ("off", False), ("", False)):
        monkeypatch.setenv("ZILI_ENFORCE_EAGER", value)
        assert envs.enforce_eager() is want
    monkeypatch.setenv("ZILI_ENFORCE_EAGER", "maybe")
    with pytest.raises(ValueError, match="ZILI_ENFORCE_EAGER='maybe' is not a boolean"):
        envs.enforce_eager()
    monkeypatch.setenv("ZILI_ONEDNN", "0")
    assert envs.onednn_enabled() is False
    monkeypatch.delenv("ZILI_ONEDNN")
    assert envs.onednn_enabled() is True
    monkeypatch.setenv("ZILI_TUNE_CACHE", "~/x/tune.json")
    assert envs.tune_cache_path() == Path("~/x/tune.json").expanduser()
    monkeypatch.delenv("ZILI_TUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/tmp/cachehome")
    assert envs.tune_cache_path() == Path("/tmp/cachehome/zili/tune.json")
    monkeypatch.setenv("ZILI_PLATFORM", " cpu ")
    assert envs.platform_name() == "cpu"
