"""zili.engine.thinking on a random-weight model with DeepSeek-R1-Distill-Qwen's tokenizer and template:
the thinking budget ends the thinking at the budget with the model's own closing tokens (which go
through the KV cache like sampled ones), deterministic and batch-invariant under greedy decoding; a
grammar applies from the end of the thinking; LLM.chat returns the thinking apart from the answer."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.reasoning_model import write_r1_dummy
from zili import LLM, SamplingParams
from zili.reasoning import THINK_END_TEXT, split_reasoning

ASK = [{"role": "user", "content": "What is 2 + 2?"}]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer"],
          "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}}}
OPTIONS = dict(load_format="dummy", dtype="float32", kv_cache_memory=32 << 20, enforce_eager=True,
               attention_backend="sdpa", use_tune_cache=False, max_num_seqs=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_r1_dummy(tmp_path_factory.mktemp("r1") / "model")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), **OPTIONS)


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def _run(llm, params, prompt=None):
    prompt = prompt if prompt is not None else llm.render_chat(ASK)
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]


@pytest.mark.parametrize("budget", [2, 5, 9])
def test_budget_ends_the_thinking_with_the_models_closing_tokens(llm, budget):
    end_ids = llm.tokenizer.encode(THINK_END_TEXT, add_special_tokens=False)
    free = _run(llm, _greedy(16)).token_ids
    out = _run(llm, _greedy(16, max_reasoning_tokens=budget))
    sampled = budget - 2  # the closing tokens that count as thinking: "\n" and "</think>"
    assert out.token_ids[:sampled] == free[:sampled]
    assert out.token_ids[sampled:sampled + len(end_ids)] == end_ids
    assert len(out.token_ids) == 16 and out.finish_reason == "length"  # it answers, within max_tokens
    reasoning, answer = split_reasoning(out.text, "deepseek-r1")
    assert answer.startswith("\n\n") and len(answer) > 2
    assert _run(llm, _greedy(16, max_reasoning_tokens=budget)).token_ids == out.token_ids


def test_forced_tokens_go_through_the_kv_cache(llm):
    """The answer after a forced end equals the model's greedy continuation of prompt + thinking +
    closing tokens given as a prompt: the forced tokens were computed like sampled ones."""
    prompt = llm.render_chat(ASK)
    out = _run(llm, _greedy(14, max_reasoning_tokens=6))
    cut = 7  # 4 sampled + 3 closing tokens
    again = _run(llm, _greedy(14 - cut), prompt=prompt + out.token_ids[:cut])
    assert again.token_ids == out.token_ids[cut:]


def test_budgets_in_one_batch_equal_each_alone(llm):
    prompt = llm.render_chat(ASK)
    params = [_greedy(12, max_reasoning_tokens=3), _greedy(12), _greedy(12, max_reasoning_tokens=8)]
    batched = [o.outputs[0].token_ids for o in llm.generate([prompt] * 3, params, use_tqdm=False)]
    alone = [_run(llm, p).token_ids for p in params]
    assert batched == alone


def test_forced_tokens_report_logprob_zero(llm):
    out = _run(llm, _greedy(8, max_reasoning_tokens=4, logprobs=2))
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    assert [lp.logprob for lp in out.logprobs[2:5]] == [0.0, 0.0, 0.0]
    assert all(lp.logprob < 0 for lp in out.logprobs[:2])


def test_json_schema_starts_after_the_thinking(llm):
    params = SamplingParams(temperature=1.0, seed=5, n=6, max_tokens=40, max_reasoning_tokens=7,
                            structured={"json": SCHEMA})
    outs = llm.generate([llm.render_chat(ASK)], params, use_tqdm=False)[0].outputs
    for out in outs:
        assert out.finish_reason == "stop"
        reasoning, answer = split_reasoning(out.text, "deepseek-r1")
        # Counted in the generated ids, not by re-encoding the text: a sampled special token (a [PAD...]
        # of this random model) decodes to text that encodes back into several tokens.
        close = llm.tokenizer.encode("</think>", add_special_tokens=False)
        ends = [i + len(close) for i in range(len(out.token_ids)) if out.token_ids[i:i + len(close)] == close]
        assert reasoning and ends and ends[0] <= 8
        jsonschema.validate(json.loads(answer), SCHEMA)


def test_a_model_that_would_stop_while_its_grammar_waits_closes_the_thinking(llm):
    eos = llm.tokenizer.eos_token_id
    out = _run(llm, SamplingParams(temperature=0, max_tokens=40, logit_bias={eos: 100}, structured={"json": SCHEMA}))
    assert out.finish_reason == "stop"
    assert out.text.startswith(THINK_END_TEXT)  # EOS at the first step became the closing tokens
    jsonschema.validate(json.loads(out.text[len(THINK_END_TEXT):]), SCHEMA)


def test_llm_chat_returns_thinking_and_answer_apart(llm):
    out = llm.chat(ASK, _greedy(12, max_reasoning_tokens=5), use_tqdm=False)[0].outputs[0]
    raw = _run(llm, _greedy(12, max_reasoning_tokens=5))
    assert out.token_ids == raw.token_ids
    assert out.reasoning_text + "</think>" + out.text == raw.text
    cut = llm.chat(ASK, _greedy(4), use_tqdm=False)[0].outputs[0]  # max_tokens while thinking
    assert cut.text == "" and cut.reasoning_text == _run(llm, _greedy(4)).text


@pytest.fixture(scope="module")
def qwen3_llm(model_dir):
    return LLM(str(model_dir), reasoning_parser="qwen3", **OPTIONS)


def test_qwen3_style_may_open_the_thinking_or_answer_under_the_grammar(qwen3_llm):
    llm = qwen3_llm
    think = llm.tokenizer.encode("<think>", add_special_tokens=False)[0]
    base = dict(temperature=0, max_tokens=40, structured={"json": SCHEMA}, max_reasoning_tokens=6)
    thinks = _run(llm, SamplingParams(logit_bias={think: 100}, **base))
    assert thinks.token_ids[0] == think and thinks.finish_reason == "stop"
    reasoning, answer = split_reasoning(thinks.text, "qwen3")
    assert reasoning is not None
    jsonschema.validate(json.loads(answer), SCHEMA)
    skips = _run(llm, SamplingParams(logit_bias={think: -100}, **base))
    assert skips.finish_reason == "stop" and split_reasoning(skips.text, "qwen3")[0] is None
    jsonschema.validate(json.loads(skips.text), SCHEMA)  # the grammar held from the first token
