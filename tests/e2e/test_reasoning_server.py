"""Reasoning models through the OpenAI server: reasoning_content beside content, streaming that agrees
with the whole response, reasoning-token usage and metrics, chat_template_kwargs, the thinking budget
(max_reasoning_tokens / reasoning_effort) and JSON constrained after the thinking.

The model is a random-weight 2-layer Qwen2 with DeepSeek-R1-Distill-Qwen-7B's real tokenizer and chat
template (tests/reasoning_model.py). Random weights never close the thinking by themselves, so the
split is driven by the engine's thinking budget, which writes the closing tag; the server runs in
this process (FastAPI's TestClient runs the app's lifespan, i.e. the engine thread).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.reasoning_model import r1_tokenizer, write_r1_dummy
from zili.config import EngineConfig
from zili.engine.async_engine import AsyncEngine
from zili.engine.builder import build_engine
from zili.reasoning import split_reasoning
from zili.server.app import ServerSettings, build_app

MODEL = "r1-dummy"
ASK = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    path = write_r1_dummy(tmp_path_factory.mktemp("r1") / "model")
    config = EngineConfig(model=str(path), load_format="dummy", dtype="float32", kv_cache_memory=64 << 20,
                          enforce_eager=True, attention_backend="sdpa", use_tune_cache=False, max_num_seqs=8)
    settings = ServerSettings(served_model_name=MODEL, reasoning_budgets={"low": 6, "medium": 12, "high": 24})
    app = build_app(settings, AsyncEngine(lambda: build_engine(config)))
    with TestClient(app) as client:
        deadline = time.monotonic() + 900  # a first start may build the C++ CPU kernels
        while (health := client.get("/health")).status_code != 200:
            assert health.json()["status"] == "loading" and time.monotonic() < deadline, health.text
            time.sleep(0.2)
        yield client


def chat(http: TestClient, **body) -> dict:
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def stream(http: TestClient, **body) -> tuple[str, str, str | None, dict | None, list[dict]]:
    """(reasoning, content, finish reason, usage, deltas) of a streamed chat completion."""
    reasoning = content = ""
    reason, usage, deltas = None, None, []
    with http.stream("POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": ASK, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **body}) as r:
        assert r.status_code == 200, r.read()
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in map(json.loads, events[:-1]):
        usage = event.get("usage") or usage
        for choice in event["choices"]:
            delta = choice["delta"]
            deltas.append(delta)
            reasoning += delta.get("reasoning_content") or ""
            content += delta.get("content") or ""
            reason = choice["finish_reason"] or reason
    return reasoning, content, reason, usage, deltas


def metric(http: TestClient, name: str) -> float:
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise KeyError(name)


def test_thinking_cut_by_max_tokens_is_all_reasoning(http):
    body = chat(http, max_tokens=10)
    choice, usage = body["choices"][0], body["usage"]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] is None and choice["message"]["reasoning_content"]
    assert usage["completion_tokens"] == 10
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 10


def test_budget_ends_the_thinking_at_the_budget(http):
    free = chat(http, max_tokens=16)["choices"][0]["message"]["reasoning_content"]
    body = chat(http, max_tokens=16, max_reasoning_tokens=6)
    message, usage = body["choices"][0]["message"], body["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 6  # 4 sampled + "\n" + "</think>"
    assert usage["completion_tokens"] == 16  # and the model went on answering within max_tokens
    thought = message["reasoning_content"]
    assert thought.endswith("\n") and free.startswith(thought[:-1])  # greedy: the same first tokens
    assert message["content"].startswith("\n\n") and len(message["content"]) > 2
    tok = r1_tokenizer()
    assert len(tok.encode(thought[:-1], add_special_tokens=False)) == 4
    again = chat(http, max_tokens=16, max_reasoning_tokens=6)
    assert again["choices"][0]["message"] == message  # deterministic under greedy decoding


def test_reasoning_effort_maps_to_the_server_budgets(http):
    low = chat(http, max_tokens=12, reasoning_effort="low")  # the fixture's server sets low = 6 tokens
    assert low["usage"]["completion_tokens_details"]["reasoning_tokens"] == 6
    assert low["choices"][0]["message"] == chat(http, max_tokens=12, max_reasoning_tokens=6)["choices"][0]["message"]
    medium = chat(http, max_tokens=20, reasoning_effort="medium")
    assert medium["usage"]["completion_tokens_details"]["reasoning_tokens"] == 12


@pytest.mark.parametrize("budget", [None, 3, 7])
def test_stream_agrees_with_the_whole_response(http, budget):
    extra = {} if budget is None else {"max_reasoning_tokens": budget}
    body = chat(http, max_tokens=14, **extra)
    reasoning, content, reason, usage, deltas = stream(http, max_tokens=14, **extra)
    message = body["choices"][0]["message"]
    assert (reasoning or None, content or None) == (message["reasoning_content"], message["content"])
    assert reason == body["choices"][0]["finish_reason"]
    assert usage == body["usage"]
    kinds = [k for d in deltas for k in ("reasoning_content", "content") if d.get(k)]
    assert kinds == sorted(kinds, key=("reasoning_content", "content").index)  # thinking first, then the answer
    # the raw output, split here, gives the same parts (completions endpoint: untouched text)
    prompt = http.post("/tokenize", json={"model": MODEL, "messages": ASK}).json()["tokens"]
    raw = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 14, "temperature": 0,
                                             **extra}).json()
    assert "reasoning_content" not in raw["choices"][0] and raw["usage"].get("completion_tokens_details") is None
    if budget is None:
        assert split_reasoning(raw["choices"][0]["text"], "deepseek-r1") == (message["reasoning_content"], None)


ANSWER_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "unit"], "properties": {
    "answer": {"type": "integer", "minimum": 0, "maximum": 99}, "unit": {"enum": ["apples", "pears"]}}}


def test_json_schema_applies_after_the_thinking(http):
    body = chat(http, max_tokens=48, max_reasoning_tokens=8, temperature=1.0, seed=3, n=4,
                response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER_SCHEMA}})
    assert [c["finish_reason"] for c in body["choices"]] == ["stop"] * 4
    for choice in body["choices"]:
        message = choice["message"]
        assert message["reasoning_content"] and "{" not in message["reasoning_content"][:1]
        jsonschema.validate(json.loads(message["content"]), ANSWER_SCHEMA)
    reasoning, content, reason, _, _ = stream(
        http, max_tokens=48, max_reasoning_tokens=8,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER_SCHEMA}})
    assert reason == "stop" and reasoning
    jsonschema.validate(json.loads(content), ANSWER_SCHEMA)


def test_tool_call_after_the_thinking(http):
    tool = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["a", "b"],
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                       "b": {"type": "integer", "minimum": 0, "maximum": 9}}}}}
    body = chat(http, max_tokens=64, max_reasoning_tokens=5, tools=[tool], tool_choice="required",
                parallel_tool_calls=False)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["reasoning_content"]
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "add" and set(json.loads(call["function"]["arguments"])) == {"a", "b"}


def test_openai_client_reads_reasoning_content(http):
    client = openai.OpenAI(base_url=f"{str(http.base_url).rstrip('/')}/v1", api_key="unused", http_client=http,
                           max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=10, temperature=0,
                                           extra_body={"max_reasoning_tokens": 4})
    message = reply.choices[0].message
    assert message.model_extra["reasoning_content"] and message.content.startswith("\n\n")
    assert reply.usage.completion_tokens_details.reasoning_tokens == 4
    thought = ""
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=10, temperature=0, stream=True,
                                                extra_body={"max_reasoning_tokens": 4}):
        if chunk.choices:
            thought += (chunk.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
    assert thought == message.model_extra["reasoning_content"]


def test_metrics_count_reasoning_apart_from_answer_tokens(http):
    before = metric(http, "zili_reasoning_tokens_total"), metric(http, "zili_answer_tokens_total")
    chat(http, max_tokens=11, max_reasoning_tokens=7)
    after = metric(http, "zili_reasoning_tokens_total"), metric(http, "zili_answer_tokens_total")
    assert (after[0] - before[0], after[1] - before[1]) == (7, 4)


def test_bad_reasoning_requests_get_a_400(http):
    for body, param in [({"max_reasoning_tokens": 0}, "max_reasoning_tokens"),
                        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs")]:
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "reasoning_effort": "extreme"})
    assert r.status_code == 400
    settings = http.app.state.zili.settings
    settings.reasoning_parser = "none"
    try:
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "reasoning_effort": "low"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_effort", r.text
        plain = chat(http, max_tokens=5)  # no parser: the whole text is the answer
        assert plain["choices"][0]["message"]["reasoning_content"] is None
        assert plain["usage"].get("completion_tokens_details") is None
    finally:
        settings.reasoning_parser = "auto"
