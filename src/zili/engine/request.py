"""Requests, their sequences, and what the engine returns for them."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from zili.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the top alternatives, best first


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0


@dataclass(eq=False)
class Sequence:
    """One generated continuation. A request with n > 1 has n sequences that share the prompt."""

    seq_id: str
    request: "Request"
    index: int
    token_ids: list[int]  # prompt + generated so far
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V is in the cache
    detokenizer: Any = None
    text: str = ""  # stable output text (held back stop-string prefix excluded while running)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None
    generator: torch.Generator | None = None  # per-sequence RNG, for seeded sampling
    num_cached_prompt_tokens: int = 0
    grammar: Any = None  # structured output: this sequence's grammar matcher (zili.structured)

    @property
    def num_prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(self.index, self.text, list(self.output_token_ids), self.finish_reason,
                                self.stop_reason, list(self.logprobs) if self.logprobs is not None else None)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: params.max_tokens or what the context leaves
    stop_token_ids: frozenset[int]  # eos (unless ignore_eos) + params.stop_token_ids
    arrival_time: float = field(default_factory=time.monotonic)
    sequences: list[Sequence] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.sequences)

    def to_output(self) -> RequestOutput:
        cached = max((s.num_cached_prompt_tokens for s in self.sequences), default=0)
        return RequestOutput(self.request_id, self.prompt, list(self.prompt_token_ids),
                             [s.to_output() for s in self.sequences], self.finished, cached)
