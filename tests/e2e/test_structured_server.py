"""Structured output and tool calling over HTTP: response_format, the structured_outputs extension,
tools / tool_choice / parallel_tool_calls, streaming == non-streaming, role "tool" round trips,
and 400s (naming the problem) for specs that cannot be used."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema  # noqa: E402
import openai
import pytest
import xgrammar  # noqa: E402,F401

from tests.e2e.server_process import MODEL

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "hobbies": {"type": "array", "items": {"enum": ["chess", "golf", "music"]}, "minItems": 1, "maxItems": 2}},
    "required": ["name", "age", "hobbies"]}
ASK_PERSON = [{"role": "user", "content": "Describe a fictional person as JSON."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -999, "maximum": 999},
                                                    "b": {"type": "integer", "minimum": -999, "maximum": 999}},
                   "required": ["a", "b"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def sse(response: httpx.Response) -> list[dict]:
    events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def stream_chat(http: httpx.Client, body: dict) -> tuple[str, list[dict], str | None]:
    """Streamed content, tool calls assembled from delta.tool_calls, and the finish reason."""
    content, calls, reason = "", {}, None
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for event in sse(r):
            for choice in event["choices"]:
                delta = choice["delta"]
                content += delta.get("content") or ""
                for d in delta.get("tool_calls") or []:
                    call = calls.setdefault(d["index"], {"name": "", "arguments": ""})
                    call["name"] += d.get("function", {}).get("name") or ""
                    call["arguments"] += d.get("function", {}).get("arguments") or ""
                reason = choice["finish_reason"] or reason
    return content, [calls[i] for i in sorted(calls)], reason


def test_json_schema_response_format(client: openai.OpenAI):
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK_PERSON, temperature=1.0, seed=1, n=2, max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    finished = [c for c in reply.choices if c.finish_reason == "stop"]
    assert finished
    for choice in finished:
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_a_schema_xgrammar_refuses_compiles_with_llguidance_under_auto(client: openai.OpenAI):
    """The server's default --structured-outputs-backend auto: xgrammar refuses a draft-07 tuple
    (`items` as a list); llguidance compiles it, and the output keeps to the schema."""
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "array",
              "items": [{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["on", "off"]}],
              "additionalItems": False}
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK_PERSON, temperature=0, max_tokens=24,
        response_format={"type": "json_schema", "json_schema": {"name": "pair", "schema": schema}})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_and_structured_outputs_in_chat_and_completions(client: openai.OpenAI):
    reply = client.chat.completions.create(model=MODEL, messages=ASK_PERSON, temperature=0, max_tokens=40,
                                           response_format={"type": "json_object"})
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:
        assert reply.choices[0].message.content.startswith("{")
    choice = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is the sky blue?"}], temperature=1.0, n=3, max_tokens=5,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert {c.message.content for c in choice.choices} <= {"yes", "no"}
    regex = client.completions.create(model=MODEL, prompt="Flight number:", temperature=1.0, n=3, max_tokens=10,
                                      extra_body={"structured_outputs": {"regex": "[A-Z]{2}[0-9]{3,4}"}})
    assert all(re.fullmatch("[A-Z]{2}[0-9]{3,4}", c.text) and c.finish_reason == "stop" for c in regex.choices)
    grammar = client.completions.create(model=MODEL, prompt="2 + 2 =", temperature=1.0, max_tokens=10,
                                        extra_body={"structured_outputs": {"grammar": 'root ::= " " [0-9] [0-9]?'}})
    assert re.fullmatch(" [0-9][0-9]?", grammar.choices[0].text)
    schema = client.completions.create(model=MODEL, prompt="A person as JSON:", temperature=0, max_tokens=80,
                                       extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                           "name": "p", "schema": PERSON}}})
    jsonschema.validate(json.loads(schema.choices[0].text), PERSON)


def test_stream_and_non_stream_agree(http: httpx.Client):
    body = {"model": MODEL, "messages": ASK_PERSON, "temperature": 0.9, "seed": 5, "max_tokens": 100,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}
    whole = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    content, calls, reason = stream_chat(http, body)
    assert (content, reason) == (whole["message"]["content"], whole["finish_reason"]) and not calls
    tools_body = {"model": MODEL, "messages": ASK_WEATHER, "temperature": 0.9, "seed": 6, "max_tokens": 60,
                  "tools": [WEATHER, ADD], "tool_choice": "required", "parallel_tool_calls": False}
    whole = http.post("/v1/chat/completions", json=tools_body).json()["choices"][0]
    content, calls, reason = stream_chat(http, tools_body)
    expected = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                for c in whole["message"]["tool_calls"] or []]
    assert (content or None, calls, reason) == (whole["message"]["content"], expected, whole["finish_reason"])


def test_required_and_named_tool_calls_always_parse(client: openai.OpenAI):
    schemas = {"get_weather": WEATHER["function"]["parameters"], "add": ADD["function"]["parameters"]}
    for tool_choice, parallel in [("required", False), ({"type": "function", "function": {"name": "add"}}, True)]:
        reply = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER, ADD], n=1,
                                               tool_choice=tool_choice, parallel_tool_calls=parallel,
                                               temperature=1.0, seed=3, max_tokens=60)
        for choice in reply.choices:
            if choice.finish_reason == "length":
                continue
            assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
            assert parallel or len(choice.message.tool_calls) == 1
            for call in choice.message.tool_calls:
                assert call.type == "function" and call.id.startswith("call_")
                assert isinstance(tool_choice, str) or call.function.name == "add"
                jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_tool_results_round_trip_through_the_template(client: openai.OpenAI, http: httpx.Client):
    conversation = ASK_WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_abc", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"temperature": 21, "sky": "clear"}'}]
    tokens = http.post("/tokenize", json={"model": MODEL, "messages": conversation}).json()["tokens"]
    prompt = http.post("/detokenize", json={"model": MODEL, "tokens": tokens}).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in prompt
    assert '<tool_response>\n{"temperature": 21, "sky": "clear"}\n</tool_response>' in prompt
    reply = client.chat.completions.create(model=MODEL, messages=conversation, tools=[WEATHER], tool_choice="auto",
                                           temperature=0, max_tokens=16)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("extra, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format", "invalid"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "description": "x" * 70000}}}}, "response_format", "too large"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "$ref": "#/$defs/nowhere"}}}}, "response_format", "cannot be used"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {  # both libraries refuse
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 9223372036854776000}}}}}},
     "response_format", "(at /properties/n)"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs", "grammar"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs",
     "cannot be combined"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "at least one tool"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "name"),
])
def test_unusable_specs_are_400_before_generation(http: httpx.Client, extra, param, message):
    body = {"model": MODEL, "messages": ASK_PERSON, "max_tokens": 5, **extra}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
