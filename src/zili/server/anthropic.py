"""Anthropic's Messages API, `POST /v1/messages`, on the same engine path as chat completions.

A Messages request is translated into the chat-completions request it means (system prompt,
content blocks, tool_use / tool_result blocks as assistant tool calls and tool messages,
`stop_sequences`, `tool_choice` auto / any / tool / none, a final assistant message as a prefill
to continue), run through the same chat template, validation, Generation and tool-call parsing,
and the result is rendered in Anthropic's shapes: a `message` object, or the streaming events
message_start, content_block_start / _delta / _stop (text_delta, input_json_delta), message_delta
and message_stop. Errors are Anthropic's `{"type": "error", "error": {"type", "message"}}`.
Keys come in `x-api-key` (Anthropic's header) or `Authorization: Bearer`; `anthropic-version` is
accepted and not required. Reference: https://docs.anthropic.com/en/api/messages and
https://docs.anthropic.com/en/api/messages-streaming.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from zili.engine.async_engine import EngineStepError, RequestAbortedError
from zili.server import protocol as p
from zili.server.auth import key_matches
from zili.server.client_text import require_valid_unicode
from zili.server.errors import APIError, escape_unencodable
from zili.server.formats import ChatFormat
from zili.server.generation import Generation
from zili.server.inputs import (
    chat_tools,
    encode,
    note_approximations,
    render_chat,
    resolve_max_tokens,
    sampling_params,
    structured_output,
)
from zili.server.serving import ClientDisconnected, until_disconnect
from zili.structured.tools import tool_style

router = APIRouter()

# HTTP status -> Anthropic's error type (https://docs.anthropic.com/en/api/errors).
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}
# Engine finish_reason -> stop_reason.
_STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use", "abort": "end_turn"}


# ----- request -----


class _Block(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class TextBlock(_Block):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool = False


class OtherBlock(BaseModel):
    """A block zili cannot read (image, document, thinking...): refused with a 400 naming its type."""

    model_config = ConfigDict(extra="allow")
    type: str


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | OtherBlock, Field(union_mode="left_to_right")]


class Message(_Block):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(_Block):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class ToolChoice(_Block):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class MessagesRequest(_Block):
    model: str
    max_tokens: int
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    metadata: dict[str, Any] | None = None


# ----- errors and keys -----


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Anthropic's error body."""
    kind = _ERROR_TYPES.get(status, "api_error")
    body = {"type": "error", "error": {"type": kind, "message": escape_unencodable(message)}}
    return JSONResponse(body, status_code=status, headers=headers)


async def authenticate(request: Request) -> None:
    """The key from `x-api-key` or `Authorization: Bearer`, checked as on the OpenAI routes."""
    state = request.app.state.zili
    token = request.headers.get("x-api-key")
    if token is None:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        token = credentials.strip() if scheme.lower() == "bearer" else None
    if state.governance is not None:
        client = request.client.host if request.client is not None else None
        await state.governance.authenticate(token, request.url.path, client)
        return
    keys: list[str] = state.settings.api_keys
    if keys and (token is None or not key_matches(token, keys)):
        raise APIError(401, "Missing or incorrect API key: send it as 'x-api-key: <key>'.")


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        where = ".".join(str(x) for x in e.get("loc", ())) or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(parts)


# ----- Messages -> chat completions -----


