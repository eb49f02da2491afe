"""The "dummy" load format (random weights on a config.json alone), its placeholder tokenizer, and
the tensor-parallel executor forced at tp=1 (what the GPU benchmarks measure the overhead of)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.tiny_models import write_tiny_llama
from zili import LLM, SamplingParams
from zili.config import EngineConfig
from zili.models.loader import load_model
from zili.tokenizer import Tokenizer
from zili.weights import UnsupportedModelError

CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
              max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=7)


@pytest.fixture
def config_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    return tmp_path


def test_config_only_directory_needs_the_dummy_format(config_dir):
    with pytest.raises(UnsupportedModelError, match="safetensors"):
        load_model(str(config_dir), dtype="float32", device="cpu")


def test_dummy_weights_are_seeded_and_finite(config_dir):
    a = load_model(str(config_dir), dtype="float32", device="cpu", load_format="dummy", seed=1)
    b = load_model(str(config_dir), dtype="float32", device="cpu", load_format="dummy", seed=1)
    c = load_model(str(config_dir), dtype="float32", device="cpu", load_format="dummy", seed=2)
    pa, pb, pc = (dict(m.model.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert any(not torch.equal(pa[n], pc[n]) for n in pa)
    norms = [n for n in pa if n.endswith("norm.weight")]
    assert norms and all(torch.all(pa[n] == 1) for n in norms)
    others = [p for n, p in pa.items() if n not in norms]
    assert all(p.abs().max() <= 0.02 and p.std() > 0.005 for p in others)
    with pytest.raises(ValueError, match="load_format"):
        load_model(str(config_dir), load_format="random")


def test_placeholder_tokenizer_round_trips_ids():
    tok = Tokenizer.placeholder(300, [7])
    assert tok.encode("<5> <17> <299>", add_special_tokens=False) == [5, 17, 299]
    assert tok.decode([5, 17]) == "<5> <17>"
    assert tok.eos_token_ids == [7]


def test_dummy_model_generates_from_token_ids(config_dir):
    llm = LLM(str(config_dir), load_format="dummy", dtype="float32", kv_cache_memory=1 << 20)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate([[1, 2, 3], [40, 50]], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6]
    assert all(0 <= t < CONFIG["vocab_size"] for o in outs for t in o.outputs[0].token_ids)
    # batched == alone holds for random weights too
    assert llm.generate([[40, 50]], params, use_tqdm=False)[0].outputs[0].token_ids == outs[1].outputs[0].token_ids


def test_engine_config_rejects_unknown_formats():
    with pytest.raises(ValueError, match="load_format"):
        EngineConfig(load_format="pt")
    with pytest.raises(ValueError, match="distributed_executor_backend"):
        EngineConfig(distributed_executor_backend="ray")


def test_tp_executor_at_size_one_matches_plain_engine(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = ["Hello there", "abc", "zili"]
    opts = dict(dtype="float32", kv_cache_memory=1 << 20, threads=1)
    plain = [o.outputs[0].token_ids for o in LLM(str(path), **opts).generate(prompts, params, use_tqdm=False)]
    llm = LLM(str(path), distributed_executor_backend="mp", **opts)
    try:
        assert llm.engine.tp_executor is not None and llm.engine.tp_executor.size == 1
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.engine.close()
    assert got == plain
