"""Requests, their sequences, and what the engine returns for them.

`Engine.step()` returns `RequestDelta`s: per touched request, only what is new since its last
output (vLLM's DELTA output kind; mini-sglang's per-step replies). `OutputAccumulator` turns a
request's deltas back into the cumulative `RequestOutput` that `LLM.generate` returns.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from zili.sampling import PoolingParams, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the top alternatives, best first


class GrammarMatcher(Protocol):
    """One sequence's structured-output state (an `xgrammar.GrammarMatcher`, zili.structured)."""

    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar does not allow it (state unchanged)."""
        ...

    def is_terminated(self) -> bool:
        """True once the grammar has reached its end (no further token is allowed)."""
        ...

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> object:
        """Write row `index` of the int32 allowed-token bitmask [batch, ceil(vocab / 32)]."""
        ...


# ---- what the engine returns: deltas ---------------------------------------------------------


@dataclass
class CompletionDelta:
    """What one sequence gained in one step."""

    index: int  # which of the request's n sequences
    text: str  # new text (text that could still begin a stop string is held back until decided)
    token_ids: list[int]  # new token ids
    logprobs: list[TokenLogprob] | None = None  # one per new token, when params.logprobs is set
    finish_reason: str | None = None  # set on the sequence's last delta: "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


@dataclass
class RequestDelta:
    """One request's news from one engine step: only the sequences that changed.

    `prompt_token_ids` is set on the request's first delta only (None afterwards), and so are
    `prompt_logprobs` (params.prompt_logprobs: one per prompt token, the first None) and `embedding`
    (a pooling request: [hidden_size] float32); `num_cached_tokens` is the prompt tokens found in the
    prefix cache so far (a count, not a copy).
    """

    request_id: str
    outputs: list[CompletionDelta]
    finished: bool
    num_cached_tokens: int = 0
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    embedding: torch.Tensor | None = None


# ---- what callers that want whole texts get ---------------------------------------------------


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[TokenLogprob] | None = None
    reasoning_text: str | None = None  # a reasoning model's thinking, split off `text` by LLM.chat


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # params.prompt_logprobs: the first is None
    embedding: torch.Tensor | None = None  # a pooling request's vector, [hidden_size] float32


class OutputAccumulator:
    """Folds one request's `RequestDelta`s into its cumulative `RequestOutput`.

    Token ids and logprobs are appended in place and text pieces joined only when asked for, so
    accumulating costs O(new tokens) per delta; `snapshot()` (a copy) costs O(length)."""

    def __init__(self, request_id: str, n: int) -> None:
        self.request_id = request_id
        self.prompt: str | None = None
        self.prompt_token_ids: list[int] = []
        self.finished = False
        self.num_cached_tokens = 0
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.embedding: torch.Tensor | None = None
        self._pieces: list[list[str]] = [[] for _ in range(n)]
        self._outputs = [CompletionOutput(i, "", []) for i in range(n)]

    def add(self, delta: RequestDelta) -> None:
        """Fold in one delta of this request."""
        if delta.prompt_token_ids is not None:
            self.prompt, self.prompt_token_ids = delta.prompt, delta.prompt_token_ids
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.embedding is not None:
            self.embedding = delta.embedding
        self.num_cached_tokens = delta.num_cached_tokens
        self.finished = delta.finished
        for d in delta.outputs:
            out = self._outputs[d.index]
            if d.text:
                self._pieces[d.index].append(d.text)
            out.token_ids.extend(d.token_ids)
            if d.logprobs is not None:
                if out.logprobs is None:
                    out.logprobs = []
                out.logprobs.extend(d.logprobs)
            if d.finish_reason is not None:
                out.finish_reason, out.stop_reason = d.finish_reason, d.stop_reason

    def result(self) -> RequestOutput:
        """The request's output so far (its lists are this accumulator's own: no copy)."""
        for out, pieces in zip(self._outputs, self._pieces):
            if len(pieces) > 1:
                pieces[:] = ["".join(pieces)]
            out.text = pieces[0] if pieces else ""
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, self._outputs, self.finished,
                             self.num_cached_tokens, self.prompt_logprobs, self.embedding)

    def snapshot(self) -> RequestOutput:
        """An independent copy of `result()`, for callers that keep each partial output."""
        out = self.result()
        return RequestOutput(out.request_id, out.prompt, list(out.prompt_token_ids), [
            CompletionOutput(c.index, c.text, list(c.token_ids), c.finish_reason, c.stop_reason,
                             list(c.logprobs) if c.logprobs is not None else None) for c in out.outputs],
            out.finished, out.num_cached_tokens, out.prompt_logprobs, out.embedding)


# ---- the engine's own bookkeeping ---------------------------------------------------------------


@dataclass(eq=False)
class Sequence:
    """One generated continuation. A request with n > 1 has n sequences that share the prompt."""

    seq_id: str
    request: Request
    index: int
    token_ids: list[int]  # prompt + generated so far
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V is in the cache
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    seed: int | None = None  # seeded sampling: sequence_seed(params.seed, index), keyed per position by the sampler
    num_cached_prompt_tokens: int = 0
    grammar: GrammarMatcher | None = None  # structured output: this sequence's matcher (zili.structured)
    # Speculative decoding (zili.engine.spec_decode): tokens proposed to follow token_ids, verified in
    # the next step; the scheduler may shorten the list and clears it when the sequence cannot verify.
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """A copy of the generated ids (O(length): for the sampler's penalties, not per-step output)."""
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
    announced: bool = False  # its first delta (carrying the prompt) has been returned
    pooling: PoolingParams | None = None  # an embedding request (prefill only)
    # Filled as prefill chunks run: the prompt's logprobs so far (params.prompt_logprobs; starts [None],
    # the first token has no logprob), and a pooling request's running pool (a sum, for "mean").
    prompt_logprobs: list[TokenLogprob | None] | None = None
    pooled: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def prefill_only(self) -> bool:
        """Nothing is sampled: a scoring request (max_tokens 0) or a pooling one; it ends with its prompt."""
        return self.max_tokens == 0

    @property
    def num_scored_tokens(self) -> int:
        """Prompt tokens whose logprob is known (the first counts: it has none)."""
        return len(self.prompt_logprobs) if self.prompt_logprobs is not None else self.num_prompt_tokens

    def reusable_prefix_tokens(self, seq: Sequence) -> int | None:
        """How many leading prompt tokens `seq` may take from the prefix cache (None: any). Cached
        blocks hold K/V but no logits or hidden states, so positions still to be scored (prompt
        logprobs) or pooled (mean, cls) must be computed: such a request takes no cache hit there."""
        if seq.index != 0:
            return None  # siblings of an n > 1 request neither score nor pool
        if self.pooling is not None and self.pooling.pooling != "last":
            return 0
        if self.prompt_logprobs is not None:
            return self.num_scored_tokens - 1  # rows 0 .. scored - 2 are done: the next row is scored - 1
        return None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.sequences)

    @property
    def num_cached_tokens(self) -> int:
        return max((s.num_cached_prompt_tokens for s in self.sequences), default=0)

    def delta(self, outputs: list[CompletionDelta]) -> RequestDelta:
        """Wrap this step's sequence deltas; the first one of a request also carries its prompt."""
        first = not self.announced
        self.announced = True
        scored = self.prompt_logprobs is not None and len(self.prompt_logprobs) == self.num_prompt_tokens
        return RequestDelta(self.request_id, outputs, self.finished, self.num_cached_tokens,
                            self.prompt if first else None, self.prompt_token_ids if first else None,
                            self.prompt_logprobs if first and scored else None,
                            self.embedding() if first else None)

    def embedding(self) -> torch.Tensor | None:
        """A pooling request's vector once its prompt is pooled: [hidden_size] float32 (None otherwise)."""
        done = self.finished and self.sequences[0].num_computed_tokens >= self.num_prompt_tokens  # not aborted
        if self.pooling is None or self.pooled is None or not done:
            return None
        vector = self.pooled / self.num_prompt_tokens if self.pooling.pooling == "mean" else self.pooled
        if self.pooling.normalize:
            vector = torch.nn.functional.normalize(vector, dim=0)
        return vector
