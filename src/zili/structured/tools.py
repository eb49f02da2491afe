"""Tool calling: tool definitions into the prompt, tool calls out of the model's text.

Two output styles are understood:
- "hermes" (Hermes, Qwen 2.5/3, and our fallback template):
  <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>, one block per call;
- "llama3" (Llama 3.1+ JSON tool calls): {"name": "f", "parameters": {...}}, several separated by ";".

A chat template that takes no `tools` gets them through a fallback: a system message that lists
them in the Hermes style, assistant tool calls rendered as <tool_call> blocks, and tool results
as <tool_response> blocks in a user turn. With tool_choice "required" or a named function the
output is constrained (an xgrammar structural tag) to well-formed calls whose arguments match
each function's parameter schema, so they always parse.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from zili.structured.spec import StructuredOutput, as_json_schema_reads, check_exact, check_json_schema

HERMES, LLAMA3 = "hermes", "llama3"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_TOOL_CALL_OPEN, _TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"

FALLBACK_SYSTEM = (
    "You are a function calling AI model. You may call one or more functions to assist with the user query. "
    "Here are the available functions, as JSON signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n"
    "For each function call, return a JSON object with the function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n"
    "</tool_call>"
)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object, as OpenAI's API carries it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedToolOutput:
    content: str | None
    tool_calls: list[ToolCall]


# ---- tool definitions and tool_choice ---------------------------------------------------------

def normalize_tools(tools: Sequence[Any] | None) -> list[dict[str, Any]]:
    """Check OpenAI-shaped tools ({"type": "function", "function": {name, description, parameters}})
    and return them as plain dicts. ValueError names the first problem."""
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools or []):
        tool = _plain(tool)
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ValueError(f"tools[{i}]: only tools of type 'function' are supported")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not _NAME.match(fn["name"]):
            raise ValueError(f"tools[{i}].function.name must be 1-64 characters of a-z, A-Z, 0-9, '_', '-' or '.'")
        params = fn.get("parameters")
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise ValueError(f"tools[{i}].function.strict must be true, false or null")
        if params is not None:
            if not isinstance(params, dict):
                raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
            try:
                check_json_schema(params)
                if strict:  # OpenAI's strict function calling: the arguments must match exactly
                    check_exact(params)
            except ValueError as e:
                raise ValueError(f"tools[{i}].function.parameters: {e}") from None
        fn = {k: v for k, v in fn.items() if v is not None}
        out.append({"type": "function", "function": fn})
    names = [t["function"]["name"] for t in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"tools: function name(s) defined more than once: {', '.join(dupes)}")
    return out


def normalize_tool_choice(tool_choice: Any, tools: list[dict[str, Any]]) -> str:
    """"none" | "auto" | "required" | the name of one function (from {"type": "function", "function": {"name"}})."""
    tool_choice = _plain(tool_choice)
    if tool_choice is None:
        return "auto" if tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {tool_choice!r}")
        if tool_choice != "none" and not tools:
            raise ValueError(f"tool_choice {tool_choice!r} needs at least one tool in `tools`")
        return tool_choice
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str):
        raise ValueError("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                         "\"function\": {\"name\": ...}}")
    if name not in {t["function"]["name"] for t in tools}:
        raise ValueError(f"tool_choice names function {name!r}, which is not among the tools")
    return name


def tool_style(tokenizer: Any) -> str:
    """Which output style the model's chat template asks for (the fallback template is Hermes)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if _TOOL_CALL_OPEN in template or not template_supports_tools(tokenizer):
        return HERMES
    if _PYTHON_TAG in template or "ipython" in template or "<|start_header_id|>" in template:
        return LLAMA3
    return HERMES


