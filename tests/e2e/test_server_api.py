"""The OpenAI-compatible endpoints, through the official `openai` client and httpx."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.server_process import MODEL, ServerProcess

CHAT = [{"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name three colours."}]
PROMPT = "The three primary colours are"


def tokenize_count(http: httpx.Client, **body) -> int:
    r = http.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    return r.json()["count"]


def sse_events(response: httpx.Response) -> list:
    """The data payloads of an SSE response; asserts the stream ends with [DONE]."""
    events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


# ----- discovery -----


def test_health_is_open_and_ok(server: ServerProcess):
    r = httpx.get(server.url + "/health")  # no API key: probes must not need one
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_health_was_503_while_loading(server: ServerProcess):
    # The port opens before the model has loaded; probes see 503 "loading" until it has.
    assert (503, "loading") in server.health_seen and server.health_seen[-1] == (200, "ok")


def test_models(client: openai.OpenAI):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "zili"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# ----- chat -----


def test_the_readme_curl_example_answers_what_the_readme_says(http: httpx.Client):
    """The first request a new user sends is the README's curl example: it must answer as the README
    says (a 135M model at temperature 0 is one near-tie away from rambling, see the README)."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    body = json.loads(re.search(r"/v1/chat/completions .*?\n\s*-d '(\{.*?\})'", readme, re.S).group(1))
    assert body["temperature"] == 0 and body["model"] == MODEL
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    assert "Paris" in content, content
    assert f'"content":"{content}"' in readme, "the README shows another answer"


def test_chat_stream_equals_non_stream_with_exact_usage(client: openai.OpenAI, http: httpx.Client):
    kwargs = dict(model=MODEL, messages=CHAT, temperature=0, max_tokens=8, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs)
    choice = full.choices[0]
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-") and full.model == MODEL
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    prompt_tokens = tokenize_count(http, messages=CHAT)
    assert (full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens) == (
        prompt_tokens, 8, prompt_tokens + 8)

    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    streamed_usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (streamed_usage.prompt_tokens, streamed_usage.completion_tokens) == (
        prompt_tokens, 8)
    assert streamed_usage.prompt_tokens_details.cached_tokens > 0  # the same prompt ran just before
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_without_include_usage_has_no_usage(http: httpx.Client):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 3, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert all("usage" not in e for e in events)
    assert all(e["object"] == "chat.completion.chunk" for e in events)


def test_chat_max_completion_tokens_and_user(client: openai.OpenAI):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_completion_tokens=3,
                                       user="user-1234", extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_chat_logprobs(client: openai.OpenAI):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=6, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the most likely token
        assert math.isclose(entry.logprob, values[0], abs_tol=1e-5)
        assert bytes(entry.bytes).decode(errors="replace") == entry.token
    assert "".join(e.token for e in content) == r.choices[0].message.content

    stream = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=6, logprobs=True,
                                            top_logprobs=3, stream=True, extra_body={"ignore_eos": True})
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_chat_n_and_seed(client: openai.OpenAI):
    kwargs = dict(model=MODEL, messages=CHAT, temperature=1.0, max_tokens=5, n=3, seed=1234,
                  extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == 15

    stream = client.chat.completions.create(**kwargs, stream=True)
    texts = {0: "", 1: "", 2: ""}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert [texts[i] for i in range(3)] == [c.message.content for c in a.choices]


def test_chat_stop_string(client: openai.OpenAI):
    base = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=10)
    text = base.choices[0].message.content
    words = [w for w in text.split() if len(w) > 3]
    assert words, text
    stop = words[0]
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=10, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[: text.index(stop)]


def test_chat_sampling_parameters_and_extensions(client: openai.OpenAI, http: httpx.Client):
    base = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=4,
                                          logprobs=True, top_logprobs=1)
    first = base.choices[0].logprobs.content[0].token
    banned = http.post("/tokenize", json={"prompt": first, "add_special_tokens": False}).json()["tokens"][0]
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, temperature=0.8, top_p=0.9, seed=7, presence_penalty=0.5,
        frequency_penalty=0.5, logit_bias={str(banned): -100}, logprobs=True, top_logprobs=1,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 4})
    assert r.usage.completion_tokens == 4
    assert r.choices[0].logprobs.content[0].token != first


