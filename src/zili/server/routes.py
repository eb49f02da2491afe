"""HTTP routes: OpenAI's /v1 endpoints, vLLM's /tokenize and /detokenize, /health, /metrics."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from zili.reasoning import NONE, THINK_END, resolve_reasoning_parser
from zili.server import protocol as p
from zili.server.auth import require_api_key
from zili.server.embeddings import create_embeddings
from zili.server.errors import bad_request
from zili.server.formats import ChatFormat, CompletionFormat, ReasoningSetup
from zili.server.generation import Generation
from zili.server.inputs import (
    LEGACY_DEFAULT_MAX_TOKENS,
    chat_tools,
    check_token_ids,
    completion_prompts,
    encode,
    note_approximations,
    render_chat,
    resolve_max_tokens,
    sampling_params,
    structured_output,
)
from zili.server.serving import ClientDisconnected, new_request_id, respond
from zili.server.state import ServerState
from zili.structured.tools import tool_style

_ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": p.ErrorResponse}
                                            for status in (400, 401, 404, 413, 429, 503)}

router = APIRouter()
guarded = APIRouter(dependencies=[Depends(require_api_key)], responses=_ERRORS)


def _state(request: Request) -> ServerState:
    return request.app.state.zili


@router.get("/health", response_model=p.HealthResponse, responses={503: {"model": p.HealthResponse}})
async def health(request: Request) -> JSONResponse:
    """200 once the model is loaded and the server takes requests; 503 while loading or draining."""
    state = _state(request)
    engine = state.engine
    if engine.dead_error is not None:
        body = p.HealthResponse(status="error", detail=str(engine.dead_error))
    elif not engine.ready:
        body = p.HealthResponse(status="loading")
    elif state.draining:
        body = p.HealthResponse(status="draining")
    else:
        return JSONResponse(p.HealthResponse(status="ok").model_dump())
    return JSONResponse(body.model_dump(), status_code=503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics (text exposition format)."""
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@guarded.get("/v1/models", response_model=p.ModelList)
async def list_models(request: Request) -> p.ModelList:
    return p.ModelList(data=[_model_card(_state(request))])


@guarded.get("/v1/models/{model_id:path}", response_model=p.ModelCard)
async def get_model(model_id: str, request: Request) -> p.ModelCard:
    state = _state(request)
    state.check_model(model_id)
    return _model_card(state)


def _model_card(state: ServerState) -> p.ModelCard:
    max_len = state.engine.engine.max_model_len if state.engine.ready else None
    return p.ModelCard(id=state.settings.served_model_name, created=state.created, max_model_len=max_len)


@guarded.post("/v1/chat/completions", response_model=p.ChatCompletionResponse,
              responses={200: {"content": {"text/event-stream": {}}}})
async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
    """Chat completion; `stream: true` answers with server-sent events ending in `data: [DONE]`."""
    state = _state(request)
    model = state.check_model(body.model)
    state.ready_engine()
    tools, tool_choice = chat_tools(body)
    offered = tools if tool_choice != "none" else None  # tool_choice "none": the model is not shown the tools
    style = tool_style(state.tokenizer) if offered else None
    prompt_text = render_chat(state, body.messages, body.add_generation_prompt, tools=offered,
                              chat_template_kwargs=body.chat_template_kwargs,
                              continue_final_message=body.continue_final_message)
    prompt = encode(state, prompt_text, "messages", add_special_tokens=False)
    reasoning = _reasoning_setup(state, prompt_text)
    reasoning_budget = _reasoning_budget(state, body, reasoning)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(state, requested, len(prompt), None, param)
    structured, structured_param = structured_output(body, tools, tool_choice, style or "hermes",
                                                     body.parallel_tool_calls)
    note_approximations(request, structured)
    params = sampling_params(state, body, max_tokens=max_tokens, logprobs=top_logprobs,
                             rename={"logprobs": "top_logprobs", "max_tokens": param}, structured=structured)
    if reasoning_budget is not None:
        params = dataclasses.replace(params, max_reasoning_tokens=reasoning_budget)
    names = {"prompt": "messages", "max_tokens": param, "logprobs": "top_logprobs",
             "structured": structured_param or "structured"}
    gen = Generation(state, new_request_id("chatcmpl"), [prompt], params, param_names=names)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    fmt = ChatFormat(state, gen, top_logprobs, tool_style=style, reasoning=reasoning)
    return await respond(request, gen, fmt, stream=body.stream, include_usage=include_usage, model=model)


def _reasoning_setup(state: ServerState, prompt_text: str) -> ReasoningSetup | None:
    """How this server splits a chat answer's thinking from the answer (None: it does not)."""
    tokenizer = state.tokenizer
    parser = resolve_reasoning_parser(state.settings.reasoning_parser, tokenizer.chat_template)
    if parser == NONE:
        return None
    end_ids = tokenizer.encode(THINK_END, add_special_tokens=False)
    return ReasoningSetup(parser, prompt_text, end_ids[0] if len(end_ids) == 1 else None)


