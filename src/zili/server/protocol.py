"""Request and response bodies, in the OpenAI API's shapes (plus vLLM's /tokenize, /detokenize).

Types and structure are checked here, strictly as OpenAI's API does (`true`, `"5"` or `5.0` for an
integer is a 400 invalid_type naming the field, not a silent 1 or 5); value ranges are checked once, by
SamplingParams (a bad value is a 400 naming the parameter). Unknown fields are ignored, as the
OpenAI API does for fields a server does not implement.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_INT64 = Field(ge=-(2**63), le=2**63 - 1)


class _Request(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


# ----- structured output and tools (zili.structured) -----


class JSONSchemaFormat(_Request):
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore", populate_by_name=True, strict=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON schema the output must match.")
    strict: bool | None = Field(None, description=(
        "true: compile in strict mode and refuse (400, naming the place) a schema the grammar would only "
        "approximate; false: compile as JSON Schema reads it (extra properties / items allowed unless forbidden); "
        "unset: strict mode where the schema allows it. Approximations are named in the zili-warnings header."))


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(_Request):
    """Extension (vLLM's structured_outputs): constrain the output to one of these."""

    model_config = ConfigDict(allow_inf_nan=False, extra="ignore", populate_by_name=True, strict=True)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="An EBNF grammar (xgrammar's dialect) with a `root` rule.")
    json_: dict[str, Any] | str | None = Field(None, alias="json", description="A JSON schema.")
    json_object: bool | None = None


class FunctionDefinition(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = Field(None, description=(
        "As response_format's json_schema.strict, for the arguments of a forced call: true refuses (400, naming "
        "the place) a parameters schema the grammar would only approximate; false reads it as JSON Schema does "
        "(extra properties / items allowed unless forbidden); unset: strict mode where the schema allows it."))


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ToolCallFunction(_Request):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class _SamplingFields(_Request):
    """Parameters shared by /v1/chat/completions and /v1/completions."""

    model: str | None = Field(None, description="Served model name; see GET /v1/models. Defaults to it.")
    n: int = Field(1, description="Number of choices to generate for each prompt.")
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, _INT64] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias in [-100, 100].")
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Extensions (documented; same meaning as in vLLM).
    top_k: int | None = Field(None, description="Extension: sample from the k most likely tokens (-1: off).")
    min_p: float | None = Field(None, description="Extension: drop tokens below min_p * p(top token).")
    repetition_penalty: float | None = Field(None, description="Extension: >1 discourages repeating tokens.")
    ignore_eos: bool = Field(False, description="Extension: keep generating past the end-of-sequence token.")
    min_tokens: int | None = Field(None, description="Extension: generate at least this many tokens.")
    stop_token_ids: list[int] | None = Field(None, description="Extension: stop on any of these token ids.")
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = Field(
        None, description="Extension: constrain the output to a regex, a choice, an EBNF grammar or a JSON schema.")


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class OtherContentPart(BaseModel):
    """A content part zili cannot read (image_url, input_audio, ...): refused with a 400."""

    model_config = ConfigDict(extra="allow")
    type: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart | OtherContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = Field(
        None, description="An earlier assistant turn's thinking, as returned. Handed to the chat template, "
                          "which decides whether to show it to the model (most leave it out).")


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # Reasoning models (zili.reasoning).
    reasoning_effort: Literal["low", "medium", "high"] | None = Field(
        None, description="Bounds the thinking of a reasoning model by a budget the server sets per level "
                          "(--reasoning-budgets).")
    max_reasoning_tokens: int | None = Field(
        None, description="Extension: the most tokens the thinking may take (closing tag included); when they "
                          "are spent the engine ends the thinking and the model answers.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Extra variables for the chat template, e.g. {\"enable_thinking\": false}.")
    add_generation_prompt: bool = Field(
        True, description="Extension (vLLM's): open a new assistant turn after the messages.")
    continue_final_message: bool = Field(
        False, description="Extension (vLLM's): continue the final assistant message instead of opening a new "
                           "turn (assistant prefill); needs add_generation_prompt false.")


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists.")
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class EmbeddingRequest(_Request):
    """OpenAI's /v1/embeddings body. The vector is the served model's final hidden states pooled
    (`zili serve --pooling`), as llama.cpp's `--embeddings` computes it."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: a list of numbers; base64: the little-endian float32 bytes, base64-encoded.")
    dimensions: int | None = Field(
        None, description="Only the model's own hidden size is accepted (vectors are not truncated).")
    user: str | None = None


# ----- responses -----


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ResponseToolCallFunction(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseToolCallFunction


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None  # a reasoning model's thinking (DeepSeek's and vLLM's field)
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # a string when encoding_format is base64


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "zili"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(_Request):
    """vLLM's shape: either `prompt` (text) or `messages` (a chat, rendered by the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = Field(
        None, description="Default: true for a prompt, false for messages (the template adds them).")
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "draining", "error"]
    detail: str | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