def template_supports_tools(tokenizer: Any) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def tool_call_constraint(tools: list[dict[str, Any]], tool_choice: str, parallel_tool_calls: bool = True,
                         style: str = HERMES) -> StructuredOutput | None:
    """The structural tag forcing well-formed calls for "required" or a named function; None otherwise."""
    if tool_choice in ("none", "auto"):
        return None
    chosen = [t for t in tools if tool_choice == "required" or t["function"]["name"] == tool_choice]
    tags = []
    for tool in chosen:
        fn = tool["function"]
        schema = _as_compiled(fn.get("parameters") or {"type": "object"}, fn.get("strict"))
        name = json.dumps(fn["name"])
        if style == LLAMA3:
            begin, end = f'{{"name": {name}, "parameters": ', "}"
        else:
            begin, end = f'{_TOOL_CALL_OPEN}\n{{"name": {name}, "arguments": ', f"}}\n{_TOOL_CALL_CLOSE}"
        tags.append({"type": "tag", "begin": begin, "end": end,
                     "content": {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1}})
    separator = "; " if style == LLAMA3 else "\n"
    fmt = {"type": "tags_with_separator", "tags": tags, "separator": separator, "at_least_one": True,
           "stop_after_first": not parallel_tool_calls or tool_choice != "required"}
    return StructuredOutput.structural_tag({"type": "structural_tag", "format": fmt})


def tool_call_or_answer(tools: list[dict[str, Any]], answer_schema: dict[str, Any], parallel_tool_calls: bool = True,
                        style: str = HERMES, answer_strict: bool | None = None) -> StructuredOutput:
    """tool_choice "auto" with a response_format: the output is either well-formed tool calls (as for
    "required") or a final answer matching `answer_schema` (OpenAI applies the response format to
    the model's text answer, not to its calls). An xgrammar structural tag "or" of the two.
    `answer_strict` is the response format's `strict`, read as for the tools' (`_as_compiled`)."""
    calls = tool_call_constraint(tools, "required", parallel_tool_calls, style)
    assert calls is not None  # "required" always constrains
    check_json_schema(answer_schema)
    if answer_strict:
        check_exact(answer_schema)
    answer = {"type": "json_schema", "json_schema": _as_compiled(answer_schema, answer_strict)}
    fmt = {"type": "or", "elements": [json.loads(calls.spec)["format"], answer]}
    return StructuredOutput.structural_tag({"type": "structural_tag", "format": fmt})


def _as_compiled(schema: dict[str, Any], strict: bool | None) -> dict[str, Any]:
    """The schema a structural tag should carry for a tool's (or an answer's) `strict`.

    xgrammar compiles a structural tag's schemas in strict mode always (only the listed properties
    and items). strict true: that is what was asked (and check_exact refused what it would only
    approximate); false: the schema as JSON Schema reads it (extra properties and items allowed unless
    forbidden); not given: strict mode where the schema allows it, else as JSON Schema reads it (a
    schema such as {"type": "array", "minItems": 1} has no strict reading), as response_format does."""
    if strict:
        return schema
    if strict is False or not _compiles_strictly(schema):
        return as_json_schema_reads(schema)
    return schema


def _compiles_strictly(schema: dict[str, Any]) -> bool:
    # Imported here: the backend loads xgrammar, which the prompt-only paths of this module do not need.
    from zili.structured.backend import json_schema_grammar

    try:
        json_schema_grammar(json.dumps(schema), strict=True)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


# ---- prompts ------------------------------------------------------------------------------------

def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None,
                add_generation_prompt: bool = True, **kwargs: Any) -> str:
    """The prompt text for a conversation that may carry tools, tool calls and tool results."""
    plain: list[dict[str, Any]] = [_plain(m) for m in messages]
    tools = normalize_tools(tools) if tools else None
    if template_supports_tools(tokenizer):
        return tokenizer.apply_chat_template([_native_message(m) for m in plain],
                                             add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)
    return tokenizer.apply_chat_template(_fallback_messages(plain, tools),
                                         add_generation_prompt=add_generation_prompt, **kwargs)


