"""Engine invariants on a tiny random Llama (fp32): batching, prefix caching, preemption and
chunking never change greedy output; aborts return every block; sampling and stops behave."""

from __future__ import annotations

import random

import pytest

from tests.tiny_models import write_tiny_llama
from zili import LLM, SamplingParams
from zili.engine.request import OutputAccumulator
from zili.engine.runner import kv_bytes_per_block


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def make_llm(tiny_dir, num_blocks=256, block_size=4, **kw) -> LLM:
    import json

    import torch

    from zili.models.hf_config import model_config_from_hf

    cfg = model_config_from_hf(json.loads((tiny_dir / "config.json").read_text()))
    kw.setdefault("max_num_seqs", 32)
    return LLM(str(tiny_dir), dtype="float32", block_size=block_size,
               kv_cache_memory=num_blocks * kv_bytes_per_block(cfg, block_size, torch.float32), **kw)


PROMPTS = [
    "Hello there", "The capital of France is", "def fib(n):", "1, 2, 3, 4,", "你好，世界", "Once upon a time",
    "SELECT * FROM", "The quick brown fox jumps over the lazy dog", "🙂 emoji", "a", "zili means standing",
    "import torch\nimport numpy as np\n", "Q: What is 2+2?\nA:", "<html><body>", "Lorem ipsum dolor sit amet",
    "The mitochondria is the powerhouse of the",
]