def _text(content: str | list[TextBlock] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(block.text for block in content)


def _unsupported(block: Any) -> APIError:
    return APIError(400, f"content blocks of type {json.dumps(block.type)} are not supported "
                         f"(text, tool_use and tool_result are)")


def _chat_messages(req: MessagesRequest) -> list[dict[str, Any]]:
    """The conversation as chat-completions messages (OpenAI's shapes)."""
    out: list[dict[str, Any]] = []
    if req.system is not None:
        out.append({"role": "system", "content": _text(req.system)})
    for message in req.messages:
        blocks = [TextBlock(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in blocks:
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolUseBlock) and message.role == "assistant":
                calls.append({"id": block.id, "type": "function",
                              "function": {"name": block.name, "arguments": json.dumps(block.input)}})
            elif isinstance(block, ToolResultBlock) and message.role == "user":
                result = _text(block.content)
                out.append({"role": "tool", "tool_call_id": block.tool_use_id,
                            "content": f"Error: {result}" if block.is_error else result})
            else:
                raise _unsupported(block)
        if texts or calls or message.role == "assistant":
            entry: dict[str, Any] = {"role": message.role, "content": "".join(texts) if texts else None}
            if calls:
                entry["tool_calls"] = calls
            out.append(entry)
    return out


def _chat_request(req: MessagesRequest) -> p.ChatCompletionRequest:
    """The chat-completions request a Messages request means. A final assistant message is a
    prefill: the answer continues it (Anthropic's semantics)."""
    prefill = req.messages[-1].role == "assistant"
    body: dict[str, Any] = {
        "model": req.model, "messages": _chat_messages(req), "max_tokens": req.max_tokens,
        "stop": req.stop_sequences, "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
        "continue_final_message": prefill, "add_generation_prompt": not prefill,
    }
    if req.tools:
        body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                           "parameters": t.input_schema}} for t in req.tools]
        choice = req.tool_choice
        if choice is not None:
            body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(
                choice.type, {"type": "function", "function": {"name": choice.name or ""}})
            body["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    elif req.tool_choice is not None and req.tool_choice.type != "none":
        raise APIError(400, "tool_choice needs tools")
    try:
        return p.ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise APIError(400, _validation_message(exc)) from exc


# ----- the route -----


@router.post("/v1/messages")
async def messages(request: Request) -> Response:
    """Anthropic Messages: a `message` object, or its event stream with `stream: true`."""
    try:
        await authenticate(request)
        try:
            req = MessagesRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise APIError(400, _validation_message(exc)) from exc
        if req.max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {req.max_tokens}")
        require_valid_unicode([t.input_schema for t in req.tools or []], "tools")
        response = await _answer(request, req)
    except APIError as exc:
        response = error_response(exc.status, exc.message, exc.headers)
    # Anthropic's header name for the request id (its SDK's `_request_id`); x-request-id is set too
    response.headers["request-id"] = getattr(request.state, "request_id", "") or ""
    return response


async def _answer(request: Request, req: MessagesRequest) -> Response:
    state = request.app.state.zili
    body = _chat_request(req)
    model = state.check_model(body.model)
    state.ready_engine()
    tools, choice = chat_tools(body)
    offered = tools if choice != "none" else None
    style = tool_style(state.tokenizer) if offered else None
    text = render_chat(state, body.messages, body.add_generation_prompt, tools=offered,
                       continue_final_message=body.continue_final_message)
    prompt = encode(state, text, "messages", add_special_tokens=False)
    max_tokens = resolve_max_tokens(state, body.max_tokens, len(prompt), None, "max_tokens")
    structured, structured_param = structured_output(body, tools, choice, style or "hermes", body.parallel_tool_calls)
    note_approximations(request, structured)
    params = sampling_params(state, body, max_tokens=max_tokens, logprobs=None, structured=structured,
                             rename={"stop": "stop_sequences"})
    names = {"prompt": "messages", "stop": "stop_sequences", "structured": structured_param or "tools"}
    gen = Generation(state, f"msg_{uuid.uuid4().hex}", [prompt], params, param_names=names)
    fmt = ChatFormat(state, gen, None, tool_style=style)
    await gen.start()
    if req.stream:
        return StreamingResponse(_events(gen, fmt, model), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        await until_disconnect(request, _collect(gen, fmt))
    except ClientDisconnected:
        return Response(status_code=499)
    except RequestAbortedError as exc:
        raise APIError(503, f"The request was aborted: {exc} (the server is shutting down).") from exc
    except EngineStepError as exc:
        raise APIError(500, str(exc)) from exc
    return JSONResponse(_message(gen, fmt.response(model)))


async def _collect(gen: Generation, fmt: ChatFormat) -> None:
    async for deltas in gen.deltas():
        for delta in deltas:
            fmt.add(delta)


def _stop(finish_reason: str | None, stop_reason: int | str | None) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) from the engine's finish_reason and stop_reason."""
    if finish_reason == "stop" and isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    return _STOP_REASONS.get(finish_reason or "", "end_turn"), None


def _message(gen: Generation, chat: p.ChatCompletionResponse) -> dict[str, Any]:
    choice = chat.choices[0]
    content: list[dict[str, Any]] = []
    if choice.message.content:
        content.append({"type": "text", "text": choice.message.content})
    for call in choice.message.tool_calls or []:
        content.append({"type": "tool_use", "id": call.id, "name": call.function.name,
                        "input": _arguments(call.function.arguments)})
    stop_reason, stop_sequence = _stop(choice.finish_reason, choice.stop_reason)
    return {"id": gen.request_id, "type": "message", "role": "assistant", "model": chat.model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": gen.completion_tokens}}


def _arguments(arguments: str) -> dict[str, Any]:
    """A call's `input` object; a call cut off by max_tokens has partial JSON: {} then (Anthropic's
    input is always an object)."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


async def _events(gen: Generation, fmt: ChatFormat, model: str) -> AsyncIterator[str]:
    """The Messages event stream: one text block per run of text, one tool_use block per call."""
    start: dict[str, Any] = {"id": gen.request_id, "type": "message", "role": "assistant", "model": model,
                             "content": [], "stop_reason": None, "stop_sequence": None,
                             "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": 0}}
    blocks = _BlockWriter()
    finish: tuple[str | None, int | str | None] = (None, None)
    try:
        yield _event("message_start", {"message": start})
        yield _event("ping", {})
        try:
            async for deltas in gen.deltas():
                for delta in deltas:
                    chunk = fmt.chunk_choice(delta)
                    for event in blocks.feed(chunk["delta"]):
                        yield event
                    if chunk["finish_reason"] is not None:
                        finish = (chunk["finish_reason"], delta.stop_reason)
        except RequestAbortedError:
            finish = ("abort", None)
        except EngineStepError as exc:
            yield _event("error", {"error": {"type": "api_error", "message": str(exc)}})
            return
        for event in blocks.close():
            yield event
        stop_reason, stop_sequence = _stop(*finish)
        yield _event("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                       "usage": {"output_tokens": gen.completion_tokens}})
        yield _event("message_stop", {})
    finally:
        gen.close()


class _BlockWriter:
    """Chat-completion chunk deltas -> content block events, numbering the blocks."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None  # "text" while a text block is open

    def feed(self, delta: dict[str, Any]) -> list[str]:
        out = []
        text = (delta.get("reasoning_content") or "") + (delta.get("content") or "")
        if text:
            if self.open != "text":
                out += self.close()
                self.index += 1
                self.open = "text"
                out.append(_event("content_block_start", {"index": self.index,
                                                          "content_block": {"type": "text", "text": ""}}))
            out.append(_event("content_block_delta", {"index": self.index,
                                                      "delta": {"type": "text_delta", "text": text}}))
        for call in delta.get("tool_calls") or []:
            out += self.close()
            self.index += 1
            function = call.get("function", {})
            out.append(_event("content_block_start", {"index": self.index, "content_block": {
                "type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": {}}}))
            out.append(_event("content_block_delta", {"index": self.index, "delta": {
                "type": "input_json_delta", "partial_json": function.get("arguments") or ""}}))
            out.append(_event("content_block_stop", {"index": self.index}))
        return out

    def close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [_event("content_block_stop", {"index": self.index})]
