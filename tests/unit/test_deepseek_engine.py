"""Engine invariants on tiny random DeepSeek V2/V3 models (fp32), through the latent paged cache:
batching, prefix-cache hits, preemption and chunked prefill never change greedy output."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers  # noqa: E402,F401

from tests.tiny_models import write_tiny_deepseek  # noqa: E402
from zili import LLM, SamplingParams  # noqa: E402
from zili.engine.runner import kv_bytes_per_block  # noqa: E402

PROMPTS = [
    "Hello there", "The capital of France is", "def fib(n):", "你好，世界", "Once upon a time in a land far away",
    "SELECT * FROM", "The quick brown fox jumps over the lazy dog", "a",
]
SYSTEM = "You are a helpful assistant. Answer briefly. "


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    threads = torch.get_num_threads()  # the engine sets the process's thread count
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["v3", "v2"])
def tiny_dir(request, tmp_path_factory):
    return write_tiny_deepseek(tmp_path_factory.mktemp(f"tiny-deepseek-{request.param}"), request.param)


def make_llm(tiny_dir, num_blocks=256, block_size=4, **kw) -> LLM:
    import json

    from zili.models.hf_config import model_config_from_hf

    cfg = model_config_from_hf(json.loads((tiny_dir / "config.json").read_text()))
    kw.setdefault("max_num_seqs", 16)
    kw.setdefault("threads", 1)  # tiny matmuls; intra-op threads only add hand-off latency
    return LLM(str(tiny_dir), dtype="float32", block_size=block_size,
               kv_cache_memory=num_blocks * kv_bytes_per_block(cfg, block_size, torch.float32), **kw)


def greedy_tokens(llm: LLM, prompts, max_tokens=10) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def assert_pool_free(llm: LLM) -> None:
    kv = llm.engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks
    assert all(b.ref_count == 0 for b in kv.blocks)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Each prompt run alone, prefix caching off."""
    llm = make_llm(tiny_dir, enable_prefix_caching=False)
    return [greedy_tokens(llm, [p])[0] for p in PROMPTS]


def test_cache_is_latent(tiny_dir):
    llm = make_llm(tiny_dir, num_blocks=32)
    cfg = llm.engine.model_config
    caches = llm.engine.runner.kv_caches
    assert len(caches) == cfg.num_hidden_layers
    assert caches[0].shape == (32, 4, cfg.kv_lora_rank + cfg.qk_rope_head_dim)


def test_batched_equals_alone(tiny_dir, reference):
    llm = make_llm(tiny_dir, enable_prefix_caching=False)
    assert greedy_tokens(llm, PROMPTS) == reference
    assert_pool_free(llm)


def test_prefix_cache_hits_give_identical_tokens(tiny_dir):
    prompts = [SYSTEM + p for p in PROMPTS]
    expected = greedy_tokens(make_llm(tiny_dir, enable_prefix_caching=False), prompts)
    llm = make_llm(tiny_dir)
    assert greedy_tokens(llm, prompts) == expected
    assert greedy_tokens(llm, prompts) == expected  # second run: every shared prefix is cached
    assert llm.engine.stats().prefix_cache_hit_rate > 0.4
    assert_pool_free(llm)


def test_preemption_and_chunked_prefill_give_identical_tokens(tiny_dir, reference):
    # 24 blocks of 4 tokens cannot hold 8 sequences of ~11-50 tokens at once; 16-token steps chunk prefills.
    llm = make_llm(tiny_dir, num_blocks=24, max_num_batched_tokens=16)
    assert greedy_tokens(llm, PROMPTS) == reference
    assert llm.engine.stats().num_preemptions > 0
    assert_pool_free(llm)
