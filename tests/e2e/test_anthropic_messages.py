"""Anthropic's Messages API (`POST /v1/messages`, issue 21 item 11) through the official `anthropic` SDK.

The reference is the same request through the OpenAI chat endpoint: the Messages route is the
same engine path, so greedy text, token counts and tool calls must agree with it; the SDK itself
checks the shapes (it parses the message, the stream events and the errors into its types).
"""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import openai
import pytest

from tests.e2e.server_process import MODEL, ServerProcess

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                  "required": ["city"]}
WEATHER_TOOL = {"name": "get_weather", "description": "Current weather in a city", "input_schema": WEATHER_SCHEMA}
SYSTEM = "You are a concise assistant."
ASK = [{"role": "user", "content": "Name three colours."}]
# The SDK (2.x) has no sampling arguments of its own; zili reads them from the body, as Anthropic's API does.
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def claude(server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=server.api_key, max_retries=0, timeout=120)


def openai_chat(client: openai.OpenAI, messages: list[dict], **kw) -> openai.types.chat.ChatCompletion:
    """The greedy chat completion, asked twice and the second returned: both it and the Messages request
    compared with it then hit the same cached prefix (see "Settling" in server_process)."""
    client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **{**kw, "max_tokens": 1})
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)


def settle(claude: anthropic.Anthropic, **kw) -> None:
    """One 1-token request for the prompt, so the compared requests after it see the same cache state."""
    claude.messages.create(**{**kw, "max_tokens": 1})


def test_a_message_equals_the_chat_completion(claude: anthropic.Anthropic, client: openai.OpenAI):
    ref = openai_chat(client, [{"role": "system", "content": SYSTEM}, *ASK], max_tokens=12)
    msg = claude.messages.create(model=MODEL, max_tokens=12, system=SYSTEM, messages=ASK, **GREEDY)
    assert msg.type == "message" and msg.role == "assistant" and msg.model == MODEL and msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == ref.choices[0].message.content
    assert msg.usage.input_tokens == ref.usage.prompt_tokens
    assert msg.usage.output_tokens == ref.usage.completion_tokens
    assert msg.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[ref.choices[0].finish_reason]


def test_content_blocks_and_system_blocks_render_like_strings(claude: anthropic.Anthropic):
    settle(claude, model=MODEL, system=SYSTEM, messages=ASK, **GREEDY)
    plain = claude.messages.create(model=MODEL, max_tokens=6, system=SYSTEM, messages=ASK, **GREEDY)
    blocks = claude.messages.create(model=MODEL, max_tokens=6, **GREEDY,
                                    system=[{"type": "text", "text": SYSTEM}],
                                    messages=[{"role": "user",
                                               "content": [{"type": "text", "text": ASK[0]["content"]}]}])
    assert blocks.content[0].text == plain.content[0].text
    assert blocks.usage.input_tokens == plain.usage.input_tokens


def test_the_stream_equals_the_message(claude: anthropic.Anthropic):
    kwargs = dict(model=MODEL, max_tokens=12, system=SYSTEM, messages=ASK, **GREEDY)
    settle(claude, **kwargs)
    whole = claude.messages.create(**kwargs)
    with claude.messages.stream(**kwargs) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text
    assert final.content[0].text == whole.content[0].text and final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    # the raw event sequence, in Anthropic's order
    events = [e.type for e in claude.messages.create(**kwargs, stream=True)]
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
    assert events.index("content_block_start") < events.index("content_block_delta") < events.index(
        "content_block_stop")


def test_stop_sequences(claude: anthropic.Anthropic):
    settle(claude, model=MODEL, messages=ASK, **GREEDY)
    text = claude.messages.create(model=MODEL, max_tokens=16, messages=ASK, **GREEDY).content[0].text
    word = text.split()[2]
    msg = claude.messages.create(model=MODEL, max_tokens=16, messages=ASK, **GREEDY, stop_sequences=[word])
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == word
    assert msg.content[0].text == text[:text.index(word)]


def test_assistant_prefill_is_continued(claude: anthropic.Anthropic, client: openai.OpenAI):
    prefill = [*ASK, {"role": "assistant", "content": "Sure: red,"}]
    ref = openai_chat(client, prefill, max_tokens=8,
                      extra_body={"continue_final_message": True, "add_generation_prompt": False})
    msg = claude.messages.create(model=MODEL, max_tokens=8, messages=prefill, **GREEDY)
    assert msg.content[0].text == ref.choices[0].message.content
    assert msg.usage.input_tokens == ref.usage.prompt_tokens


