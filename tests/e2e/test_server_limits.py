"""A server with tight limits: 429 past --max-queue, a schemathesis run and a hostile-input fuzz that find no 5xx."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e import fuzzing
from tests.e2e.server_process import MODEL, ServerProcess, start_server
from zili.server import anthropic
from zili.server import protocol as p

# Tiny batches and outputs keep each fuzzed generation short.
LIMITED_ARGS = ["--max-num-seqs", "2", "--max-queue", "2", "--max-tokens-cap", "2", "--max-body-bytes", "65536"]


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory, "limited", LIMITED_ARGS)
    yield srv
    srv.stop()


async def _burst(server: ServerProcess, count: int) -> list[httpx.Response]:
    body = {"model": MODEL, "prompt": "Count to ten:", "max_tokens": 2, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(count)))


def test_429_past_max_queue(limited: ServerProcess):
    responses = asyncio.run(_burst(limited, 12))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429}, statuses
    for r in responses:
        if r.status_code == 429:
            error = r.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
            assert int(r.headers["retry-after"]) >= 1
        else:
            assert r.json()["usage"]["completion_tokens"] == 2
    assert limited.metrics()['zili_requests_rejected_total{reason="queue_full"}'] == statuses.count(429)
    limited.wait_idle()
    assert httpx.get(limited.url + "/health").status_code == 200


def test_schemathesis_finds_no_server_errors(limited: ServerProcess):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_url(limited.url + "/openapi.json")
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models",
                                               "/tokenize", "/detokenize", "/health", "/metrics"}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=10, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case) -> None:
                response = case.call(headers=limited.headers, timeout=60)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.path} {case.body!r} -> {response.status_code} "
                                    f"{response.text[:300]}")

            try:
                check()
            except Unsatisfiable:  # no invalid input exists (e.g. GET /health takes no parameters)
                assert mode == GenerationMode.NEGATIVE, op.path
    assert not failures, "\n".join(failures[:10])
    assert httpx.get(limited.url + "/health").status_code == 200


# ----- the hostile-input fuzz (issue 21 item 5) -----

_WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
# A small valid instance of each request model, to reach the fields nested inside it.
FUZZ_EXAMPLES: dict[type, dict[str, Any]] = {
    p.StreamOptions: {"include_usage": True},
    p.JSONSchemaFormat: {"name": "answer", "schema": _WEATHER, "strict": True},
    p.ResponseFormat: {"type": "json_schema", "json_schema": {"name": "answer", "schema": _WEATHER}},
    p.StructuredOutputs: {"choice": ["yes", "no"]},
    p.FunctionDefinition: {"name": "get_weather", "parameters": _WEATHER},
    p.Tool: {"type": "function", "function": {"name": "get_weather", "parameters": _WEATHER}},
    p.ToolCallFunction: {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    p.ToolCall: {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
    p.NamedFunction: {"name": "get_weather"},
    p.NamedToolChoice: {"type": "function", "function": {"name": "get_weather"}},
    p.TextContentPart: {"type": "text", "text": "Hi"},
    p.OtherContentPart: {"type": "image_url", "image_url": {"url": "data:,"}},
    p.ChatMessage: {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    anthropic.Message: {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    anthropic.TextBlock: {"type": "text", "text": "Hi"},
    anthropic.ToolUseBlock: {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
    anthropic.ToolResultBlock: {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
    anthropic.OtherBlock: {"type": "image", "source": {"type": "base64", "data": ""}},
    anthropic.Tool: {"name": "get_weather", "input_schema": _WEATHER},
    anthropic.ToolChoice: {"type": "auto"},
}
# A block or call only an assistant may hold: its message's role is switched to assistant.
_ASSISTANT_ONLY = {p.ToolCall, p.ToolCallFunction, anthropic.ToolUseBlock}
_HI = [{"role": "user", "content": "Hi"}]
SCHEMA_FIELDS = {"schema", "json", "parameters", "input_schema"}  # the free-form fields that hold a JSON schema
FUZZ_TRACE = False  # print each case as it is sent (to find a slow one)
# (path, request model, the smallest valid body, Anthropic's error shape?)
FUZZ_ENDPOINTS = [
    ("/v1/chat/completions", p.ChatCompletionRequest, {"model": MODEL, "messages": _HI, "max_tokens": 1}, False),
    ("/v1/completions", p.CompletionRequest, {"model": MODEL, "prompt": "Hi", "max_tokens": 1}, False),
    ("/v1/embeddings", p.EmbeddingRequest, {"model": MODEL, "input": "Hi"}, False),
    ("/v1/messages", anthropic.MessagesRequest, {"model": MODEL, "messages": _HI, "max_tokens": 1}, True),
    ("/tokenize", p.TokenizeRequest, {"model": MODEL, "prompt": "Hi"}, False),
    ("/detokenize", p.DetokenizeRequest, {"model": MODEL, "tokens": [1, 2]}, False),
]
# Everything else a client can reach on this server (no governance here: the admin routes are fuzzed in
# tests/governance), with hostile path segments where the route has one.
FUZZ_GETS = ["/v1/models", "/tokenizer_info", "/health", "/metrics", "/v1/models/%ED%A0%80", "/v1/models/%FF%FE",
             "/v1/models/" + "%5B" * 3000, "/v1/models/%00", "/v1/models/..%2F..%2Fetc%2Fpasswd"]


def _fuzz_cases() -> list[tuple[str, bool, tuple, Any, dict[str, Any]]]:
    """(route, anthropic, path, value, body) for every field x its hostile values (fuzzing.values_for)."""
    cases = []
    for route, model, base, anthropic_shape in FUZZ_ENDPOINTS:
        paths = fuzzing.field_paths(model)
        missing = fuzzing.models_in(paths) - set(FUZZ_EXAMPLES)
        assert not missing, f"add an example of {missing} to FUZZ_EXAMPLES"
        for index, (path, parents) in enumerate(paths):
            for value in fuzzing.values_for(index):
                cases.append((route, anthropic_shape, path, value, _fuzz_body(base, path, parents, value)))
        for index, (path, parents) in enumerate(fuzzing.field_paths(model, free_form=True)):
            # every hostile schema where a schema is read; two of them into the other free-form objects
            schemas = fuzzing.SCHEMAS if path[-1] in SCHEMA_FIELDS else fuzzing.SCHEMAS[2 * index:2 * index + 2]
            for value in schemas:
                cases.append((route, anthropic_shape, path, value, _fuzz_body(base, path, parents, value)))
    return cases


def _fuzz_body(base: dict[str, Any], path: tuple, parents: fuzzing.Parents, value: Any) -> dict[str, Any]:
    body = fuzzing.body_with(base, path, parents, value, FUZZ_EXAMPLES)
    if _ASSISTANT_ONLY & {m for _, m in parents}:
        body["messages"][0]["role"] = "assistant"
    return body


def _send(client: httpx.Client, route: str, anthropic_shape: bool, body: Any, failures: list[str],
          what: str, seen: set[tuple[str, int]]) -> None:
    if FUZZ_TRACE:
        print(route, what, flush=True)
    try:
        r = client.post(route, content=fuzzing.encode(body), headers={"Content-Type": "application/json"})
    except httpx.TimeoutException:
        failures.append(f"{route} {what}: no answer in {client.timeout.read} s")
        return
    seen.add((route, r.status_code // 100))
    problem = fuzzing.shape_problem(r.status_code, r.content, anthropic_shape)
    if problem is not None:
        failures.append(f"{route} {what}: {problem}: {r.status_code} {r.text[:300]}")


def test_hostile_values_in_every_field_get_2xx_or_4xx(limited: ServerProcess):
    """Issue 21 item 5: invalid Unicode, huge / negative numbers, NaN / Infinity, wrong types and deep
    nesting in every field of every endpoint (and inside the free-form objects: schemas, tool
    parameters, logit_bias) get a 2xx or a 4xx in the endpoint's error shape; never a 5xx or a hang."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    failures: list[str] = []
    seen: set[tuple[str, int]] = set()  # (route, status // 100)
    cases = _fuzz_cases()
    with httpx.Client(base_url=limited.url, headers=limited.headers, timeout=30) as client:
        for route, anthropic_shape, path, value, body in cases:
            _send(client, route, anthropic_shape, body, failures, f"{'.'.join(map(str, path))}={value!r:.60}",
                  seen)
        for route in FUZZ_GETS:
            r = client.get(route)
            if (problem := fuzzing.shape_problem(r.status_code, r.content, False)) is not None:
                failures.append(f"GET {route}: {problem}: {r.status_code} {r.text[:300]}")

        # Then random hostile values (hypothesis, fixed seed) into randomly chosen fields.
        fields = [(route, a, path, parents, base) for route, model, base, a in FUZZ_ENDPOINTS
                  for path, parents in fuzzing.field_paths(model)]

        @settings(max_examples=60, deadline=None, database=None, derandomize=True,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(field=st.sampled_from(fields), value=fuzzing.hostile_values())
        def random_field(field, value) -> None:
            route, anthropic_shape, path, parents, base = field
            body = _fuzz_body(base, path, parents, value)
            _send(client, route, anthropic_shape, body, failures, f"{'.'.join(map(str, path))}={value!r:.60}", seen)

        random_field()
    assert len(cases) > 1100  # every field of every model was reached (fields x values)
    # the fuzz got past the door on every endpoint (some bodies ran) and was refused there too
    assert seen >= {(route, kind) for route, *_ in FUZZ_ENDPOINTS for kind in (2, 4)}, sorted(seen)
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:25])
    assert httpx.get(limited.url + "/health").status_code == 200


