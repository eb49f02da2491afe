"""Tensor parallelism on CPU: 2 ranks over gloo (this process is rank 0, one spawned worker).

tp=2 must reproduce tp=1: the same greedy tokens through the whole engine, and the same logits
(fp32, within 1e-4) for a prefill and the decode steps after it. Covered: Llama with KV heads split
evenly, Llama with fewer KV heads than ranks (replicated), Llama whose KV heads do not divide
(padded with zero heads), and a DeepSeek V3 MoE (MLA heads split, experts split).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402,F401  (tests/tiny_models writes checkpoints with it)

from tests.tiny_models import write_tiny_deepseek, write_tiny_llama  # noqa: E402
from zili import LLM, SamplingParams  # noqa: E402
from zili.engine.runner import StepInput, kv_bytes_per_block  # noqa: E402
from zili.layers.parallel import TensorParallel, split_heads  # noqa: E402
from zili.models.hf_config import model_config_from_hf  # noqa: E402

PROMPTS = ["Hello there", "The capital of France is", "def fib(n):", "你好，世界", "a",
           "The quick brown fox jumps over the lazy dog"]

MODELS = {
    "llama-gqa": lambda d: write_tiny_llama(d),  # 4 heads, 2 KV heads: one KV head per rank
    "llama-kv1": lambda d: write_tiny_llama(d, num_key_value_heads=1),  # the KV head on both ranks
    "llama-kv3": lambda d: write_tiny_llama(d, hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                                            intermediate_size=100),  # padded: 2 KV heads per rank
    "deepseek-v3": lambda d: write_tiny_deepseek(d, "v3"),  # MLA + 16 experts, 8 per rank
}


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    threads = torch.get_num_threads()  # the engine sets the process's thread count
    yield
    torch.set_num_threads(threads)


def make_llm(path, tp: int, **kw) -> LLM:
    cfg = model_config_from_hf(json.loads((path / "config.json").read_text()))
    return LLM(str(path), dtype="float32", block_size=4, threads=1, max_num_seqs=8, use_tune_cache=False,
               kv_cache_memory=64 * kv_bytes_per_block(cfg, 4, torch.float32), tensor_parallel_size=tp, **kw)


def greedy(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def logits_trace(llm: LLM) -> list[torch.Tensor]:
    """Logits of a two-sequence prefill, then three decode steps, straight through the runner."""
    a = llm.tokenizer.encode("The capital of France is")
    b = llm.tokenizer.encode("def fib(n):")
    tables = [list(range(0, 16)), list(range(16, 32))]
    step = StepInput([a, b], [0, 0], tables, [True, True])
    out = []
    for _ in range(4):
        logits = llm.engine.runner.execute(step)
        out.append(logits.clone())
        nxt = logits.argmax(dim=-1).tolist()
        starts = [s + len(t) for s, t in zip(step.start_positions, step.token_ids)]
        step = StepInput([[nxt[0]], [nxt[1]]], starts, tables, [True, True])
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_tp2_matches_tp1(name, tmp_path):
    path = MODELS[name](tmp_path / name)
    single = make_llm(path, 1)
    expected_tokens, expected_logits = greedy(single), logits_trace(single)
    del single
    llm = make_llm(path, 2)
    try:
        assert llm.engine.tp_executor is not None and len(llm.engine.tp_executor.workers) == 1
        assert greedy(llm) == expected_tokens
        for got, want in zip(logits_trace(llm), expected_logits):
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= 1e-4
    finally:
        llm.engine.close()
    assert not llm.engine.tp_executor.workers[0].is_alive()


def test_head_split_rules():
    tp = [TensorParallel(r, 2) for r in range(2)]
    even = [split_heads(4, 2, t) for t in tp]  # GQA groups stay whole
    assert [(s.q.start, s.q.stop, s.kv.start, s.kv.stop) for s in even] == [(0, 2, 0, 1), (2, 4, 1, 2)]
    replicated = [split_heads(4, 1, t) for t in tp]
    assert [(s.q.start, s.q.stop, s.kv.start, s.kv.stop) for s in replicated] == [(0, 2, 0, 1), (2, 4, 0, 1)]
    padded = [split_heads(9, 3, t) for t in tp]  # SmolLM2's 9 heads / 3 KV heads: a zero KV group on rank 1
    assert [(s.q.size, s.kv.size) for s in padded] == [(6, 2), (6, 2)]
    assert [(s.q.count, s.kv.count) for s in padded] == [(6, 2), (3, 1)]
    with pytest.raises(ValueError, match="does not divide"):
        split_heads(2, 1, TensorParallel(0, 4))


def test_step_plan_round_trip():
    from zili.distributed.plan import pack_step, unpack_step

    step = StepInput([[5, 6, 7], [9], []], [0, 12, 3], [[1, 2], [3, 4, 5, 6], []], [True, False, True])
    packed = pack_step(step)
    assert packed.dtype == torch.int64 and packed.dim() == 1
    assert unpack_step(packed) == step
