"""Tool calling: prompt rendering (native template and fallback), Hermes and Llama-3 parsers,
streaming parse == whole parse, and constrained calls that always parse (tiny random model)."""

from __future__ import annotations

import json
import random

import jsonschema  # noqa: E402
import pytest
import xgrammar  # noqa: E402,F401

from zili import SamplingParams  # noqa: E402
from zili.structured.tools import (  # noqa: E402
    HERMES,
    LLAMA3,
    ToolCallStream,
    normalize_tool_choice,
    normalize_tools,
    parse_tool_calls,
    render_chat,
    tool_call_constraint,
    tool_style,
)
from zili.tokenizer import Tokenizer  # noqa: E402

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 12},
                                                "unit": {"enum": ["C", "F"]}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"]}}}
NOARGS = {"type": "function", "function": {"name": "ping"}}
TOOLS = [WEATHER, TIME, NOARGS]

QWEN_LIKE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>"
    "<|im_end|>\n{% endif %}{% for m in messages %}{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ m.content }}\n</tool_response><|im_end|>\n{% elif m.tool_calls %}<|im_start|>assistant\n"
    "{% for c in m.tool_calls %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n"
    "{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
]


def tokenizer_with(template: str) -> Tokenizer:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    return Tokenizer(Backend(models.BPE(vocab={"a": 0}, merges=[])), chat_template=template)


# ---- rendering ---------------------------------------------------------------------------------

def test_fallback_template_renders_tools_calls_and_results():
    tok = tokenizer_with(PLAIN)
    assert tool_style(tok) == HERMES
    text = render_chat(tok, CONVERSATION, tools=TOOLS)
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou are a function calling AI model")
    assert json.dumps(WEATHER) in text and "<tools>" in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n' \
           '</tool_call><|im_end|>' in text
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>' in text
    assert text.endswith("<|im_start|>assistant\n")


def test_native_template_gets_tools_and_argument_objects():
    tok = tokenizer_with(QWEN_LIKE)
    text = render_chat(tok, CONVERSATION, tools=TOOLS)
    assert "# Tools" in text and "You are a function calling AI model" not in text
    # the template tojson's the arguments: an object, not a doubly encoded string
    assert '"arguments": {"city": "Paris"}}' in text
    assert "<tool_response>\n{\"temp\": 21}\n</tool_response>" in text


def test_tool_style_detection():
    assert tool_style(tokenizer_with(QWEN_LIKE)) == HERMES
    llama = "{% if tools %}...{% endif %}<|start_header_id|>ipython<|end_header_id|><|python_tag|>"
    assert tool_style(tokenizer_with(llama)) == LLAMA3


@pytest.mark.parametrize("tools, message", [
    ([{"type": "retrieval"}], "type 'function'"),
    ([{"type": "function", "function": {"name": "has space"}}], "name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}], r"tools\[0\].function.parameters"),
    ([WEATHER, WEATHER], "more than once"),
])
def test_bad_tools_are_rejected(tools, message):
    with pytest.raises(ValueError, match=message):
        normalize_tools(tools)


def test_tool_choice_forms():
    tools = normalize_tools(TOOLS)
    assert normalize_tool_choice(None, tools) == "auto"
    assert normalize_tool_choice(None, []) == "none"
    assert normalize_tool_choice("required", tools) == "required"
    assert normalize_tool_choice({"type": "function", "function": {"name": "get_time"}}, tools) == "get_time"
    for bad in ["always", {"type": "function", "function": {"name": "nope"}}, {"type": "function"}]:
        with pytest.raises(ValueError, match="tool_choice"):
            normalize_tool_choice(bad, tools)
    with pytest.raises(ValueError, match="at least one tool"):
        normalize_tool_choice("required", [])
    assert tool_call_constraint(tools, "auto") is None and tool_call_constraint(tools, "none") is None


# ---- parsing -------------------------------------------------------------------------------------

HERMES_CASES = [
    ("Just text, no calls.", "Just text, no calls.", []),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', None,
     [("get_weather", {"city": "Oslo"})]),
    ('Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\n'
     '<tool_call>{"name": "ping", "arguments": {}}</tool_call>', "Let me check.",
     [("get_time", {"zone": "UTC"}), ("ping", {})]),
    ('<tool_call>\n{"name": "ping", "arguments": "{}"}', None, [("ping", {})]),  # unterminated, string args
    ("<tool_call>\n{broken json\n</tool_call>", "<tool_call>\n{broken json\n</tool_call>", []),
    ('Sure.<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "get_ti', "Sure.",
     [("ping", {})]),  # the second call was cut off by max_tokens
    ("a < b and <tool", "a < b and <tool", []),
]
LLAMA3_CASES = [
    ("The answer is 4.", "The answer is 4.", []),
    ('{"name": "get_weather", "parameters": {"city": "Rome", "unit": "C"}}', None,
     [("get_weather", {"city": "Rome", "unit": "C"})]),
    ('<|python_tag|>{"name": "ping", "parameters": {}}; {"name": "get_time", "arguments": {"zone": "CET"}}', None,
     [("ping", {}), ("get_time", {"zone": "CET"})]),
    ('{"not": "a call"}', '{"not": "a call"}', []),
]