@pytest.mark.parametrize("route,body,place", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "integer", "minimum": float("nan")}}}},
     "response_format.json_schema.schema.minimum"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "number", "maximum": fuzzing.Raw("1e400")}}}}}],
        "tool_choice": "required"}, "tools[0].function.parameters.properties.a.maximum"),
    ("/v1/completions", {"structured_outputs": {"json": {"enum": [1, float("-inf")]}}}, "structured_outputs.json.enum[1]"),
    ("/v1/messages", {"tools": [{"name": "f", "input_schema": {"type": "object", "properties": {
        "a": {"const": float("inf")}}}}]}, "tools[0].properties.a.const"),
])
def test_nan_and_infinity_in_a_schema_are_a_400_naming_the_place(limited: ServerProcess, route, body, place):
    """Python's JSON parser reads NaN, Infinity and 1e400 (not JSON): in a free-form schema they reached
    the grammar compiler, whose 400 quoted its own parser's failure and the whole schema text, naming no
    place (found by the fuzz above)."""
    base = next(b for r, _, b, _ in FUZZ_ENDPOINTS if r == route)
    r = httpx.post(limited.url + route, content=fuzzing.encode({**base, **body}), timeout=60,
                   headers={**limited.headers, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert f"{place} is not a finite number" in message and "Failed to parse" not in message, message
