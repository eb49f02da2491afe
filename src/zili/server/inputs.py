"""From an OpenAI request to an engine request: prompt token ids and SamplingParams.

What only the HTTP layer knows is checked here (message shapes, server caps, parameter pairs, the
chat template); what the engine knows (context length, vocabulary, grammars) is checked once by
`Engine.prepare` when the request is queued (zili.server.generation maps its errors). Either way a
client's mistake becomes a 400 that names the parameter.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from zili.sampling import SamplingParams, SamplingParamsError
from zili.server import protocol as p
from zili.server.client_text import require_valid_unicode
from zili.server.errors import bad_request

if TYPE_CHECKING:
    from zili.server.state import ServerState


# Below this a temperature is treated as greedy: dividing logits by it would overflow.
_MIN_TEMPERATURE = 1e-5
LEGACY_DEFAULT_MAX_TOKENS: int | None = SamplingParams.max_tokens  # the dataclass default (legacy completions)


# Template variables the server sets itself: chat_template_kwargs may not replace them.
_RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "tokenizer", "tools", "documents", "add_generation_prompt",
                                          "bos_token",
                                          "eos_token", "unk_token", "pad_token"})


def render_chat(state: ServerState, messages: list[p.ChatMessage], add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None,
                chat_template_kwargs: dict[str, Any] | None = None, continue_final_message: bool = False) -> str:
    """The prompt text: messages (an assistant turn's reasoning_content handed to the template, which
    decides whether to show it) and chat_template_kwargs (e.g. enable_thinking) through the template.
    continue_final_message (assistant prefill, vLLM's and transformers' flag): the text ends where the
    final assistant message's content ends, so the model continues it."""
    from zili.structured.tools import render_chat as render_with_tools

    if continue_final_message:
        _check_continuable(messages, add_generation_prompt)
    reserved = sorted(_RESERVED_TEMPLATE_VARIABLES & set(chat_template_kwargs or {}))
    if reserved:
        raise bad_request(f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs")

    conversation = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, p.TextContentPart):
                    what = "needs a 'text' string" if part.type == "text" else "is not supported (only 'text')"
                    raise bad_request(f"message content part of type {part.type!r} {what}", param="messages")
                texts.append(part.text)
            content = "\n".join(texts)
        entry: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                                 "content": content or ""}
        if message.name:
            entry["name"] = message.name
        if message.tool_calls:  # structured output: assistant tool calls and tool results round-trip
            entry["tool_calls"] = [call.model_dump(exclude_none=True) for call in message.tool_calls]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        if message.reasoning_content is not None and message.role == "assistant":
            entry["reasoning_content"] = message.reasoning_content
        conversation.append(entry)
    # Prefill: mark where the final message's text ends, render, and cut there (what follows is the
    # template's end-of-turn). A random marker cannot collide with the client's own text.
    marker = f"<zili-continue-{uuid.uuid4().hex}>" if continue_final_message else ""
    if marker:
        conversation[-1]["content"] += marker
    try:
        text = render_with_tools(state.tokenizer, conversation, tools, add_generation_prompt=add_generation_prompt,
                                 **(chat_template_kwargs or {}))
    except Exception as exc:  # noqa: BLE001 - templates raise anything (jinja2 errors, raise_exception)
        raise bad_request(f"the model's chat template rejected these messages: {exc}", param="messages") from exc
    if marker:
        if marker not in text:
            raise bad_request("continue_final_message: the model's chat template does not render the final "
                              "message's content, so it cannot be continued", param="continue_final_message")
        text = text[:text.rindex(marker)]
    return text


def _check_continuable(messages: list[p.ChatMessage], add_generation_prompt: bool) -> None:
    if add_generation_prompt:
        raise bad_request("continue_final_message and add_generation_prompt cannot both be true: set "
                          "add_generation_prompt to false to continue the final message",
                          param="continue_final_message")
    if messages[-1].role != "assistant":
        raise bad_request(f"continue_final_message needs the final message to be an assistant message, "
                          f"not {messages[-1].role!r}", param="continue_final_message")