def _native_message(message: dict[str, Any]) -> dict[str, Any]:
    """Templates index tool_calls[i].function.arguments as an object (then `| tojson` it)."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    fixed = []
    for call in calls:
        fn = dict(call.get("function", {}))
        fn["arguments"] = _arguments_object(fn.get("arguments"))
        fixed.append({**call, "function": fn})
    return {**message, "tool_calls": fixed, "content": message.get("content") or ""}


def _fallback_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if tools:
        listing = FALLBACK_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if messages and messages[0].get("role") == "system":
            listing = f"{_text(messages[0].get('content'))}\n\n{listing}"
            messages = messages[1:]
        out.append({"role": "system", "content": listing})
    for m in messages:
        role = m.get("role")
        if role == "tool":
            block = f"<tool_response>\n{_text(m.get('content'))}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
            continue
        content = _text(m.get("content"))
        if role == "assistant" and m.get("tool_calls"):
            blocks = [f"{_TOOL_CALL_OPEN}\n" + json.dumps(
                {"name": c.get("function", {}).get("name"), "arguments": _arguments_object(
                    c.get("function", {}).get("arguments"))}, ensure_ascii=False) + f"\n{_TOOL_CALL_CLOSE}"
                for c in m["tool_calls"]]
            content = "\n".join([content, *blocks] if content else blocks)
        out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool_results", None)
    return out


def _text(content: Any) -> str:
    """Message content as text: a string, None, or OpenAI content parts [{"type": "text", "text"}]."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def _arguments_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments if arguments is not None else {}


def _plain(value: Any) -> Any:
    if callable(getattr(value, "model_dump", None)):
        return value.model_dump(exclude_none=True)
    return value


# ---- parsing ------------------------------------------------------------------------------------

def parse_tool_calls(text: str, style: str = HERMES, truncated: bool = False) -> ParsedToolOutput:
    """Split a finished output into its text content and its tool calls. Text without a single
    well-formed call is returned as content, untouched; Hermes blocks that do not parse are dropped
    while the well-formed ones stand.

    truncated: the output was cut off (finish_reason "length"). A call it ends inside is returned
    too, as OpenAI returns one: its name and the `arguments` text written so far (not valid JSON),
    and the markup is never returned as content."""
    parse = _parse_llama3 if style == LLAMA3 else _parse_hermes
    cut = _unfinished_call(text, style) if truncated else None
    if cut is None:
        return parse(text)
    start, call = cut
    before = parse(text[:start])  # the calls completed before the cut one, and the content before them
    calls = [*before.tool_calls, *([call] if call is not None else [])]
    if before.tool_calls:
        return ParsedToolOutput(before.content, calls)
    content = text[:start].rstrip()
    return ParsedToolOutput(content if content.strip() not in ("", _PYTHON_TAG) else None, calls)


# The start of a call object, possibly cut anywhere after its name began: {"name": "f", "arguments": ...
_CALL_PREFIX = re.compile(r'\{\s*"name"\s*:\s*"(?P<name>(?:[^"\\]|\\.)*\\?)'
                          r'(?:"\s*(?:,\s*(?:"(?:arguments|parameters)"\s*:\s*(?P<args>.*)|.*))?)?\Z', re.DOTALL)


def _unfinished_call(text: str, style: str) -> tuple[int, ToolCall | None] | None:
    """(where the call starts in `text`, the call) for a call the text ends inside, else None. The
    call is None when the text ends before the function's name began (nothing to return but its start)."""
    if style == LLAMA3:
        body = text.lstrip()
        if body.startswith(_PYTHON_TAG):
            body = body[len(_PYTHON_TAG):].lstrip()
        if not body.startswith("{"):
            return None
        decoder, pos = json.JSONDecoder(), 0
        while pos < len(body):
            try:
                _, pos = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                break
            while pos < len(body) and body[pos] in "; \n\t\r":
                pos += 1
        else:
            return None  # every object is complete
        start, rest = len(text) - len(body) + pos, body[pos:]
    else:
        start = text.rfind(_TOOL_CALL_OPEN)
        if start == -1 or text.find(_TOOL_CALL_CLOSE, start) != -1:
            return None
        rest = text[start + len(_TOOL_CALL_OPEN):].strip()
        try:
            json.loads(rest)
            return None  # a whole object, only its closing tag missing: a complete call
        except json.JSONDecodeError:
            pass
    rest = rest.lstrip()
    match = _CALL_PREFIX.match(rest)
    if match is None:
        opening = re.sub(r"\s+", "", rest)
        return (start, None) if '{"name":"'.startswith(opening) else None
    name = match.group("name")
    try:
        name = json.loads(f'"{name}"')
    except json.JSONDecodeError:  # cut inside an escape: keep the raw characters
        pass
    return start, ToolCall(name, match.group("args") or "")