def greedy_tokens(llm: LLM, prompts, max_tokens=12, **kw) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def assert_pool_free(llm: LLM) -> None:
    kv = llm.engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks
    assert kv.tables == {}
    assert all(b.ref_count == 0 for b in kv.blocks)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Each prompt run alone, prefix caching off."""
    llm = make_llm(tiny_dir, enable_prefix_caching=False)
    return [greedy_tokens(llm, [p])[0] for p in PROMPTS]


def test_batched_equals_alone(tiny_dir, reference):
    llm = make_llm(tiny_dir, enable_prefix_caching=False)
    assert greedy_tokens(llm, PROMPTS) == reference
    assert_pool_free(llm)


def test_prefix_cache_hits_give_identical_tokens(tiny_dir):
    system = "You are a helpful assistant. Answer briefly and truthfully. "
    prompts = [system + p for p in PROMPTS]
    cold = make_llm(tiny_dir, enable_prefix_caching=False)
    expected = greedy_tokens(cold, prompts)
    llm = make_llm(tiny_dir)
    assert greedy_tokens(llm, prompts) == expected
    assert greedy_tokens(llm, prompts) == expected  # second run: every shared prefix is cached
    assert llm.engine.stats().prefix_cache_hit_rate > 0.4
    assert_pool_free(llm)


def test_preemption_gives_identical_tokens(tiny_dir, reference):
    # 40 blocks of 4 tokens cannot hold 16 sequences of ~20-50 tokens at once.
    llm = make_llm(tiny_dir, num_blocks=40, max_num_batched_tokens=64)
    assert greedy_tokens(llm, PROMPTS) == reference
    assert llm.engine.stats().num_preemptions > 0
    assert_pool_free(llm)


def test_chunked_prefill_matches_unchunked(tiny_dir):
    prompt = "The quick brown fox jumps over the lazy dog. " * 4  # 180 byte tokens
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
    whole = make_llm(tiny_dir, max_num_batched_tokens=512).generate(prompt, params)[0].outputs[0]
    chunked_llm = make_llm(tiny_dir, max_num_batched_tokens=16)
    chunked = chunked_llm.generate(prompt, params)[0].outputs[0]
    assert chunked.token_ids == whole.token_ids
    for a, b in zip(whole.logprobs, chunked.logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-5)


def test_abort_mid_generation_frees_everything(tiny_dir):
    llm = make_llm(tiny_dir)
    engine = llm.engine
    for i, p in enumerate(PROMPTS[:6]):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=50, ignore_eos=True, n=2 if i % 2 else 1))
    for _ in range(5):
        engine.step()
    assert engine.kv_cache.num_free_blocks < engine.kv_cache.num_blocks
    for i in range(6):
        engine.abort_request(f"r{i}")
    engine.abort_request("r0")  # twice: harmless
    outs = engine.step()
    assert {o.request_id for o in outs} == {f"r{i}" for i in range(6)}
    assert all(o.finished and all(c.finish_reason == "abort" for c in o.outputs) for o in outs)
    assert not engine.has_unfinished_requests()
    assert_pool_free(llm)


def test_stream_closed_early_aborts(tiny_dir):
    llm = make_llm(tiny_dir)
    stream = llm.stream("Hello", SamplingParams(max_tokens=100, ignore_eos=True))
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert_pool_free(llm)
    assert not llm.engine.has_unfinished_requests()


def test_seeded_sampling_is_reproducible_across_batches(tiny_dir):
    llm = make_llm(tiny_dir)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate("Once upon a time", params)[0].outputs[0].token_ids
    noise = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    batch = llm.generate(PROMPTS[:5] + ["Once upon a time"] + PROMPTS[5:9], [noise] * 5 + [params] + [noise] * 4)
    assert batch[5].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=99, ignore_eos=True)
    assert llm.generate("Once upon a time", other_seed)[0].outputs[0].token_ids != alone


def test_n_greater_than_one_shares_prompt_blocks(tiny_dir):
    llm = make_llm(tiny_dir)
    prompt = "A prompt long enough to fill several four-token blocks"
    greedy = SamplingParams(temperature=0, max_tokens=10, n=3, ignore_eos=True)
    engine = llm.engine
    engine.add_request("fan", prompt, greedy)
    acc = OutputAccumulator("fan", 3)  # step() returns deltas; fold them into the whole output
    while engine.scheduler.waiting:
        for delta in engine.step():
            acc.add(delta)
    tables = [engine.kv_cache.block_ids(f"fan#{i}") for i in range(3)]
    full_prompt_blocks = (len(engine.requests["fan"].prompt_token_ids) - 1) // 4
    assert tables[0][:full_prompt_blocks] == tables[1][:full_prompt_blocks] == tables[2][:full_prompt_blocks]
    while engine.has_unfinished_requests():
        for delta in engine.step():
            acc.add(delta)
    out = acc.result()
    single = greedy_tokens(make_llm(tiny_dir, enable_prefix_caching=False), [prompt], max_tokens=10)[0]
    assert [c.token_ids for c in out.outputs] == [single] * 3
    assert [c.index for c in out.outputs] == [0, 1, 2]
    sampled = llm.generate(prompt, SamplingParams(temperature=1.0, n=4, max_tokens=12, seed=5, ignore_eos=True))
    assert len({tuple(c.token_ids) for c in sampled[0].outputs}) > 1
    assert_pool_free(llm)


def test_stop_strings_across_token_boundaries(tiny_dir):
    llm = make_llm(tiny_dir)
    prompt = "The capital of France is"
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    text = free.text
    assert len(text) >= 8
    stop = text[4:7]  # three byte tokens: the stop string spans token boundaries
    first = text.find(stop)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop, "\u2603never"])
    cut = llm.generate(prompt, params)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[:first]
    keep = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                                               include_stop_str_in_output=True))[0].outputs[0]
    assert keep.text == text[:first + len(stop)]
    # Streaming never shows part of the stop string and only ever appends.
    seen = ""
    for out in llm.stream(prompt, params):
        now = out.outputs[0].text
        assert now.startswith(seen)
        seen = now
    assert seen == text[:first]


def test_max_tokens_min_tokens_and_stop_token(tiny_dir):
    llm = make_llm(tiny_dir)
    eos = llm.tokenizer.eos_token_id
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 7
    # Make EOS overwhelmingly likely: it ends generation, unless min_tokens holds it off.
    bias = {eos: 100.0}
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=7, logit_bias=bias))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == [eos] and out.stop_reason is None
    held = SamplingParams(temperature=0, max_tokens=7, logit_bias=bias, min_tokens=3)
    out = llm.generate("Hello", held)[0].outputs[0]
    assert len(out.token_ids) == 4 and out.token_ids[-1] == eos and eos not in out.token_ids[:3]
    tok = out.token_ids[0]
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=7, stop_token_ids=[tok]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == tok


def test_requests_that_can_never_fit_are_rejected(tiny_dir):
    llm = make_llm(tiny_dir, num_blocks=8, max_model_len=64)
    with pytest.raises(ValueError, match="maximum context length of 64"):
        llm.generate("x" * 40, SamplingParams(max_tokens=30))
    with pytest.raises(ValueError, match="the prompt has 70 tokens"):
        llm.generate("x" * 70, SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="KV blocks"):
        llm.generate("x" * 30, SamplingParams(max_tokens=20))  # 50 tokens > 8 blocks of 4
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[1, 2, 10**6]], SamplingParams())
    assert_pool_free(llm)
    assert llm.generate("ok", SamplingParams(max_tokens=2))[0].outputs[0].finish_reason is not None


def test_bad_engine_options_are_rejected(tiny_dir):
    with pytest.raises(ValueError, match="dtype"):
        LLM(str(tiny_dir), dtype="float8")
    with pytest.raises(ValueError, match="block_size"):
        LLM(str(tiny_dir), block_size=0)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(tiny_dir), max_model_len=10**6)
    with pytest.raises(ValueError, match="kv_cache_memory"):
        LLM(str(tiny_dir), kv_cache_memory=1.5)


def test_random_workload_keeps_invariants(tiny_dir):
    """Random arrivals, aborts and sampling settings: nothing leaks, nothing hangs."""
    rng = random.Random(0)
    llm = make_llm(tiny_dir, num_blocks=48, max_num_batched_tokens=32, max_num_seqs=6)
    engine = llm.engine
    live: set[str] = set()
    for step in range(150):
        if rng.random() < 0.3:
            rid = f"q{step}"
            prompt = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 40)))
            engine.add_request(rid, prompt, SamplingParams(temperature=rng.choice([0, 0.8]), n=rng.choice([1, 2]),
                                                           max_tokens=rng.randint(1, 30)))
            live.add(rid)
        if live and rng.random() < 0.1:
            engine.abort_request(rng.choice(sorted(live)))
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
        kv = engine.kv_cache
        assert kv.num_free_blocks + sum(1 for b in kv.blocks if b.ref_count > 0) == kv.num_blocks
    for rid in list(live):
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    assert_pool_free(llm)


def test_two_engines_with_different_attention_backends_in_one_process(tiny_dir):
    """Each runner owns its attention backend: two engines (sdpa, cpp) stepped in turn both stay
    correct, and each step runs only its own engine's backend (nothing process-global)."""
    import dataclasses

    from zili.distributed.executor import TensorParallelExecutor
    from zili.engine.executor import Executor
    from zili.kernels import cpu_attention

    assert issubclass(TensorParallelExecutor, Executor)  # the protocol both executors implement

    if not cpu_attention.available():
        pytest.skip("the cpp attention kernel does not build on this machine")
    prompts = PROMPTS[:6]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = make_llm(tiny_dir, enable_prefix_caching=False, attention_backend="sdpa")
    want = [alone.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    engines, calls = {}, {"sdpa": 0, "cpp": 0}
    for name in ("sdpa", "cpp"):
        engine = make_llm(tiny_dir, attention_backend=name, enforce_eager=True).engine
        assert isinstance(engine.runner, Executor)
        backend = engine.runner.attention
        assert backend.name == name

        def counted(*args, _fn=backend.paged_attention, _name=name):
            calls[_name] += 1
            return _fn(*args)
        engine.runner.attention = dataclasses.replace(backend, paged_attention=counted)
        engines[name] = engine
    accumulated = {name: {} for name in engines}
    for name, engine in engines.items():
        for i, p in enumerate(prompts):
            rid = engine.add_request(f"{name}-{i}", p, params)
            accumulated[name][rid] = OutputAccumulator(rid, 1)
    while any(e.has_unfinished_requests() for e in engines.values()):
        for name, engine in engines.items():  # interleaved: sdpa step, cpp step, sdpa step...
            before = dict(calls)
            for delta in engine.step():
                accumulated[name][delta.request_id].add(delta)
            other = "cpp" if name == "sdpa" else "sdpa"
            assert calls[other] == before[other]  # this engine's step never ran the other's backend
    for name, engine in engines.items():
        got = [accumulated[name][f"{name}-{i}"].result().outputs[0].token_ids for i in range(len(prompts))]
        assert got == want, name
        assert calls[name] > 0
        kv = engine.kv_cache
        assert kv.num_free_blocks == kv.num_blocks
