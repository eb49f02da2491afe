"""POST /v1/embeddings: the served model's final hidden states, pooled, in OpenAI's shapes.

Each input is one engine request with PoolingParams (zili.sampling): prefill only, batched and
scheduled with every other request, its KV blocks freed when its prompt is in. The vector is what
llama.cpp's `--embeddings` returns for a generative model: the hidden states after the model's final
norm, pooled by `zili serve --pooling` (mean by default; last; cls) and scaled to unit L2 norm
(llama.cpp's default, `embd_normalize` 2).
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

import numpy as np

from zili.engine.async_engine import EngineStepError, RequestAbortedError
from zili.sampling import PoolingParams, SamplingParams
from zili.server import protocol as p
from zili.server.errors import APIError, bad_request
from zili.server.generation import Generation
from zili.server.inputs import encode
from zili.server.serving import new_request_id, until_disconnect

if TYPE_CHECKING:
    from zili.server.state import ServerState

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


def embedding_inputs(state: ServerState, given: Any) -> list[list[int]]:
    """`input` (str, [str], [int] or [[int]]) as token-id lists, one per input; 400 naming `input`."""
    if isinstance(given, str):
        given = [given]
    if not given:
        raise bad_request("input must not be empty", param="input")
    if all(isinstance(x, int) for x in given):
        given = [given]
    if len(given) > MAX_INPUTS:
        raise bad_request(f"input has {len(given)} items; at most {MAX_INPUTS} are allowed", param="input")
    # OpenAI-style: no special tokens added to the text (a model's BOS is part of its tokenizer's encode)
    return [encode(state, item, "input") if isinstance(item, str) else list(item) for item in given]


def encode_vector(vector: Any, encoding_format: str) -> list[float] | str:
    """A float32 vector as OpenAI sends it: a list of floats, or base64 of its little-endian bytes."""
    array = np.asarray(vector.float().numpy(), dtype="<f4")
    if encoding_format == "base64":
        return base64.b64encode(array.tobytes()).decode("ascii")
    return array.tolist()


async def create_embeddings(state: ServerState, body: p.EmbeddingRequest, request: Any, model: str) -> p.EmbeddingResponse:
    """Run every input as a pooling request through the engine and return the vectors in input order."""
    hidden = state.ready_engine().model_config.hidden_size
    if body.dimensions is not None and body.dimensions != hidden:
        raise bad_request(f"dimensions is not supported: this model's embeddings have {hidden} dimensions and are "
                          f"not truncated (got dimensions={body.dimensions})", param="dimensions")
    prompts = embedding_inputs(state, body.input)
    gen = Generation(state, new_request_id("embd"), prompts, SamplingParams(max_tokens=0),
                     param_names={"prompt": "input"}, pooling=PoolingParams(state.settings.pooling))
    await gen.start()
    try:
        await until_disconnect(request, _drain(gen))
    except RequestAbortedError as exc:
        raise APIError(503, f"The request was aborted: {exc} (the server is shutting down).", code="aborted") from exc
    except EngineStepError as exc:
        raise APIError(500, str(exc), type="internal_error", code="engine_error") from exc
    missing = [i for i in range(len(prompts)) if i not in gen.embeddings]
    if missing:  # e.g. ended by governance before the prompt was in
        raise APIError(503, f"no embedding was computed for input {missing[0]}", code="aborted")
    data = [p.EmbeddingData(index=i, embedding=encode_vector(gen.embeddings[i], body.encoding_format))
            for i in range(len(prompts))]
    tokens = gen.prompt_tokens
    return p.EmbeddingResponse(data=data, model=model, usage=p.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))


async def _drain(gen: Generation) -> None:
    async for _ in gen.deltas():
        pass