def _call_from_object(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _parse_hermes(text: str) -> ParsedToolOutput:
    start = text.find(_TOOL_CALL_OPEN)
    if start == -1:
        return ParsedToolOutput(text, [])
    calls = []
    for block in _HERMES_BLOCK.finditer(text, start):
        try:
            call = _call_from_object(json.loads(block.group(1)))
        except json.JSONDecodeError:
            call = None
        if call is not None:  # a malformed or cut-off block is dropped (streaming cannot take back earlier calls)
            calls.append(call)
    if not calls:
        return ParsedToolOutput(text, [])
    content = text[:start].rstrip()  # (leading space kept, so streamed content can match)
    return ParsedToolOutput(content if content.strip() else None, calls)


def _parse_llama3(text: str) -> ParsedToolOutput:
    body = text.strip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG):].lstrip()
    if not body.startswith("{"):
        return ParsedToolOutput(text, [])
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while pos < len(body):
        try:
            obj, pos = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            return ParsedToolOutput(text, [])
        call = _call_from_object(obj)
        if call is None:
            return ParsedToolOutput(text, [])
        calls.append(call)
        while pos < len(body) and body[pos] in "; \n\t\r":
            pos += 1
    return ParsedToolOutput(None, calls)


class ToolCallStream:
    """Incremental parsing for streamed output: feed each new text piece, get back the content to
    show now and OpenAI `delta.tool_calls` entries. Text that could still begin a tool call (and,
    for Hermes, whitespace that would be trimmed before one) is held back. The concatenated content
    and the calls equal what `parse_tool_calls` gives for the full text.
    """

    def __init__(self, style: str = HERMES) -> None:
        self.style = style
        self.text = ""
        self.content_sent = 0  # characters of self.text released as content
        self.calls_sent = 0
        self.in_calls = False

    def feed(self, piece: str) -> tuple[str, list[dict[str, Any]]]:
        self.text += piece
        if self.in_calls:
            return "", self._complete_hermes_calls() if self.style == HERMES else []
        if self.style == LLAMA3:
            body = self.text.lstrip()
            if not body or _PYTHON_TAG.startswith(body):
                return "", []  # could still become a call
            if self.content_sent == 0 and body.startswith(("{", _PYTHON_TAG)):
                self.in_calls = True
                return "", []
            return self._release(len(self.text)), []
        start = self.text.find(_TOOL_CALL_OPEN)
        if start != -1:
            self.in_calls = True
            return self._release(len(self.text[:start].rstrip())), self._complete_hermes_calls()
        safe = len(self.text) - _partial_suffix(self.text, _TOOL_CALL_OPEN)
        return self._release(len(self.text[:safe].rstrip())), []

    def finish(self, truncated: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """At the end of the output: whatever is left, decided on the whole text (`truncated`: cut
        off by max_tokens, so a call it ends inside counts, as in `parse_tool_calls`)."""
        parsed = parse_tool_calls(self.text, self.style, truncated)
        if not parsed.tool_calls:  # all content; less when a cut-off call's markup was dropped (a prefix)
            return self._release(len(self.text) if parsed.content == self.text else len(parsed.content or "")), []
        return "", self._deltas(parsed.tool_calls)

    def _deltas(self, calls: list[ToolCall]) -> list[dict[str, Any]]:
        out = []
        for index in range(self.calls_sent, len(calls)):
            call = calls[index]
            out.append({"index": index, "id": call.id, "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments}})
        self.calls_sent = len(calls)
        return out

    def _complete_hermes_calls(self) -> list[dict[str, Any]]:
        closed = self.text.rfind(_TOOL_CALL_CLOSE)
        if closed == -1:
            return []
        parsed = _parse_hermes(self.text[:closed + len(_TOOL_CALL_CLOSE)])
        return self._deltas(parsed.tool_calls) if parsed.tool_calls else []

    def _release(self, upto: int) -> str:
        if upto <= self.content_sent:
            return ""
        piece = self.text[self.content_sent:upto]
        self.content_sent = upto
        return piece


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
