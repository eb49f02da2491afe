"""Tool calls cut off by max_tokens, and tools together with a response format (issue 21 items 3, 4).

The grammar is checked with xgrammar's own acceptance test of a string; the partial calls are
checked against the text they were cut from, whole-text parse and streamed parse alike.
"""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr
from xgrammar.testing import _is_grammar_accept_string as grammar_accepts

from zili.structured.tools import HERMES, LLAMA3, ToolCallStream, normalize_tools, parse_tool_calls, tool_call_or_answer

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
          "additionalProperties": False}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("text, accepted", [
    (CALL, True),
    (CALL + "\n" + CALL, True),  # parallel calls
    ('{"name": "Bob"}', True),  # the answer, matching the response format's schema
    ('{"name": 3}', False),
    ('{"city": "Paris"}', False),  # JSON, but not the answer's schema
    ("Hello there", False),  # free text is neither
    ('<tool_call>\n{"name": "get_weather", "arguments": {"town": "Paris"}}\n</tool_call>', False),
    ('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', False),
])
def test_tools_with_a_response_format_allow_a_call_or_the_answer(text: str, accepted: bool):
    spec = tool_call_or_answer(normalize_tools([WEATHER]), PERSON)
    assert grammar_accepts(xgr.Grammar.from_structural_tag(spec.spec), text) is accepted


def test_tools_with_json_object_allow_any_object_or_a_call():
    grammar = xgr.Grammar.from_structural_tag(tool_call_or_answer(normalize_tools([WEATHER]), {"type": "object"}).spec)
    assert grammar_accepts(grammar, '{"anything": [1, 2]}') and grammar_accepts(grammar, CALL)
    assert not grammar_accepts(grammar, "[1, 2]")


def test_a_bad_answer_schema_is_refused():
    with pytest.raises(ValueError):
        tool_call_or_answer(normalize_tools([WEATHER]), {"type": "objekt"})


# text cut off by max_tokens -> (content, [(name, arguments so far)])
CUT = [
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', None,
     [("get_weather", '{"city": "Par')]),
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": ', None, [("get_weather", "")]),
    (HERMES, '<tool_call>\n{"name": "get_wea', None, [("get_wea", "")]),
    (HERMES, "<tool_call>\n{", None, []),  # not even the name: no call, and no markup as content
    (HERMES, 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"ci', "Let me check.",
     [("get_weather", '{"ci')]),
    (HERMES, CALL + '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Ro', None,
     [("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Ro')]),
    (HERMES, "Just text, cut off mid-sen", "Just text, cut off mid-sen", []),
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Pa', None, [("get_weather", '{"city": "Pa')]),
    (LLAMA3, '<|python_tag|>{"name": "f", "parameters": {}}; {"name": "get_weather", "parameters": {"c', None,
     [("f", "{}"), ("get_weather", '{"c')]),
]


@pytest.mark.parametrize("style, text, content, calls", CUT)
def test_a_call_cut_off_by_max_tokens_is_returned_partial(style, text, content, calls):
    parsed = parse_tool_calls(text, style, truncated=True)
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == calls
    # streamed in small pieces, the same content and calls
    stream, streamed, deltas = ToolCallStream(style), "", []
    for i in range(0, len(text), 3):
        piece, more = stream.feed(text[i:i + 3])
        streamed, deltas = streamed + piece, deltas + more
    piece, more = stream.finish(truncated=True)
    streamed, deltas = streamed + piece, deltas + more
    assert (streamed or None) == content
    assert [(d["function"]["name"], d["function"]["arguments"]) for d in deltas] == calls


def test_without_truncation_a_cut_call_stays_text():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    assert parse_tool_calls(text, HERMES).tool_calls == []
    whole = parse_tool_calls(CALL, HERMES, truncated=True)
    assert [json.loads(c.arguments) for c in whole.tool_calls] == [{"city": "Paris"}]
