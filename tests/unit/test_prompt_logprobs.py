"""Prompt logprobs (SamplingParams.prompt_logprobs) and max_tokens 0 on a tiny random Llama (fp32),
against transformers' log-softmax of the same weights (the oracle), and the engine's invariants:
chunked prefill, batching, preemption and prefix-cache hits never change them; every KV block
comes back."""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_engine import PROMPTS, assert_pool_free, make_llm
from tests.unit.test_engine import tiny_dir as tiny_dir  # noqa: F401 - the module's fixture
from zili import SamplingParams
from zili.engine import prompt_outputs
from zili.sampling import SamplingParamsError

TOP = 4
ATOL = 1e-4  # fp32 on both sides: zili's paged attention against transformers' eager attention


@pytest.fixture(scope="module")
def hf_model(tiny_dir):  # noqa: F811
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def hf_prompt_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row p is log_softmax of the logits after ids[:p + 1]."""
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)


def assert_matches_hf(hf_model, out, top: int = TOP) -> None:
    ids = out.prompt_token_ids
    ref = hf_prompt_logprobs(hf_model, ids)
    assert len(out.prompt_logprobs) == len(ids)
    assert out.prompt_logprobs[0] is None
    for p, lp in enumerate(out.prompt_logprobs[1:], start=1):
        assert lp.token_id == ids[p]
        assert lp.logprob == pytest.approx(ref[p - 1, ids[p]].item(), abs=ATOL)
        vals, alts = ref[p - 1].topk(top)
        assert [v for _, v in lp.top] == pytest.approx(vals.tolist(), abs=ATOL)
        # ids agree wherever the reference's neighbours are not within the tolerance of each other
        gaps = (vals[:-1] - vals[1:]).tolist() + [1.0]
        assert [t for (t, _), a, g in zip(lp.top, alts.tolist(), gaps) if g > ATOL] == \
               [a for a, g in zip(alts.tolist(), gaps) if g > ATOL]


def scoring(top: int = TOP, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=kw.pop("max_tokens", 0), prompt_logprobs=top, **kw)


def flat(out) -> list[tuple[int, float, list]]:
    return [(lp.token_id, lp.logprob, lp.top) for lp in out.prompt_logprobs[1:]]


# Equal up to fp32 summation order: a 7-row chunk and a 180-row prefill take different matmul kernels, whose
# sums differ in the last bits (up to 2e-5 on the logprobs on a Zen 4, whatever their size; 1e-5 held on the
# Xeons). Half the tolerance against transformers (ATOL); a wrong mask or position is off by far more.
SAME = {"abs": ATOL / 2}


def assert_same(a, b) -> None:
    assert [t for t, _, _ in flat(a)] == [t for t, _, _ in flat(b)]
    assert [v for _, v, _ in flat(a)] == pytest.approx([v for _, v, _ in flat(b)], **SAME)
    for (_, _, ta), (_, _, tb) in zip(flat(a), flat(b)):
        assert [v for _, v in ta] == pytest.approx([v for _, v in tb], **SAME)


def test_prompt_logprobs_equal_transformers(tiny_dir, hf_model):  # noqa: F811
    llm = make_llm(tiny_dir)
    outs = llm.generate(PROMPTS[:6], scoring())
    for out in outs:
        assert_matches_hf(hf_model, out)
        assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    assert_pool_free(llm)


def test_prompt_logprobs_with_generation_and_logprobs(tiny_dir, hf_model):  # noqa: F811
    llm = make_llm(tiny_dir)
    out = llm.generate(PROMPTS[1], scoring(max_tokens=5, ignore_eos=True, logprobs=2))[0]
    assert_matches_hf(hf_model, out)
    gen = out.outputs[0]
    assert len(gen.token_ids) == 5 and len(gen.logprobs) == 5
    # the first generated token's logprob continues the prompt's: the row after the last prompt token
    ref = hf_prompt_logprobs(hf_model, out.prompt_token_ids + gen.token_ids)
    n = len(out.prompt_token_ids)
    assert [lp.logprob for lp in gen.logprobs] == pytest.approx(
        [ref[n - 1 + i, t].item() for i, t in enumerate(gen.token_ids)], abs=ATOL)


def test_zero_top_and_one_token_prompt(tiny_dir, hf_model):  # noqa: F811
    llm = make_llm(tiny_dir)
    out, single = llm.generate(["Hello there", "a"], scoring(top=0))
    assert_matches_hf(hf_model, out, top=0)
    assert all(lp.top == [] for lp in out.prompt_logprobs[1:])
    assert single.prompt_logprobs == [None]  # one token: nothing before it to predict it
    assert_pool_free(llm)


def test_chunked_prefill_and_bounded_logits_give_the_same_scores(tiny_dir, hf_model, monkeypatch):  # noqa: F811
    prompt = "The quick brown fox jumps over the lazy dog. " * 4  # 180 byte tokens
    whole = make_llm(tiny_dir, max_num_batched_tokens=512).generate(prompt, scoring())[0]
    # chunks of 7 tokens (prompt positions split across 26 steps), and at most 3 rows of logits at a time
    chunked_llm = make_llm(tiny_dir, max_num_batched_tokens=7)
    monkeypatch.setattr(prompt_outputs, "MAX_SCORE_LOGITS", 3 * chunked_llm.engine.model_config.vocab_size)
    chunked = chunked_llm.generate(prompt, scoring())[0]
    assert_same(whole, chunked)
    assert_matches_hf(hf_model, chunked)
    assert_pool_free(chunked_llm)


def test_batched_scoring_equals_alone(tiny_dir):  # noqa: F811
    llm = make_llm(tiny_dir, enable_prefix_caching=False)
    alone = [llm.generate(p, scoring())[0] for p in PROMPTS[:8]]
    # the same prompts scored in one batch, among requests that only generate
    mixed_params = [scoring() if i % 2 == 0 else SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
                    for i in range(16)]
    mixed_prompts = [PROMPTS[i // 2] for i in range(16)]
    batched = llm.generate(mixed_prompts, mixed_params)
    for i, a in enumerate(alone):
        assert_same(a, batched[2 * i])
        assert batched[2 * i + 1].prompt_logprobs is None
    assert_pool_free(llm)


def test_prefix_cache_hit_equals_miss(tiny_dir):  # noqa: F811
    system = "You are a helpful assistant. Answer briefly and truthfully. "
    prompts = [system + p for p in PROMPTS[:6]]
    miss = make_llm(tiny_dir, enable_prefix_caching=False).generate(prompts, scoring())
    llm = make_llm(tiny_dir)
    warm = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2))  # fills the prefix cache
    again = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2))
    assert all(o.num_cached_tokens > 0 for o in again), "the cache holds these prompts"
    hit = llm.generate(prompts, scoring())
    for a, b in zip(miss, hit):
        assert_same(a, b)
        assert b.num_cached_tokens == 0  # every scored position was computed, none taken from the cache
    # and a scoring request that also generates continues exactly as a cache hit would
    gen = llm.generate(prompts, scoring(max_tokens=2))
    assert [o.outputs[0].token_ids for o in gen] == [o.outputs[0].token_ids for o in warm]
    assert_pool_free(llm)


def test_preemption_keeps_scores(tiny_dir):  # noqa: F811
    reference = make_llm(tiny_dir).generate(PROMPTS, scoring(max_tokens=12, ignore_eos=True))
    llm = make_llm(tiny_dir, num_blocks=40, max_num_batched_tokens=64)
    outs = llm.generate(PROMPTS, scoring(max_tokens=12, ignore_eos=True))
    assert llm.engine.stats().num_preemptions > 0
    for a, b in zip(reference, outs):
        assert_same(a, b)
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert_pool_free(llm)


def test_abort_mid_scoring_frees_every_block(tiny_dir):  # noqa: F811
    llm = make_llm(tiny_dir, max_num_batched_tokens=8)
    engine = llm.engine
    engine.add_request("s", "The quick brown fox jumps over the lazy dog. " * 3, scoring())
    engine.step()
    assert engine.kv_cache.num_free_blocks < engine.kv_cache.num_blocks
    engine.abort_request("s")
    (out,) = engine.step()
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert out.prompt_logprobs is None  # partial scores are not reported
    assert_pool_free(llm)


def test_prompt_may_fill_the_context_when_nothing_is_generated(tiny_dir):  # noqa: F811
    llm = make_llm(tiny_dir, max_model_len=32)
    full = list(range(40, 72))  # 32 token ids: the whole context
    out = llm.generate([full], scoring())[0]
    assert len(out.prompt_logprobs) == 32
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate([full], SamplingParams(max_tokens=1))


@pytest.mark.parametrize("kwargs, field", [
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": True}, "prompt_logprobs"),
    ({"prompt_logprobs": "3"}, "prompt_logprobs"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0, "n": 2}, "n"),
])
def test_bad_values_name_their_field(kwargs, field):
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field
