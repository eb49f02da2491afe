"""Tool calls over HTTP that run out of tokens, and tools with a response_format (issue 21 items 3, 4).

A call cut off by max_tokens comes back as OpenAI returns it: content null, the call in
`tool_calls` with its name and the partial `arguments` text, finish_reason "length", streamed or
not. The arguments are checked against the tokens the model actually produced (their logprobs'
token strings, joined).
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from tests.e2e.server_process import MODEL
from tests.e2e.test_structured_server import ASK_WEATHER, PERSON, WEATHER, stream_chat

NAMED = {"type": "function", "function": {"name": "get_weather"}}


def raw_text(reply: dict) -> str:
    """The generated text, from the logprobs' tokens (independent of any tool-call parsing)."""
    return "".join(t["token"] for t in reply["choices"][0]["logprobs"]["content"])


@pytest.mark.parametrize("tool_choice", [NAMED, "required"])
def test_a_tool_call_cut_off_by_max_tokens(http: httpx.Client, tool_choice):
    body = {"model": MODEL, "messages": ASK_WEATHER, "tools": [WEATHER], "tool_choice": tool_choice,
            "max_tokens": 24, "temperature": 0, "logprobs": True}  # cut inside the arguments
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    raw = raw_text(r.json())
    assert raw.startswith('<tool_call>\n{"name": "get_weather", "arguments": ') and "</tool_call>" not in raw
    assert choice["finish_reason"] == "length"
    message = choice["message"]
    assert message["content"] is None
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert call["function"]["arguments"] == raw.split('"arguments": ', 1)[1]
    # Streamed: the same (no markup as content).
    content, calls, reason = stream_chat(http, {k: v for k, v in body.items() if k != "logprobs"})
    assert content == "" and reason == "length"
    assert calls == [{"name": "get_weather", "arguments": call["function"]["arguments"]}]
    # With room to finish, the same call completes: the partial arguments were its beginning.
    # (one call: with parallel calls allowed under "required" this small model repeats its call to the limit)
    full = http.post("/v1/chat/completions", json={**body, "max_tokens": 80, "parallel_tool_calls": False}).json()
    assert raw_text(full).startswith(raw)
    assert full["choices"][0]["finish_reason"] == "tool_calls"
    jsonschema.validate(json.loads(full["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]),
                        WEATHER["function"]["parameters"])


def test_forced_tool_calls_with_a_response_format(http: httpx.Client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for tool_choice in ("required", NAMED):
        body = {"model": MODEL, "messages": ASK_WEATHER, "tools": [WEATHER], "tool_choice": tool_choice,
                "response_format": fmt, "max_tokens": 80, "temperature": 0, "parallel_tool_calls": False}
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        [call] = choice["message"]["tool_calls"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])


@pytest.mark.parametrize("messages", [ASK_WEATHER, [{"role": "user", "content": "Describe a person as JSON."}]])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_tools_with_a_response_format_give_a_call_or_a_matching_answer(http: httpx.Client, messages, seed):
    body = {"model": MODEL, "messages": messages, "tools": [WEATHER], "tool_choice": "auto", "seed": seed,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
            "max_tokens": 120, "temperature": 1.0, "parallel_tool_calls": False}  # one call: bounded too
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] != "length", choice  # both branches are bounded (maxLength, maxItems)
    message = choice["message"]
    if message.get("tool_calls"):
        assert choice["finish_reason"] == "tool_calls" and message["content"] is None
        for call in message["tool_calls"]:
            jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    else:
        jsonschema.validate(json.loads(message["content"]), PERSON)


# ----- JSON Schema strictness over HTTP (item 12) -----


def _schema_request(http: httpx.Client, schema: dict, strict: bool | None) -> httpx.Response:
    json_schema = {"name": "answer", "schema": schema, **({"strict": strict} if strict is not None else {})}
    return http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "List some tags."}], "max_tokens": 3,
        "temperature": 0, "response_format": {"type": "json_schema", "json_schema": json_schema}})


def test_strict_is_honoured_and_approximations_are_said(http: httpx.Client):
    needs_items = {"type": "array", "minItems": 1}  # strict mode allows no unlisted items: impossible there
    r = _schema_request(http, needs_items, False)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].startswith("[")
    r = _schema_request(http, needs_items, True)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    assert "(at /)" in r.json()["error"]["message"] and "minItems" in r.json()["error"]["message"]

    loose = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True,
                                                       "items": {"type": "string", "maxLength": 5}}}}
    r = _schema_request(http, loose, True)
    assert r.status_code == 400, r.text
    assert "/properties/tags/uniqueItems: uniqueItems is not enforced" in r.json()["error"]["message"]
    r = _schema_request(http, loose, None)
    assert r.status_code == 200, r.text
    assert "/properties/tags/uniqueItems: uniqueItems is not enforced" in r.headers["zili-warnings"]
    assert "zili-warnings" not in _schema_request(http, PERSON, True).headers


def test_a_grammar_library_failure_is_a_400_naming_the_place(http: httpx.Client):
    # A bound past int64: xgrammar refuses a maximum and a minimum there; llguidance (the "auto"
    # backend's fallback) compiles the maximum, so only the minimum fails in both libraries.
    schema = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 9223372036854776000}}}
    r = _schema_request(http, schema, None)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "(at /properties/id)" in message and "Check failed" not in message and ".cc:" not in message
    served = _schema_request(http, {"type": "object", "properties": {"id": {"type": "integer",
                                                                           "maximum": 9223372036854776000}}}, None)
    assert served.status_code == 200, served.text
    assert served.json()["choices"][0]["message"]["content"].startswith("{")
