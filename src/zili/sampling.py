"""SamplingParams: the one place sampling defaults live. Validated on construction.

Errors carry the field at fault as data: `InvalidRequestError(field, reason, code)` (a ValueError),
and its subclass `SamplingParamsError` for a bad SamplingParams value. A server maps `.field` to
its own parameter name (OpenAI's `param`) without parsing messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class InvalidRequestError(ValueError):
    """A request the engine can never run. `field`: what is at fault ("prompt", or a SamplingParams
    field such as "max_tokens"); `reason`: a sentence for people; `code`: a machine-readable kind
    (e.g. "context_length_exceeded") or None."""

    def __init__(self, field: str, reason: str, code: str | None = None) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason
        self.code = code

    def __reduce__(self) -> tuple[type, tuple[str, str, str | None]]:  # pickles across processes (Ray replicas)
        return type(self), (self.field, self.reason, self.code)


class SamplingParamsError(InvalidRequestError):
    """A SamplingParams value out of range or of the wrong type; str() is "SamplingParams.<field> <reason>"."""

    def __init__(self, field: str, reason: str, code: str | None = None) -> None:
        super().__init__(field, reason, code)
        self.args = (f"SamplingParams.{field} {reason}",)

    def __str__(self) -> str:
        return self.args[0]


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model's context
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # number of top alternatives to return with each sampled token
    # Scoring: the logprob of every prompt token given the tokens before it (the first has none) and
    # this many top alternatives at each position, in RequestOutput.prompt_logprobs (vLLM's field).
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # Constrained decoding: a zili.structured.StructuredOutput, or a dict such as {"json": schema},
    # {"regex": ...}, {"choice": [...]}, {"grammar": ebnf}, {"json_object": True}.
    structured: Any = None
    # Reasoning models (zili.engine.thinking): the most tokens the thinking may take, closing tag
    # included; when spent, the engine closes the thinking and the model answers. None: unbounded.
    max_reasoning_tokens: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        _check(isinstance(self.n, int) and self.n >= 1, "n", f"must be an integer >= 1, got {self.n!r}")
        _check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k",
               f"must be -1 (disabled), 0 (disabled) or a positive integer, got {self.top_k!r}")
        _check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(self.repetition_penalty > 0, "repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty",
               f"must be in [-2, 2], got {self.frequency_penalty}")
        # max_tokens 0 runs the prompt only (prefill): scoring with prompt_logprobs, as OpenAI's legacy
        # completions allowed with echo.
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool)
                                           and self.max_tokens >= 0),
               "max_tokens", f"must be an integer >= 1 (or 0: score the prompt only), got {self.max_tokens!r}")
        _check(self.max_tokens != 0 or self.n == 1, "n", f"must be 1 when max_tokens is 0, got {self.n}")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens",
               f"must be an integer >= 0, got {self.min_tokens!r}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20), "logprobs",
               f"must be an integer in [0, 20], got {self.logprobs!r}")
        _check(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int)
                                                and not isinstance(self.prompt_logprobs, bool)
                                                and 0 <= self.prompt_logprobs <= 20), "prompt_logprobs",
               f"must be an integer in [0, 20], got {self.prompt_logprobs!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        _check(self.max_reasoning_tokens is None or (isinstance(self.max_reasoning_tokens, int)
                                                     and not isinstance(self.max_reasoning_tokens, bool)
                                                     and self.max_reasoning_tokens >= 1),
               "max_reasoning_tokens", f"must be an integer >= 1, got {self.max_reasoning_tokens!r}")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "must be non-negative integers")
        if self.structured is not None:  # structured output: normalise to a StructuredOutput, shape-checked
            from zili.structured.spec import StructuredOutput

            try:
                self.structured = StructuredOutput.parse(self.structured)
            except ValueError as e:
                raise SamplingParamsError("structured", str(e)) from None
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            for tok, bias in self.logit_bias.items():
                _check(tok >= 0, "logit_bias", f"token id {tok} is negative")
                _check(-100 <= bias <= 100, "logit_bias", f"bias {bias} for token {tok} is outside [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


POOLING_TYPES = ("mean", "last", "cls")


@dataclass
class PoolingParams:
    """An embedding request: the prompt's final hidden states (after the model's final norm) pooled
    into one vector of hidden_size floats, as llama.cpp's `--embeddings --pooling` computes them.

    `pooling`: "mean" (average over every prompt position), "last" (the last position's state, for
    causal models) or "cls" (the first position's). `normalize`: scale to unit L2 norm (llama.cpp's
    default, `--embd-normalize 2`). A pooling request is prefill only: nothing is sampled.
    """

    pooling: str = "mean"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_TYPES:
            raise InvalidRequestError("pooling", f"PoolingParams.pooling must be one of {', '.join(POOLING_TYPES)}, "
                                                 f"got {self.pooling!r}")
        if not isinstance(self.normalize, bool):
            raise InvalidRequestError("normalize", f"PoolingParams.normalize must be a boolean, got {self.normalize!r}")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise SamplingParamsError(name, message)