def _calls(parsed):
    return [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


@pytest.mark.parametrize("style, text, content, calls",
                         [(HERMES, *c) for c in HERMES_CASES] + [(LLAMA3, *c) for c in LLAMA3_CASES])
def test_parse_and_stream_agree(style, text, content, calls):
    parsed = parse_tool_calls(text, style)
    assert parsed.content == content and _calls(parsed) == calls
    assert all(c.id.startswith("call_") for c in parsed.tool_calls)
    rng = random.Random(0)
    for _ in range(5):  # random chunkings
        stream, streamed, deltas, i = ToolCallStream(style), "", [], 0
        while i < len(text):
            j = i + rng.randint(1, 7)
            piece, new = stream.feed(text[i:j])
            streamed, deltas, i = streamed + piece, deltas + new, j
        piece, new = stream.finish()
        streamed, deltas = streamed + piece, deltas + new
        assert streamed == (content or "")
        assert _assemble(deltas) == calls


def _assemble(deltas: list[dict]) -> list[tuple[str, dict]]:
    calls: dict[int, dict] = {}
    for d in deltas:
        call = calls.setdefault(d["index"], {"name": "", "arguments": ""})
        if "id" in d:
            assert d["type"] == "function" and d["id"].startswith("call_")
        call["name"] += d["function"].get("name", "")
        call["arguments"] += d["function"].get("arguments", "")
    return [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]


# ---- constrained calls ---------------------------------------------------------------------------

def test_required_and_named_calls_always_parse(tiny_dir):
    from tests.unit.test_structured import make_llm

    llm = make_llm(tiny_dir)
    tools = normalize_tools(TOOLS)
    by_name = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in tools}
    cases = [("required", True), ("required", False), ("get_time", True)]
    params = [SamplingParams(temperature=1.0, max_tokens=120, n=4, seed=i,
                             structured=tool_call_constraint(tools, choice, parallel))
              for i, (choice, parallel) in enumerate(cases)]
    prompt = "Call a tool:"  # (the rendered tool listing outgrows the tiny model's 512-token context)
    outputs = llm.generate([prompt] * len(cases), params)
    finished = 0
    for (choice, parallel), out in zip(cases, outputs):
        for c in out.outputs:
            if c.finish_reason != "stop":
                continue
            finished += 1
            parsed = parse_tool_calls(c.text, tool_style(llm.tokenizer))
            assert parsed.tool_calls and parsed.content is None, c.text
            assert parallel or len(parsed.tool_calls) == 1
            for call in parsed.tool_calls:
                assert choice == "required" or call.name == choice
                jsonschema.validate(json.loads(call.arguments), by_name[call.name])
    assert finished >= 6


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.tiny_models import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-tools"))