def test_tool_use_and_tool_result(claude: anthropic.Anthropic, client: openai.OpenAI):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced = dict(model=MODEL, messages=ask, **GREEDY, tools=[WEATHER_TOOL],
                  tool_choice={"type": "tool", "name": "get_weather"})
    settle(claude, **forced)
    msg = claude.messages.create(max_tokens=60, **forced)
    assert msg.stop_reason == "tool_use"
    [use] = [b for b in msg.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id
    jsonschema.validate(use.input, WEATHER_SCHEMA)
    # the same call through the OpenAI endpoint
    ref = openai_chat(client, ask, max_tokens=60,
                      tools=[{"type": "function", "function": {"name": "get_weather", "description":
                                                               WEATHER_TOOL["description"],
                                                               "parameters": WEATHER_SCHEMA}}],
                      tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(ref.choices[0].message.tool_calls[0].function.arguments) == use.input
    # the result goes back as a tool_result block; the prompt equals the OpenAI tool-message one
    follow = [*ask, {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name,
                                                       "input": use.input}]},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C, sunny"}]}]
    settle(claude, model=MODEL, messages=follow, **GREEDY, tools=[WEATHER_TOOL])
    answer = claude.messages.create(model=MODEL, max_tokens=8, messages=follow, **GREEDY, tools=[WEATHER_TOOL])
    openai_follow = [*ask, {"role": "assistant", "content": None, "tool_calls": [
        {"id": use.id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(use.input)}}]},
        {"role": "tool", "tool_call_id": use.id, "content": "18 C, sunny"}]
    ref2 = openai_chat(client, openai_follow, max_tokens=8, tools=ref_tools())
    assert answer.usage.input_tokens == ref2.usage.prompt_tokens
    assert "".join(b.text for b in answer.content if b.type == "text") == (ref2.choices[0].message.content or "")


def ref_tools() -> list[dict]:
    return [{"type": "function", "function": {"name": "get_weather", "description": WEATHER_TOOL["description"],
                                              "parameters": WEATHER_SCHEMA}}]


def test_tool_choice_any_streams_a_tool_use_block(claude: anthropic.Anthropic):
    # one call (disable_parallel_tool_use): with parallel calls allowed this small model repeats its call to the limit
    with claude.messages.stream(model=MODEL, max_tokens=40, **GREEDY, tools=[WEATHER_TOOL],
                                tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                messages=[{"role": "user", "content": "Weather in Rome?"}]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    [use] = [b for b in final.content if b.type == "tool_use"]
    jsonschema.validate(use.input, WEATHER_SCHEMA)


def test_errors_are_anthropic_shaped(server: ServerProcess, claude: anthropic.Anthropic):
    bad_key = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad_key.messages.create(model=MODEL, max_tokens=4, messages=ASK)
    with pytest.raises(anthropic.NotFoundError) as err:
        claude.messages.create(model="claude-none", max_tokens=4, messages=ASK)
    assert err.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=MODEL, max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x/a.png"}}]}])
    url = server.url + "/v1/messages"
    headers = {"x-api-key": server.api_key, "anthropic-version": "2023-06-01"}
    for body in ({"model": MODEL, "messages": ASK}, {"model": MODEL, "max_tokens": 0, "messages": ASK},
                 {"model": MODEL, "max_tokens": 4, "messages": []}, {"model": MODEL, "max_tokens": "x"},
                 {"model": MODEL, "max_tokens": 4, "messages": ASK, "stop_sequences": ["\ud800"]}):
        r = httpx.post(url, content=json.dumps(body).encode(), headers=headers, timeout=120)  # \ud800 JSON-escaped
        assert r.status_code == 400, r.text
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error", r.text
    r = httpx.post(url, content=b"{", headers=headers, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_x_api_key_header_is_enough(server: ServerProcess):
    r = httpx.post(server.url + "/v1/messages", headers={"x-api-key": server.api_key}, timeout=120,
                   json={"model": MODEL, "max_tokens": 2, "messages": ASK})
    assert r.status_code == 200 and r.json()["type"] == "message"
    r = httpx.post(server.url + "/v1/messages", json={"model": MODEL, "max_tokens": 2, "messages": ASK}, timeout=120)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