def encode(state: ServerState, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
    try:
        return state.tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except (TypeError, UnicodeError) as exc:  # e.g. a lone surrogate ("\ud800") from a JSON escape
        raise bad_request(f"{param} is not valid Unicode text: {exc}", param=param) from exc


def completion_prompts(state: ServerState, prompt: Any) -> list[list[int]]:
    """The prompt field (str, [str], [int] or [[int]]) as token-id lists, one per prompt."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", param="prompt")
    if all(isinstance(x, int) for x in prompt):
        prompt = [prompt]
    return [encode(state, item, "prompt") if isinstance(item, str) else list(item) for item in prompt]


def check_token_ids(state: ServerState, ids: list[int], param: str) -> None:
    """400 naming `param` unless every id is in the vocabulary (for /detokenize: no engine request)."""
    vocab = state.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary [0, {vocab})", param=param)


# ----- sampling parameters -----


def resolve_max_tokens(state: ServerState, requested: int | None, prompt_len: int, default: int | None,
                       param: str) -> int | None:
    """The max_tokens to run with: the request's (within --max-tokens-cap), else the smallest of the
    endpoint's default, the cap and the room the context leaves (None: let the engine fill the
    context). Whether the prompt fits is the engine's check (`Engine.prepare`)."""
    cap = state.settings.max_tokens_cap
    if requested is None:
        room = state.max_model_len - prompt_len
        if room < 1:
            return None  # the prompt alone is too long: the engine says so, naming the prompt
        return min(x for x in (default, room, cap) if x is not None)
    if not isinstance(requested, int) or requested < 1:
        raise bad_request(f"{param} must be an integer >= 1, got {requested!r}", param=param)
    if cap is not None and requested > cap:
        raise bad_request(f"{param} ({requested}) exceeds this server's cap of {cap} (--max-tokens-cap)",
                          param=param)
    return requested


def sampling_params(state: ServerState, req: p._SamplingFields, *, max_tokens: int | None,
                    logprobs: int | None, rename: dict[str, str] | None = None,
                    structured: Any = None) -> SamplingParams:
    if not 1 <= req.n <= state.settings.max_n:
        raise bad_request(f"n must be between 1 and {state.settings.max_n} on this server, got {req.n}", param="n")
    kwargs: dict[str, Any] = {"n": req.n, "max_tokens": max_tokens, "logprobs": logprobs,
                              "ignore_eos": req.ignore_eos, "structured": structured}
    for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                 "repetition_penalty", "min_tokens"):
        value = getattr(req, name)
        if value is not None:
            kwargs[name] = value
    if req.stop is not None:
        kwargs["stop"] = req.stop
    temperature = kwargs.get("temperature")
    if temperature is not None and 0 <= temperature < _MIN_TEMPERATURE:
        kwargs["temperature"] = 0.0
    top_k = kwargs.get("top_k")
    if isinstance(top_k, int) and top_k >= state.vocab_size:
        kwargs["top_k"] = -1  # keeping the whole vocabulary is no top-k at all
    if req.logit_bias:
        kwargs["logit_bias"] = _logit_bias(req.logit_bias)
    if req.stop_token_ids:
        kwargs["stop_token_ids"] = list(req.stop_token_ids)
    try:
        return SamplingParams(**kwargs)
    except SamplingParamsError as exc:
        param = (rename or {}).get(exc.field, exc.field)
        raise bad_request(f"{param} {exc.reason}", param=param) from exc
    except (TypeError, ValueError) as exc:
        raise bad_request(str(exc)) from exc


def _logit_bias(bias: dict[str, float]) -> dict[int, float]:
    """OpenAI's string keys as token ids (their range is the engine's check)."""
    out = {}
    for key, value in bias.items():
        try:
            out[int(key)] = value
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
    return out


# ----- structured output and tools (zili.structured) -----


def chat_tools(req: p.ChatCompletionRequest) -> tuple[list[dict[str, Any]], str]:
    """The request's tools (checked) and its tool_choice: "none", "auto", "required" or a function name."""
    from zili.structured.tools import normalize_tool_choice, normalize_tools

    given = [t.model_dump(exclude_none=True) for t in req.tools or []]
    require_valid_unicode(given, "tools")
    try:
        tools = normalize_tools(given)
    except ValueError as exc:
        raise bad_request(str(exc), param="tools") from exc
    choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, p.NamedToolChoice) else req.tool_choice
    try:
        return tools, normalize_tool_choice(choice, tools)
    except ValueError as exc:
        raise bad_request(str(exc), param="tool_choice") from exc