def _reasoning_budget(state: ServerState, body: p.ChatCompletionRequest,
                      reasoning: ReasoningSetup | None) -> int | None:
    """The thinking budget in tokens: max_reasoning_tokens, else the server's budget for reasoning_effort."""
    param = "max_reasoning_tokens" if body.max_reasoning_tokens is not None else "reasoning_effort"
    if body.max_reasoning_tokens is None and body.reasoning_effort is None:
        return None
    if reasoning is None:
        raise bad_request(f"{param} needs a reasoning model; this server's model does not think "
                          f"(--reasoning-parser {state.settings.reasoning_parser})", param=param)
    if body.max_reasoning_tokens is not None:
        if body.max_reasoning_tokens < 1:
            raise bad_request(f"max_reasoning_tokens must be an integer >= 1, got {body.max_reasoning_tokens}",
                              param="max_reasoning_tokens")
        return body.max_reasoning_tokens
    assert body.reasoning_effort is not None  # one of the two is set (checked above)
    return state.settings.reasoning_budgets[body.reasoning_effort]


@guarded.post("/v1/completions", response_model=p.CompletionResponse,
              responses={200: {"content": {"text/event-stream": {}}}})
async def completions(body: p.CompletionRequest, request: Request) -> Response:
    """Legacy text completion; `prompt` may be text, token ids, or a batch of either."""
    state = _state(request)
    model = state.check_model(body.model)
    state.ready_engine()
    if body.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of is not supported (other than best_of == n)", param="best_of")
    prompts = completion_prompts(state, body.prompt)
    longest = max(len(ids) for ids in prompts)
    if body.max_tokens == 0:  # the legacy API's scoring: echo the prompt (and its logprobs), generate nothing
        if not body.echo:
            raise bad_request("max_tokens must be an integer >= 1 (0 only with echo: the prompt is returned, and "
                              "scored with logprobs, without generating)", param="max_tokens")
        max_tokens: int | None = 0
    else:
        max_tokens = resolve_max_tokens(state, body.max_tokens, longest, LEGACY_DEFAULT_MAX_TOKENS, "max_tokens")
    structured, structured_param = structured_output(body)
    note_approximations(request, structured)
    params = sampling_params(state, body, max_tokens=max_tokens, logprobs=body.logprobs, structured=structured)
    if body.echo and body.logprobs is not None:  # score the prompt: its tokens' logprobs come before the output's
        params = dataclasses.replace(params, prompt_logprobs=params.logprobs)
    if len(prompts) * params.n > state.settings.max_n * 8:
        raise bad_request(f"too many choices ({len(prompts)} prompts x n={params.n})", param="prompt")
    gen = Generation(state, new_request_id("cmpl"), prompts, params,
                     param_names={"structured": structured_param or "structured"})
    echo = [state.tokenizer.decode(ids, skip_special_tokens=False) for ids in prompts] if body.echo else None
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await respond(request, gen, CompletionFormat(state, gen, body.logprobs, echo), stream=body.stream,
                         include_usage=include_usage, model=model)


@guarded.post("/v1/embeddings", response_model=p.EmbeddingResponse)
async def embeddings(body: p.EmbeddingRequest, request: Request) -> Response:
    """Embeddings: the model's final hidden states pooled (`zili serve --pooling`), unit L2 norm."""
    state = _state(request)
    model = state.check_model(body.model)
    state.ready_engine()
    try:
        response = await create_embeddings(state, body, request, model)
    except ClientDisconnected:
        return Response(status_code=499)
    return JSONResponse(response.model_dump(mode="json"))


@guarded.post("/tokenize", response_model=p.TokenizeResponse)
async def tokenize(body: p.TokenizeRequest, request: Request) -> p.TokenizeResponse:
    """Token ids of a prompt, or of a chat rendered by the model's chat template."""
    state = _state(request)
    state.check_model(body.model)
    state.ready_engine()
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of 'prompt' or 'messages'", param="prompt")
    if body.messages is not None:
        text = render_chat(state, body.messages, add_generation_prompt=body.add_generation_prompt,
                           continue_final_message=body.continue_final_message)
        add_special = bool(body.add_special_tokens)
    else:
        assert body.prompt is not None  # exactly one of them is given (checked above)
        text = body.prompt
        add_special = body.add_special_tokens is not False
    tokens = encode(state, text, "messages" if body.messages is not None else "prompt", add_special)
    strs = [state.token_str(t) for t in tokens] if body.return_token_strs else None
    return p.TokenizeResponse(count=len(tokens), max_model_len=state.max_model_len, tokens=tokens, token_strs=strs)


@guarded.post("/detokenize", response_model=p.DetokenizeResponse)
async def detokenize(body: p.DetokenizeRequest, request: Request) -> p.DetokenizeResponse:
    state = _state(request)
    state.check_model(body.model)
    state.ready_engine()
    check_token_ids(state, body.tokens, "tokens")
    return p.DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))


router.include_router(guarded)