def test_chat_message_content_parts(client: openai.OpenAI):
    text_parts = [{"type": "text", "text": "Name three"}, {"type": "text", "text": "colours."}]
    parts = [{"role": "user", "content": text_parts}]
    a = client.chat.completions.create(model=MODEL, messages=parts, temperature=0, max_tokens=5)
    b = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name three\ncolours."}],
                                       temperature=0, max_tokens=5)
    assert a.choices[0].message.content == b.choices[0].message.content


# ----- legacy completions -----


def test_completion_stream_equals_non_stream_with_exact_usage(client: openai.OpenAI, http: httpx.Client):
    kwargs = dict(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=8, extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs)
    assert full.object == "text_completion" and full.id.startswith("cmpl-")
    n_prompt = tokenize_count(http, prompt=PROMPT)
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (n_prompt, 8)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (n_prompt, 8)


def test_completion_default_max_tokens_is_16(client: openai.OpenAI):
    r = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_completion_logprobs_and_echo(client: openai.OpenAI):
    r = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=6, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0 and all(b >= a for a, b in zip(lp.text_offset, lp.text_offset[1:]))
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token in top and top[token] == value and 2 <= len(top) <= 3

    echoed = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=6, echo=True,
                                       extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == PROMPT + r.choices[0].text


def test_completion_batch_prompts_and_token_ids(client: openai.OpenAI, http: httpx.Client):
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    single = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4)
    by_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=4)
    assert by_ids.choices[0].text == single.choices[0].text

    batch = client.completions.create(model=MODEL, prompt=[PROMPT, "Once upon a time"], n=2, temperature=0,
                                      max_tokens=4, extra_body={"ignore_eos": True})
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == single.choices[0].text
    assert batch.usage.completion_tokens == 16
    assert batch.usage.prompt_tokens == len(ids) + tokenize_count(http, prompt="Once upon a time")

    stream = client.completions.create(model=MODEL, prompt=[ids, ids], temperature=0, max_tokens=4, stream=True)
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [single.choices[0].text] * 2


# ----- tokenizer endpoints -----


def test_tokenize_and_detokenize(http: httpx.Client):
    r = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world", "return_token_strs": True})
    body = r.json()
    assert r.status_code == 200 and body["count"] == len(body["tokens"]) and body["max_model_len"] == 2048
    assert "".join(body["token_strs"]).endswith("Hello world")
    r = http.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert r.status_code == 200 and r.json()["prompt"].endswith("Hello world")
    chat = http.post("/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] > 10
    no_gen = http.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False}).json()
    assert no_gen["count"] < chat["count"]


# ----- disconnects and metrics -----


def test_client_disconnect_aborts_request(server: ServerProcess, http: httpx.Client):
    long = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    generated_before = server.metrics()["zili_generation_tokens_total"]
    # Non-streaming: the client gives up; the server must notice and abort.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=long, headers=server.headers, timeout=1.0)
    m = server.wait_idle()
    assert m["zili_num_requests_running"] == 0 and m["zili_kv_cache_free_blocks"] == m["zili_kv_cache_total_blocks"]
    # Streaming: read a couple of events, then hang up.
    with http.stream("POST", "/v1/completions", json=long | {"stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    t0 = time.monotonic()
    m = server.wait_idle()
    assert m["zili_num_requests_running"] == 0 and m["zili_kv_cache_free_blocks"] == m["zili_kv_cache_total_blocks"]
    assert time.monotonic() - t0 < 5
    assert m["zili_generation_tokens_total"] - generated_before < 200  # both stopped early


def test_metrics(server: ServerProcess, client: openai.OpenAI):
    prompt = "Metrics test. " * 12  # several full KV blocks: the second request hits the prefix cache
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    m = server.metrics()
    for name in ("zili_num_requests_running", "zili_num_requests_waiting", "zili_kv_cache_usage_ratio",
                 "zili_prefix_cache_hit_rate", "zili_prompt_tokens_total", "zili_generation_tokens_total",
                 "zili_time_to_first_token_seconds_count", "zili_inter_token_latency_seconds_count",
                 "zili_e2e_request_latency_seconds_count", "zili_kv_cache_free_blocks", "zili_kv_cache_total_blocks"):
        assert name in m, name
    assert m["zili_prompt_tokens_total"] > 0 and m["zili_generation_tokens_total"] > 0
    assert m["zili_time_to_first_token_seconds_count"] > 0 and m["zili_e2e_request_latency_seconds_count"] > 0
    assert 0 <= m["zili_kv_cache_usage_ratio"] <= 1 and 0 <= m["zili_prefix_cache_hit_rate"] <= 1
    assert m["zili_prefix_cache_hit_rate"] > 0
