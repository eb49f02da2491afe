"""JSON Schema strictness and coverage (issue 21 item 12): `strict`, zili's caps, library failures
named by schema location, approximations said out loud, and non-BMP characters in forced choices.

The approximation table (zili.structured.approximations) is checked against the grammar itself:
for each entry, an instance that breaks the keyword is fed to the compiled grammar, which accepts
it. When the backend learns to enforce a keyword, its case here fails and the entry must go.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.tiny_models import write_tiny_llama
from tests.unit.test_structured import make_llm
from zili import SamplingParams
from zili.sampling import SamplingParamsError
from zili.structured import spec
from zili.structured.approximations import approximations
from zili.structured.backend import locate_schema_failure
from zili.structured.spec import Limits, StructuredOutput, as_json_schema_reads
from zili.structured.tools import normalize_tools, tool_call_constraint, tool_call_or_answer


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return make_llm(write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-strictness")))


def accepts(llm, structured: StructuredOutput, text: str) -> bool:
    """Whether the compiled grammar takes `text` as a whole output (then the end of sequence)."""
    matcher = llm.engine.inputs.new_matcher(llm.engine.compile_structured(structured))
    return matcher.accept_string(text) and matcher.is_completed()


# (schema, an instance that breaks it, pointer and keyword the approximation names)
LOOSE = [
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, '{"a": "x"}', "/properties/a/not"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]", "/uniqueItems"),
    ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, "[1]", "/contains"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "1", "/oneOf"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 2}, '"aaaa"', "/maxLength"),
    ({"type": "string", "pattern": "(?!b)."}, '"b"', "/pattern"),
    ({"type": "string", "format": "regex"}, '"("', "/format"),
    ({"type": "number", "multipleOf": 0.5}, "0.3", "/multipleOf"),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
      "dependentRequired": {"a": ["b"]}}, '{"a": 1}', "/dependentRequired"),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
      "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}, '{"a": 1}', "/if"),
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]}, '{"a": 1}', "/allOf"),
]


@pytest.mark.parametrize("schema,instance,pointer", LOOSE, ids=[c[2] for c in LOOSE])
def test_each_named_approximation_is_real(llm, schema, instance, pointer):
    named = approximations(schema)
    assert pointer in [a.pointer for a in named], named
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(instance), schema, format_checker=jsonschema.FormatChecker())
    assert accepts(llm, StructuredOutput.json(schema, strict=False), instance)  # the grammar lets it through


def test_enforced_keywords_are_not_reported(llm):
    schema = {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 1, "maximum": 9, "multipleOf": 3},
        "s": {"type": "string", "minLength": 2, "maxLength": 4},
        "p": {"type": "string", "pattern": "^[a-z]+$"},
        "e": {"type": "string", "format": "email"},
        "x": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/d"}]}},
        "$defs": {"d": {"enum": ["a", "b"]}}, "required": ["n"]}
    assert approximations(schema) == []
    assert not accepts(llm, StructuredOutput.json(schema), '{"n": 4}')  # multipleOf 3 is enforced
    assert accepts(llm, StructuredOutput.json(schema), '{"n": 6, "s": "ab"}')


def test_strict_true_refuses_an_approximation_naming_where():
    schema = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(ValueError, match=r"/properties/tags/uniqueItems: uniqueItems is not enforced"):
        StructuredOutput.json(schema, strict=True)
    assert StructuredOutput.json(schema, strict=False).strict is False  # accepted, and said (server header)


def test_strict_false_compiles_what_strict_mode_refuses(llm):
    schema = {"type": "array", "minItems": 1}  # items unlisted: strict mode allows none, so minItems 1 is impossible
    with pytest.raises(SamplingParamsError, match=r"\(at /\).*minItems"):
        llm.engine.compile_structured(StructuredOutput.json(schema, strict=True))
    for strict in (False, None):  # not given: falls back to JSON Schema's reading
        assert accepts(llm, StructuredOutput.json(schema, strict=strict), '[1, "a"]')
        assert not accepts(llm, StructuredOutput.json(schema, strict=strict), "[]")
    # the strict flag is part of the compiled grammar's identity
    assert StructuredOutput.json(schema, strict=True).cache_key != StructuredOutput.json(schema).cache_key


def test_strict_mode_is_the_default_where_it_compiles(llm):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert not accepts(llm, StructuredOutput.json(schema), '{"a": 1, "b": 2}')
    assert accepts(llm, StructuredOutput.json(schema, strict=False), '{"a": 1, "b": 2}')


def test_a_library_failure_names_the_schema_location(llm):
    # A minimum past int64 fails in both grammar libraries (the "auto" backend's llguidance fallback
    # compiles such a maximum: tests/unit/test_structured_backends.py).
    schema = {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 9223372036854776000}}}}}
    with pytest.raises(SamplingParamsError) as err:
        llm.engine.compile_structured(StructuredOutput.json(schema))
    message = str(err.value)
    assert "(at /properties/user/properties/id)" in message and "64-bit" in message
    assert "Check failed" not in message and ".cc:" not in message
    assert locate_schema_failure({"type": "integer"}) is None
    refs = {"$defs": {"big": {"type": "integer", "minimum": -(10**20)}}, "type": "object",
            "properties": {"a": {"$ref": "#/$defs/big"}}}
    assert locate_schema_failure(refs) == "/$defs/big"


def test_caps_admit_real_schema_lengths_and_are_configurable(llm, monkeypatch):
    for key in ("ZILI_STRUCTURED_MAX_COUNT", "ZILI_STRUCTURED_MAX_SPEC_CHARS", "ZILI_STRUCTURED_MAX_SCHEMA_DEPTH",
                "ZILI_STRUCTURED_MAX_REGEX_REPEAT"):
        monkeypatch.delenv(key, raising=False)
    real = {"type": "object", "properties": {"body": {"type": "string", "maxLength": 65535},
                                             "title": {"type": "string", "maxLength": 32767}}}
    llm.engine.compile_structured(StructuredOutput.json(real))
    monkeypatch.setenv("ZILI_STRUCTURED_MAX_COUNT", "1000")
    assert Limits.current().max_count == 1000
    with pytest.raises(ValueError, match=r"maxLength=65535 at /properties/body/maxLength.*1000 "
                                         r"\(ZILI_STRUCTURED_MAX_COUNT\)"):
        StructuredOutput.json(real)
    monkeypatch.setenv("ZILI_STRUCTURED_MAX_SPEC_CHARS", "50")
    with pytest.raises(ValueError, match=r"limit is 50 \(ZILI_STRUCTURED_MAX_SPEC_CHARS\)"):
        StructuredOutput.regex("a" * 51)
    monkeypatch.setenv("ZILI_STRUCTURED_MAX_REGEX_REPEAT", "nope")
    with pytest.raises(ValueError, match="ZILI_STRUCTURED_MAX_REGEX_REPEAT='nope' is not a positive integer"):
        StructuredOutput.regex("a{2}")


OPTIONS = ["😀 yes", "no 🙂", "𝔘nicode", "plain"]


def test_characters_past_the_bmp_in_a_choice_are_utf8(llm):
    """A forced choice holding an emoji used to be spelled as a surrogate pair in the grammar, which the
    library encoded as CESU-8 (invalid UTF-8): the real characters were refused and broken bytes forced."""
    for option in OPTIONS:
        assert accepts(llm, StructuredOutput.choice(OPTIONS), option), option
    params = SamplingParams(structured={"choice": OPTIONS}, temperature=1.0, seed=3, n=8, max_tokens=24)
    outputs = llm.generate(["Pick one:", "你好"], params)
    texts = [c.text for o in outputs for c in o.outputs]
    assert all(c.finish_reason == "stop" for o in outputs for c in o.outputs)
    assert set(texts) <= set(OPTIONS) and "\ufffd" not in "".join(texts)


@pytest.mark.parametrize("schema", [{"const": "a😀"}, {"enum": ["🙂", "x𝔘"]}])
def test_characters_past_the_bmp_in_const_and_enum(llm, schema):
    params = SamplingParams(structured={"json": schema}, temperature=1.0, seed=0, n=4, max_tokens=24)
    for choice in llm.generate(["Say it:"], params)[0].outputs:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), schema)


# ----- tools[].function.strict (OpenAI's strict function calling), read as response_format's strict -----

_CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def _tool(parameters: dict, strict: bool | None) -> dict:
    fn = {"name": "get_weather", "parameters": parameters}
    if strict is not None:
        fn["strict"] = strict
    return {"type": "function", "function": fn}


def _call(arguments: str) -> str:
    return f'<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call>'


def test_strict_tool_refuses_a_schema_the_grammar_would_only_approximate():
    loose = {"type": "object", "properties": {"city": {"type": "string", "not": {"const": "Paris"}}}}
    with pytest.raises(ValueError, match=r"tools\[1\]\.function\.parameters: strict mode.*/properties/city/not"):
        normalize_tools([_tool(_CITY, True), _tool(loose, True)])
    for strict in (False, None):  # not strict: the same schema is accepted (and approximated, see zili-warnings)
        assert normalize_tools([_tool(loose, strict)])[0]["function"]["parameters"] == loose
    with pytest.raises(ValueError, match=r"tools\[0\]\.function\.strict must be"):
        normalize_tools([_tool(_CITY, "yes")])  # type: ignore[arg-type]


def test_strict_tool_over_http_is_a_400_naming_the_place():
    from zili.server.errors import APIError
    from zili.server.inputs import chat_tools
    from zili.server.protocol import ChatCompletionRequest

    loose = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                                 "tools": [_tool(loose, True)], "tool_choice": "required"})
    with pytest.raises(APIError) as caught:
        chat_tools(body)
    assert caught.value.status == 400 and caught.value.param == "tools"
    assert "/properties/tags/uniqueItems" in caught.value.message


@pytest.mark.parametrize("strict,extra_accepted", [(True, False), (None, False), (False, True)])
def test_tool_strict_decides_extra_arguments(llm, strict, extra_accepted):
    tools = normalize_tools([_tool(_CITY, strict)])
    constraint = tool_call_constraint(tools, "required")
    assert accepts(llm, constraint, _call('{"city": "Oslo"}'))
    assert not accepts(llm, constraint, _call('{"town": "Oslo"}'))  # required city: never optional
    # JSON Schema allows properties the schema does not list; strict function calling does not
    assert accepts(llm, constraint, _call('{"city": "Oslo", "units": "metric"}')) is extra_accepted


@pytest.mark.parametrize("strict", [False, None])
def test_a_tool_schema_strict_mode_cannot_compile_is_read_as_json_schema(llm, strict):
    tools = normalize_tools([_tool({"type": "object", "properties": {"ids": {"type": "array", "minItems": 1}},
                                    "required": ["ids"]}, strict)])
    constraint = tool_call_constraint(tools, "required")
    assert accepts(llm, constraint, _call('{"ids": [1, "a"]}'))
    assert not accepts(llm, constraint, _call('{"ids": []}'))  # minItems still holds


def test_strict_true_tool_with_a_schema_strict_mode_cannot_compile_is_refused(llm):
    tools = normalize_tools([_tool({"type": "array", "minItems": 1}, True)])
    with pytest.raises(ValueError, match="minItems"):
        llm.engine.compile_structured(tool_call_constraint(tools, "required"))


def test_tool_call_or_answer_reads_the_answer_strict_too(llm):
    tools = normalize_tools([_tool(_CITY, None)])
    answer = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    loose = tool_call_or_answer(tools, answer, answer_strict=False)
    tight = tool_call_or_answer(tools, answer, answer_strict=None)
    assert accepts(llm, loose, '{"ok": true, "why": "x"}') and not accepts(llm, tight, '{"ok": true, "why": "x"}')
    assert accepts(llm, tight, '{"ok": true}') and accepts(llm, tight, _call('{"city": "Oslo"}'))
    with pytest.raises(ValueError, match="strict mode.*/oneOf"):
        tool_call_or_answer(tools, {"oneOf": [{"type": "integer"}, {"type": "number"}]}, answer_strict=True)


def test_as_json_schema_reads_writes_the_defaults_out():
    schema = {"type": "object", "properties": {"a": {"type": "array", "prefixItems": [{"type": "integer"}]},
                                               "b": {"type": "object", "additionalProperties": False}},
              "$defs": {"t": {"type": ["object", "null"]}}, "anyOf": [{"properties": {}}]}
    read = as_json_schema_reads(schema)
    assert read["additionalProperties"] is True and read["properties"]["a"]["items"] is True
    assert read["properties"]["b"]["additionalProperties"] is False  # what the schema says stays
    assert read["$defs"]["t"]["additionalProperties"] is True and read["anyOf"][0]["additionalProperties"] is True
    assert "additionalProperties" not in schema  # a copy
    assert as_json_schema_reads({"type": "string"}) == {"type": "string"}


def test_as_strict_closes_what_the_schema_leaves_open():
    schema = {"type": "object", "properties": {"t": {"prefixItems": [{"type": "integer"}]},
                                               "m": {"type": "object", "patternProperties": {"^x": {}}}},
              "dependentSchemas": {"t": {"properties": {"u": {"type": "string"}}}}}
    closed = spec.as_strict(schema)
    assert closed["additionalProperties"] is False and closed["properties"]["t"]["items"] is False
    assert "additionalProperties" not in closed["properties"]["m"]  # patternProperties decide there
    assert closed["dependentSchemas"]["t"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # a copy


def test_the_schema_walker_finds_the_deepest_failing_place():
    """spec.locate_schema_failure with a predicate of our own: a schema "fails" when it holds a
    `"bad": true` or a reference to the bad definition (outside its `$defs`), so the walker must go
    down to the innermost one, through the reference."""

    def fails(node):
        own = json.dumps({k: v for k, v in node.items() if k != "$defs"})
        return '"bad": true' in own or '"$ref": "#/$defs/a~1b"' in own

    schema = {"$defs": {"a/b": {"properties": {"x": {"bad": True}}}},
              "properties": {"ok": {"type": "string"}, "p~q": {"$ref": "#/$defs/a~1b"}}}
    assert spec.locate_schema_failure(schema, fails) == "/$defs/a~1b/properties/x"
    defs_free = {"anyOf": [{"type": "null"}, {"items": {"bad": True}}]}
    assert spec.locate_schema_failure(defs_free, fails) == "/anyOf/1/items"
    assert spec.locate_schema_failure({"bad": True}, fails) == ""
    assert spec.locate_schema_failure({"type": "integer"}, fails) is None
    assert spec.locate_schema_failure(True, fails) is None
    # Each sub-schema is judged with the root's $defs beside it (so its references resolve).
    seen = []
    spec.locate_schema_failure({"$defs": {"d": {}}, "bad": True, "properties": {"a": {}}},
                               lambda node: seen.append(sorted(node)) or True)
    assert ["$defs"] in seen
