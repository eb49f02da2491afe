"""The chat format's reasoning split (zili.server.formats) fed engine deltas directly: tool calls are
parsed from the answer only (look-alikes inside the thinking are ignored, streamed or not), and
chat_template_kwargs / an earlier turn's reasoning_content reach the template (zili.server.inputs)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tests.reasoning_model import r1_tokenizer
from zili.server import protocol as p
from zili.server.errors import APIError
from zili.server.formats import ChatFormat, ReasoningSetup
from zili.server.generation import ChoiceDelta
from zili.server.inputs import render_chat
from zili.server.metrics import ServerMetrics
from zili.structured.tools import HERMES
from zili.tokenizer import Tokenizer

FAKE_CALL = '<tool_call>\n{"name": "rm", "arguments": {"path": "/"}}\n</tool_call>'
REAL_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
PIECES = ["<think>\nI could write ", FAKE_CALL[:15], FAKE_CALL[15:], " but no.\n</th", "ink>\n\n", REAL_CALL]


class _Engine:
    def stats(self):
        return None


def _format(tool_style: str | None) -> ChatFormat:
    state = SimpleNamespace(metrics=ServerMetrics(_Engine(), "m"), token_str=str)
    gen = SimpleNamespace(num_choices=1, request_id="chatcmpl-1",
                          usage=lambda: p.Usage(prompt_tokens=3, completion_tokens=len(PIECES), total_tokens=9))
    return ChatFormat(state, gen, None, tool_style=tool_style, reasoning=ReasoningSetup("deepseek-r1", "x", None))


def _deltas() -> list[ChoiceDelta]:
    return [ChoiceDelta(0, text, [i], None, "stop" if i == len(PIECES) - 1 else None) for i, text in enumerate(PIECES)]


def test_tool_calls_come_from_the_answer_only():
    fmt = _format(HERMES)
    for delta in _deltas():
        fmt.add(delta)
    choice = fmt.response("m").choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "\nI could write " + FAKE_CALL + " but no.\n"
    assert [json.loads(c.function.arguments) for c in choice.message.tool_calls] == [{"a": 1, "b": 2}]
    assert [c.function.name for c in choice.message.tool_calls] == ["add"]
    assert choice.message.content is None  # "\n\n" before the call is trimmed as tool parsing does


def test_streamed_tool_calls_skip_the_thinking_too():
    fmt = _format(HERMES)
    chunks = [fmt.chunk_choice(d) for d in _deltas()]
    reasoning = "".join(c["delta"].get("reasoning_content", "") for c in chunks)
    calls = [call for c in chunks for call in c["delta"].get("tool_calls", [])]
    assert FAKE_CALL in reasoning and "rm" not in json.dumps(calls)
    assert [call["function"]["name"] for call in calls] == ["add"] and chunks[-1]["finish_reason"] == "tool_calls"
    assert fmt.usage().completion_tokens_details.reasoning_tokens == 5  # through the piece closing </think>


def test_without_tools_the_answer_keeps_its_text():
    fmt = _format(None)
    for delta in _deltas():
        fmt.add(delta)
    message = fmt.response("m").choices[0].message
    assert message.content == "\n\n" + REAL_CALL and message.tool_calls is None


QWEN3_LIKE = (  # the parts of Qwen3's template that matter here (it takes tools, so messages pass whole)
    "{% if tools %}{{ tools | length }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
    "{% if m.role == 'assistant' and m.reasoning_content is defined %}{{ '<think>' + m.reasoning_content + "
    "'</think>' }}{% endif %}{{ m.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% endif %}{% endif %}")


def _state(template: str | None = None):
    tok = r1_tokenizer()
    if template is not None:
        tok = Tokenizer(tok.backend, bos_token=tok.bos_token, eos_token=tok.eos_token, chat_template=template)
    return SimpleNamespace(tokenizer=tok)


def _messages(*dicts) -> list[p.ChatMessage]:
    return [p.ChatMessage(**d) for d in dicts]


def test_chat_template_kwargs_and_history_reasoning_reach_the_template():
    history = _messages({"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4", "reasoning_content": "add them"},
                        {"role": "user", "content": "3+3?"})
    off = render_chat(_state(QWEN3_LIKE), history, chat_template_kwargs={"enable_thinking": False})
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "<think>add them</think>4" in off  # this template chooses to show earlier thinking
    on = render_chat(_state(QWEN3_LIKE), history)
    assert on.endswith("<|im_start|>assistant\n")
    r1 = render_chat(_state(), history)  # the R1 template leaves earlier thinking out
    assert "add them" not in r1 and r1.endswith("<｜Assistant｜>")
    with pytest.raises(APIError) as err:
        render_chat(_state(QWEN3_LIKE), history, chat_template_kwargs={"bos_token": "x"})
    assert err.value.param == "chat_template_kwargs"
