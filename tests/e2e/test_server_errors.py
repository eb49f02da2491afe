"""Bad requests get OpenAI-shaped 4xx errors (401, 400, 404, 413; a wrong type is a 400, as on OpenAI's API), never a 5xx."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.server_process import MODEL, ServerProcess

CHAT = [{"role": "user", "content": "Hi"}]


def assert_error(r: httpx.Response, status: int, param: str | None = "*", code: str | None = "*") -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param != "*":
        assert error["param"] == param, error
    if code != "*":
        assert error["code"] == code, error
    return error


# ----- 401 -----


@pytest.mark.parametrize("path,method", [("/v1/models", "GET"), ("/v1/chat/completions", "POST"),
                                         ("/v1/completions", "POST"), ("/tokenize", "POST"),
                                         ("/detokenize", "POST")])
def test_401_without_or_with_a_wrong_key(server: ServerProcess, path: str, method: str):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        r = httpx.request(method, server.url + path, headers=headers, json={})
        error = assert_error(r, 401, code="invalid_api_key")
        assert error["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"


def test_401_through_the_openai_client(server: ServerProcess):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_api_keys_from_file_and_flags(tmp_path):
    from zili.server.auth import key_matches, read_api_keys

    key_file = tmp_path / "keys.txt"
    key_file.write_text("# one key per line\nkey-a\n\n  key-b  \n")
    keys = read_api_keys(["key-c"], key_file)
    assert keys == ["key-c", "key-a", "key-b"]
    assert key_matches("key-b", keys) and not key_matches("key-", keys) and not key_matches("", keys)


def test_health_and_metrics_need_no_key(server: ServerProcess):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


# ----- 400 -----


def test_400_malformed_json(http: httpx.Client):
    r = http.post("/v1/chat/completions", content=b'{"model": "x", "messages": [', headers={
        "Content-Type": "application/json"})
    assert_error(r, 400, code="invalid_json")
    r = http.post("/v1/completions", content=b"[" * 100_000 + b"]" * 100_000,
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text


def test_400_prompt_too_long_names_the_lengths(http: httpx.Client):
    prompt = "hello " * 2100
    n = http.post("/tokenize", json={"prompt": prompt}).json()["count"]
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 4})
    error = assert_error(r, 400, param="prompt", code="context_length_exceeded")
    assert "2048" in error["message"] and str(n) in error["message"]
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": prompt}]})
    assert_error(r, 400, param="messages", code="context_length_exceeded")


def test_400_prompt_plus_max_tokens_over_context(http: httpx.Client):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hello " * 1500, "max_tokens": 1000})
    error = assert_error(r, 400, param="max_tokens", code="context_length_exceeded")
    assert "2048" in error["message"] and "1000" in error["message"]


def test_400_max_tokens_over_the_cap(http: httpx.Client):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1025})
    error = assert_error(r, 400, param="max_tokens")
    assert "1024" in error["message"]
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_completion_tokens": 1025})
    assert_error(r, 400, param="max_completion_tokens")


@pytest.mark.parametrize("field,value", [
    ("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("n", 0), ("n", 1000), ("presence_penalty", 3),
    ("frequency_penalty", -2.5), ("top_k", -5), ("min_p", 2), ("repetition_penalty", 0), ("max_tokens", 0),
    ("min_tokens", -1), ("stop", [""]), ("logit_bias", {"abc": 1}), ("logit_bias", {"5": 500}),
    ("logit_bias", {"99999999": 1}), ("top_logprobs", 5), ("stop_token_ids", [-1]),
])
def test_400_bad_values_name_the_parameter(http: httpx.Client, field: str, value):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 2, field: value})
    assert_error(r, 400, param=field)


def test_400_other_invalid_requests(http: httpx.Client):
    cases = [
        ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 30}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "messages"),
        ("/v1/completions", {"prompt": ""}, "prompt"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": [1, 2, 10**9]}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "suffix": "x"}, "suffix"),
        ("/v1/completions", {"prompt": "hi", "best_of": 3}, "best_of"),
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
        ("/tokenize", {}, "prompt"),
    ]
    for path, body, param in cases:
        assert_error(http.post(path, json=body), 400, param=param)


def test_400_text_that_is_not_unicode(http: httpx.Client):
    # JSON may escape a lone surrogate; such text cannot be tokenized.
    for path, raw in (("/v1/completions", rb'{"prompt": "\ud800 hi", "max_tokens": 2}'),
                      ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "\ud800"}]}'),
                      ("/tokenize", rb'{"prompt": "\udc00"}')):
        assert_error(http.post(path, content=raw, headers={"Content-Type": "application/json"}), 400)


def test_400_through_the_openai_client(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=-1)
    assert info.value.body["param"] == "temperature"


# ----- 404 -----


def test_404_unknown_model(http: httpx.Client, client: openai.OpenAI):
    for path, body in (("/v1/chat/completions", {"messages": CHAT}), ("/v1/completions", {"prompt": "hi"}),
                       ("/tokenize", {"prompt": "hi"})):
        assert_error(http.post(path, json=body | {"model": "gpt-17"}), 404, param="model", code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=CHAT)


def test_404_unknown_route_and_405(http: httpx.Client):
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get("/v1/chat/completions"), 405)


# ----- 413 -----


def test_413_body_too_large(http: httpx.Client):
    big = {"model": MODEL, "prompt": "x" * 300_000}
    assert_error(http.post("/v1/completions", json=big), 413, code="request_too_large")

    def chunks():  # no Content-Length: the limit applies to the stream too
        for _ in range(40):
            yield b" " * 10_000

    r = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(r, 413, code="request_too_large")


# ----- wrong types: 400 invalid_type (FastAPI's default would be 422) -----


@pytest.mark.parametrize("body,param", [
    ({"messages": "hello"}, "messages"),
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": CHAT, "temperature": "hot"}, "temperature"),
    ({"messages": CHAT, "n": 1.5}, "n"),
    ({"messages": CHAT, "stream": "maybe"}, "stream"),
    ({"messages": CHAT, "seed": 2**70}, "seed"),
    ({"messages": CHAT, "max_tokens": [1]}, "max_tokens"),
])
def test_wrong_types_are_400(http: httpx.Client, body: dict, param: str):
    assert_error(http.post("/v1/chat/completions", json=body), 400, param=param)


@pytest.mark.parametrize("field,value", [("max_tokens", True), ("max_tokens", "5"), ("n", 1.0), ("logprobs", 1),
                                         ("stream", 1), ("temperature", False), ("seed", "7")])
def test_no_silent_coercion_of_types(http: httpx.Client, field: str, value):
    """`max_tokens: true` is not 1 and `"5"` is not 5: OpenAI's API refuses them as invalid_type, and a
    lax parser would run a request the client did not mean."""
    body = {"messages": CHAT, field: value}
    assert_error(http.post("/v1/chat/completions", json=body), 400, param=field, code="invalid_type")
    missing = assert_error(http.post("/v1/chat/completions", json={"max_tokens": 1}), 400, param="messages")
    assert missing["code"] == "missing_required_parameter"


def test_non_object_bodies_are_400(http: httpx.Client):
    assert_error(http.post("/v1/completions", json=[1, 2, 3]), 400)
    assert_error(http.post("/v1/completions", content=b"prompt=hi",
                           headers={"Content-Type": "application/x-www-form-urlencoded"}), 400)


def test_server_still_healthy_after_errors(server: ServerProcess, client: openai.OpenAI):
    assert httpx.get(server.url + "/health").status_code == 200
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    assert r.usage.completion_tokens >= 1