def structured_output(req: p._SamplingFields, tools: list[dict[str, Any]] | None = None, tool_choice: str = "none",
                      tool_style: str = "hermes", parallel_tool_calls: bool = True) -> tuple[Any, str | None]:
    """The StructuredOutput a request asks for (or None) and the parameter it came from.

    At most one source: response_format (json_object / json_schema), structured_outputs, or a
    tool_choice that forces calls ("required" or a named function)."""
    from zili.structured.spec import StructuredOutput
    from zili.structured.tools import tool_call_constraint

    sources = []
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        if tools and tool_choice != "none":  # OpenAI takes both: the format binds the final text answer
            return _tools_with_response_format(fmt, tools, tool_choice, tool_style, parallel_tool_calls)
        sources.append("response_format")
    if req.structured_outputs is not None:
        sources.append("structured_outputs")
    if tools and tool_choice not in ("none", "auto"):
        sources.append("tool_choice")
    if len(sources) > 1:
        raise bad_request(f"{' and '.join(sources)} cannot be combined: each constrains the whole output",
                          param=sources[1])
    if not sources:
        return None, None
    param = sources[0]
    if param != "tool_choice":
        require_valid_unicode(getattr(req, param).model_dump(by_alias=True, exclude_none=True), param)
    try:  # each source was listed above only when present
        if param == "response_format":
            assert fmt is not None
            if fmt.type == "json_object":
                return StructuredOutput.json_object(), param
            schema = _answer_schema(fmt)  # refuses a json_schema format without its schema
            assert fmt.json_schema is not None
            return StructuredOutput.json(schema, strict=fmt.json_schema.strict), param
        if param == "structured_outputs":
            assert req.structured_outputs is not None
            given = req.structured_outputs.model_dump(by_alias=True, exclude_none=True)
            return StructuredOutput.parse(given), param
        assert tools is not None
        return tool_call_constraint(tools, tool_choice, parallel_tool_calls, tool_style), param
    except ValueError as exc:
        raise bad_request(f"{param}: {exc}", param=param) from exc


WARNINGS_HEADER = "zili-warnings"


def note_approximations(request: Any, structured: Any) -> None:
    """Say, in the `zili-warnings` response header, where the grammar is looser than a JSON schema
    the request gave (zili.structured.approximations): the output then has the schema's shape but
    may break those keywords. Under strict: true such a schema was refused instead."""
    from zili.structured.approximations import approximations

    if structured is None or structured.kind not in ("json", "structural_tag"):
        return
    schemas = [structured.schema()] if structured.kind == "json" else _tag_schemas(json.loads(structured.spec))
    found = [str(a) for schema in schemas for a in approximations(schema, limit=8)]
    if found:
        text = "; ".join(found[:8]) + (f"; and {len(found) - 8} more" if len(found) > 8 else "")
        request.state.zili_warnings = json.dumps(text, ensure_ascii=True)[1:-1][:2000]  # header-safe ASCII


def _tag_schemas(node: Any) -> list[Any]:
    """The JSON schemas inside a structural tag (tool parameters, a response_format's answer)."""
    if isinstance(node, list):
        return [s for item in node for s in _tag_schemas(item)]
    if not isinstance(node, dict):
        return []
    if node.get("type") == "json_schema" and "json_schema" in node:
        return [node["json_schema"]]
    return [s for item in node.values() for s in _tag_schemas(item)]


def _answer_schema(fmt: p.ResponseFormat) -> dict[str, Any]:
    """The JSON schema a json_object / json_schema response_format asks the answer to match."""
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ValueError("a json_schema response_format needs json_schema.schema")
    return fmt.json_schema.schema_


def _tools_with_response_format(fmt: p.ResponseFormat, tools: list[dict[str, Any]], tool_choice: str,
                                tool_style: str, parallel_tool_calls: bool) -> tuple[Any, str]:
    """tools and a response_format together: with tool_choice "auto" the output is tool calls or an
    answer matching the format; "required" or a named function forces calls in this turn (the format
    binds the answer the model gives after the tool results)."""
    from zili.structured.tools import tool_call_constraint, tool_call_or_answer

    require_valid_unicode(fmt.model_dump(by_alias=True, exclude_none=True), "response_format")
    try:
        schema = _answer_schema(fmt)
        if tool_choice == "auto":
            strict = fmt.json_schema.strict if fmt.json_schema is not None else None
            return tool_call_or_answer(tools, schema, parallel_tool_calls, tool_style, strict), "response_format"
        from zili.structured.spec import check_json_schema

        check_json_schema(schema)  # refused now, not only in the turn that needs it
    except ValueError as exc:
        raise bad_request(f"response_format: {exc}", param="response_format") from exc
    return tool_call_constraint(tools, tool_choice, parallel_tool_calls, tool_style), "tool_choice"
