"""Real clients against a real `zili serve` (issue 21 item 13): what each one parses out of zili's answers.

The clients are the ones users point at OpenAI-compatible servers that install offline from PyPI:
the `openai` SDK, LangChain's ChatOpenAI, LiteLLM, instructor and the `anthropic` SDK
(lm-evaluation-harness's remote tokenizer is in test_api_conformance.py). Each is run the way its
documentation shows, against the session's server, greedy and with short outputs; the reference
for text and token counts is the same request made with plain HTTP, so a client that parses a
field wrongly (or a server field a client cannot read) fails here, not in a user's hands.
"""

from __future__ import annotations

import json
import os

import anthropic
import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.e2e.server_process import MODEL, ServerProcess

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM would fetch its price list at import

import instructor  # noqa: E402
import litellm  # noqa: E402
from langchain_core.messages import AIMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402

ASK = [{"role": "user", "content": "Name a colour."}]
CITY_ASK = [{"role": "user", "content": "Give the capital of France as JSON."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class City(BaseModel):
    name: str = Field(max_length=12)
    country: str = Field(max_length=12)


def settled_post(http: httpx.Client, body: dict) -> httpx.Response:
    """`body` posted twice, the second answer returned: see "Settling" in server_process."""
    http.post("/v1/chat/completions", json={**body, "max_tokens": 1}).raise_for_status()
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r


@pytest.fixture(scope="module")
def reference(http: httpx.Client) -> dict:
    """The greedy answer to ASK (8 tokens), over plain HTTP."""
    return settled_post(http, {"model": MODEL, "messages": ASK, "max_tokens": 8, "temperature": 0}).json()


@pytest.fixture(scope="module")
def weather_reference(http: httpx.Client) -> dict:
    body = {"model": MODEL, "messages": WEATHER_ASK, "max_tokens": 40, "temperature": 0, "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    call = settled_post(http, body).json()["choices"][0]["message"]["tool_calls"][0]["function"]
    return {"name": call["name"], "arguments": json.loads(call["arguments"])}


# ----- openai -----


def test_openai_text_usage_and_request_id(client: openai.OpenAI, reference: dict):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
    reply = raw.parse()
    assert reply.choices[0].message.content == reference["choices"][0]["message"]["content"]
    assert reply.usage.prompt_tokens == reference["usage"]["prompt_tokens"]
    assert reply.usage.completion_tokens == reference["usage"]["completion_tokens"]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply._request_id == raw.headers["x-request-id"] and reply._request_id.startswith("req_")
    assert reply.id.startswith("chatcmpl") and reply.object == "chat.completion"


def test_openai_stream_with_usage(client: openai.OpenAI, reference: dict):
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference["choices"][0]["message"]["content"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reference["usage"]["completion_tokens"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reference["choices"][0]["finish_reason"]


def test_openai_parse_with_a_pydantic_model(client: openai.OpenAI):
    """`.parse` sends the model's schema with strict: true and reads `message.parsed`."""
    reply = client.chat.completions.parse(model=MODEL, messages=CITY_ASK, max_tokens=60, temperature=0,
                                          response_format=City)
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(reply.choices[0].message.parsed, City)


def test_openai_tool_call(client: openai.OpenAI, weather_reference: dict):
    reply = client.chat.completions.create(model=MODEL, messages=WEATHER_ASK, max_tokens=40, temperature=0,
                                           tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
    [call] = reply.choices[0].message.tool_calls
    assert call.id and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == weather_reference["arguments"]


# ----- LangChain -----


@pytest.fixture(scope="module")
def chat_model(server: ServerProcess) -> ChatOpenAI:
    return ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key=server.api_key, temperature=0, max_tokens=8,
                      max_retries=0, timeout=120)


def test_langchain_invoke_and_stream(chat_model: ChatOpenAI, reference: dict):
    message = chat_model.invoke(ASK[0]["content"])
    assert isinstance(message, AIMessage)
    assert message.content == reference["choices"][0]["message"]["content"]
    assert message.usage_metadata["input_tokens"] == reference["usage"]["prompt_tokens"]
    assert message.usage_metadata["output_tokens"] == reference["usage"]["completion_tokens"]
    assert message.response_metadata["finish_reason"] == reference["choices"][0]["finish_reason"]
    streamed = "".join(chunk.content for chunk in chat_model.stream(ASK[0]["content"]))
    assert streamed == message.content


def test_langchain_tool_calls_and_structured_output(chat_model: ChatOpenAI, weather_reference: dict):
    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city"""
        return "sunny"

    longer = chat_model.model_copy(update={"max_tokens": 40})  # (a bound max_tokens is lost by bind_tools)
    model = longer.bind_tools([WEATHER], tool_choice="get_weather")
    message = model.invoke(WEATHER_ASK[0]["content"])
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and call["args"] == weather_reference["arguments"] and call["id"]
    assert get_weather.name == "get_weather"  # the same tool, declared the LangChain way, binds too
    assert chat_model.bind_tools([get_weather]).invoke("hi", max_tokens=1) is not None
    city = chat_model.model_copy(update={"max_tokens": 60}).with_structured_output(City, method="json_schema").invoke(
        CITY_ASK[0]["content"])
    assert isinstance(city, City)


# ----- LiteLLM -----


def test_litellm_completion_stream_and_tools(server: ServerProcess, reference: dict, weather_reference: dict):
    common = {"model": f"openai/{MODEL}", "api_base": server.url + "/v1", "api_key": server.api_key,
              "temperature": 0, "timeout": 120}
    reply = litellm.completion(messages=ASK, max_tokens=8, **common)
    assert reply.choices[0].message.content == reference["choices"][0]["message"]["content"]
    assert reply.usage.prompt_tokens == reference["usage"]["prompt_tokens"]
    assert reply.usage.completion_tokens == reference["usage"]["completion_tokens"]
    chunks = list(litellm.completion(messages=ASK, max_tokens=8, stream=True, **common))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    called = litellm.completion(messages=WEATHER_ASK, max_tokens=40, tools=[WEATHER],
                                tool_choice={"type": "function", "function": {"name": "get_weather"}}, **common)
    [call] = called.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == weather_reference["arguments"]


# ----- instructor -----


@pytest.mark.parametrize("mode", [instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA])
def test_instructor_response_model(client: openai.OpenAI, mode):
    patched = instructor.from_openai(client, mode=mode)
    city = patched.chat.completions.create(model=MODEL, messages=CITY_ASK, response_model=City, max_tokens=60,
                                           temperature=0, max_retries=0)
    assert isinstance(city, City) and city.name and city.country


# ----- anthropic (the route's own tests: test_anthropic_messages.py) -----


def test_anthropic_usage_and_request_id(server: ServerProcess, reference: dict):
    claude = anthropic.Anthropic(base_url=server.url, api_key=server.api_key, max_retries=0, timeout=120)
    raw = claude.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=ASK,
                                                   extra_body={"temperature": 0})
    message = raw.parse()
    assert message._request_id == raw.headers["x-request-id"]
    assert message.content[0].text == reference["choices"][0]["message"]["content"]
    assert message.usage.input_tokens == reference["usage"]["prompt_tokens"]
    assert message.usage.output_tokens == reference["usage"]["completion_tokens"]
