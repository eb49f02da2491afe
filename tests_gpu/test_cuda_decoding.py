"""Speculative decoding, jump-forward, quantized KV caches and deterministic mode on an NVIDIA GPU.

The CPU suite checks each of these against its invariant on the CPU backends; here the same
invariants hold where the GPU paths differ: verify rows (k + 1 decode rows per speculating sequence)
and forced drafts replayed through the captured decode graphs, int8 / fp8 caches written and read by
the Triton kernels inside those graphs, the MTP head on device tensors, and the batch-invariant mode
on cuBLAS. Greedy output with drafts equals plain decoding token for token; batched equals alone;
every KV block comes back.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ZILI_TUNE_CACHE", "/nonexistent/zili-gpu-tests-tune.json")

if not torch.cuda.is_available():
    raise RuntimeError("tests_gpu needs a CUDA device (run `make test` on a CPU machine)")

from tests.tiny_models import write_tiny_deepseek_mtp, write_tiny_llama  # noqa: E402
from tests.unit.test_jump_forward import CITY, SCHEMAS, write_tiny_bpe_llama  # noqa: E402
from zili import LLM, SamplingParams  # noqa: E402
from zili.engine.cuda_graphs import DecodeGraphs  # noqa: E402

NGRAM = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
REPEATS = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick"
PROMPTS = [REPEATS, "abc abc abc abc abc abc abc", "Hello there", "1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2,",
           "Invoice no. 4471, total 93.20 EUR. Invoice no. 4471, total", "def fib(n):", "a", "Once upon a time"]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def _llm(path, **kw):
    opts = dict(dtype="float32", kv_cache_memory=64 << 20, max_num_seqs=16, use_tune_cache=False)
    opts.update(kw)
    return LLM(str(path), **opts)


def _assert_pool_free(llm):
    kv = llm.engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks and all(b.ref_count == 0 for b in kv.blocks)


@pytest.fixture
def graph_rows(monkeypatch):
    """(rows, replayed) of every decode step offered to the captured graphs."""
    seen: list[tuple[int, bool]] = []
    run_host = DecodeGraphs.run_host

    def counting(self, token_ids, *args):
        logits = run_host(self, token_ids, *args)
        seen.append((len(token_ids), logits is not None))
        return logits

    monkeypatch.setattr(DecodeGraphs, "run_host", counting)
    return seen


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("llama") / "m", num_hidden_layers=3)


@pytest.fixture(scope="module")
def plain_reference(tiny_llama):
    llm = _llm(tiny_llama, speculative_config=None, enable_jump_forward=False, enforce_eager=False)
    return _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))


def test_ngram_verify_rows_replay_the_graphs_and_equal_plain(tiny_llama, plain_reference, graph_rows):
    llm = _llm(tiny_llama, speculative_config=NGRAM, enforce_eager=False)
    assert llm.engine.graph_batch_sizes and max(llm.engine.graph_batch_sizes) > 16  # the ladder reaches verify rows
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == plain_reference
    graph_rows.clear()
    alone = [_tokens(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in PROMPTS[:2]]
    assert alone == plain_reference[:2]
    # one sequence alone: a step of more than one row is a verify step, and it replayed a graph
    assert any(rows > 1 and replayed for rows, replayed in graph_rows)
    assert all(replayed for _, replayed in graph_rows)
    stats = llm.engine.stats()
    assert stats.spec_decode_num_accepted_tokens > 0 and stats.spec_decode_mean_accepted_length > 1
    _assert_pool_free(llm)


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e4m3"])
def test_quantized_cache_in_graphs_batched_equals_alone_and_tracks_the_reference(tiny_llama, kv_cache_dtype,
                                                                             graph_rows):
    llm = _llm(tiny_llama, kv_cache_dtype=kv_cache_dtype, enforce_eager=False, speculative_config=None,
               enable_jump_forward=False)
    assert llm.engine.attention_backend == "triton"
    assert llm.engine.runner.kv_caches[0].dtype == {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}[kv_cache_dtype]
    batched = _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    alone = [_tokens(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in PROMPTS[:4]]
    assert alone == batched[:4]
    assert graph_rows and all(replayed for _, replayed in graph_rows)
    # Against torch's attention over the same quantized format (the reference the Triton kernels are
    # tested against): the greedy tokens agree until a near-tie, if any. Two kernels' rounding differences
    # can flip a value across a quantization step, a jump of the format's resolution that a random tiny
    # model amplifies: a near-tie is within 0.1 for int8 and 0.5 (the issue's criterion) for fp8's three
    # mantissa bits. (The CPU suite checks the float-cache criterion on SmolLM2, where it is meaningful.)
    near_tie = {"int8": 0.1, "fp8_e4m3": 0.5}[kv_cache_dtype]
    for got, ref in zip(batched, _reference_greedy(tiny_llama, kv_cache_dtype)):
        diverged = next((i for i, (a, b) in enumerate(zip(got, ref.token_ids)) if a != b), None)
        if diverged is not None:
            (_, best), (_, second) = ref.logprobs[diverged].top[:2]
            assert best - second < near_tie, (kv_cache_dtype, diverged, best - second)
    again = _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))  # prompts now hit the prefix cache
    assert llm.engine.stats().prefix_cache_hit_rate > 0 and again == batched
    _assert_pool_free(llm)


def _reference_greedy(path, kv_cache_dtype):
    llm = _llm(path, kv_cache_dtype=kv_cache_dtype, attention_backend="sdpa", enforce_eager=True,
               speculative_config=None, enable_jump_forward=False)
    params = SamplingParams(temperature=0, max_tokens=GREEDY.max_tokens, ignore_eos=True, logprobs=2)
    return [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_speculation_over_an_int8_cache_equals_plain_int8(tiny_llama):
    """Rejected drafts' slots are rewritten in place: a quantized row carries its own scale, so a later
    accepted token's row must not inherit the rejected one's."""
    plain = _llm(tiny_llama, kv_cache_dtype="int8", enforce_eager=False, speculative_config=None,
                 enable_jump_forward=False)
    spec = _llm(tiny_llama, kv_cache_dtype="int8", enforce_eager=False,
                speculative_config={**NGRAM, "prompt_lookup_min": 1})
    assert _tokens(spec.generate(PROMPTS, GREEDY, use_tqdm=False)) == _tokens(plain.generate(PROMPTS, GREEDY,
                                                                                              use_tqdm=False))
    stats = spec.engine.stats()
    assert 0 < stats.spec_decode_num_accepted_tokens < stats.spec_decode_num_draft_tokens  # some rejected
    _assert_pool_free(spec)


def test_jump_forward_drafts_in_graphs_equal_decoding_without_it(tmp_path, graph_rows):
    path = write_tiny_bpe_llama(tmp_path / "bpe")
    prompts = ['{"City": "Oslo", "zip": 1234} {"City": "Oslo", "zip": 1234} {"City": "Os', "Where:",
               "name: Ann, City: Oslo", "{"]
    params = [SamplingParams(temperature=0, max_tokens=64, structured={"json": s}) for s in SCHEMAS for _ in prompts]
    prompts = prompts * len(SCHEMAS)
    off = _llm(path, speculative_config=None, enable_jump_forward=False, enforce_eager=False)
    before = off.engine.stats().num_steps
    expected = [o.outputs[0] for o in off.generate(prompts, params, use_tqdm=False)]
    off_steps = off.engine.stats().num_steps - before
    on = _llm(path, speculative_config=None, enable_jump_forward=True, enforce_eager=False)
    graph_rows.clear()
    got = [o.outputs[0] for o in on.generate(prompts, params, use_tqdm=False)]
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    assert on.engine.stats().num_steps < off_steps  # forced text went in as drafts
    assert any(rows > len(prompts) and replayed for rows, replayed in graph_rows)
    for out in got:
        if out.finish_reason == "stop":
            json.loads(out.text)
    alone = on.generate(["Where:"], SamplingParams(temperature=0, max_tokens=64, structured={"json": CITY}),
                        use_tqdm=False)[0].outputs[0]
    assert alone.token_ids == expected[1].token_ids  # "Where:" under CITY
    _assert_pool_free(on)


def test_mtp_head_on_cuda_equals_plain(tmp_path):
    """DeepSeek-V3 with a random MTP layer: MoE routing keeps the steps eager; the proposer's forward
    runs on device tensors and greedy output equals plain decoding."""
    _, path = write_tiny_deepseek_mtp(tmp_path / "mtp")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = _llm(path, speculative_config=None, enable_jump_forward=False, block_size=16)
    expected = _tokens(plain.generate(PROMPTS[:6], params, use_tqdm=False))
    llm = _llm(path, speculative_config={"method": "deepseek_mtp", "num_speculative_tokens": 3}, block_size=16)
    assert _tokens(llm.generate(PROMPTS[:6], params, use_tqdm=False)) == expected
    stats = llm.engine.stats()
    assert stats.spec_decode_num_draft_tokens > 0
    assert llm.engine.speculator.proposer.num_forward_passes > 0
    _assert_pool_free(llm)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    # K = 256 and more: wide enough for cuBLAS to pick different kernels by row count.
    return write_tiny_llama(tmp_path_factory.mktemp("wide") / "m", hidden_size=256, intermediate_size=768,
                            num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, initializer_range=0.05)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0),
    SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True, logprobs=0),
], ids=["greedy", "seeded"])
def test_deterministic_bf16_outputs_do_not_depend_on_the_batch(wide_llama, params):
    """Bit for bit: token ids and logprobs alone, beside other prompts, and chunked."""
    def run(llm, prompts):
        return [(o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs])
                for o in llm.generate(prompts, params, use_tqdm=False)]

    llm = _llm(wide_llama, dtype="bfloat16", deterministic=True, enable_prefix_caching=False,
               speculative_config=None, enable_jump_forward=False)
    others = ["zzz " * 20, "q", "lorem ipsum dolor sit amet " * 4]
    alone = [run(llm, [p])[0] for p in PROMPTS[:4]]
    assert run(llm, others[:2] + PROMPTS[:4] + others[2:])[2:6] == alone
    chunked = _llm(wide_llama, dtype="bfloat16", deterministic=True, enable_prefix_caching=False,
                   max_num_batched_tokens=16, speculative_config=None, enable_jump_forward=False)
    assert run(chunked, PROMPTS[:4]) == alone
