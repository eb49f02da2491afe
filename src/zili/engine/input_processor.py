"""Input processing: validate a request once, before it reaches the scheduler.

`InputProcessor.prepare(prompt, params)` tokenizes a text prompt, checks token ids against the
vocabulary (prompt, stop_token_ids, logit_bias), checks that prompt plus max_tokens fits the context
and the KV pool, and compiles the structured-output grammar. It reads only facts fixed when the
engine was built, so it is thread-safe: `AsyncEngine` runs it on the caller's side (a slow grammar
compile off the event loop) and hands the engine loop a `PreparedRequest` that cannot fail.

Every refusal is an `InvalidRequestError` (zili.sampling) whose `.field` names what is at fault.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from zili.engine.request import GrammarMatcher, Sequence
from zili.sampling import InvalidRequestError, PoolingParams, SamplingParams, SamplingParamsError
from zili.structured.backend import CompiledGrammar, GrammarBackend, GrammarMask
from zili.structured.spec import StructuredOutput
from zili.tokenizer import Tokenizer

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


@dataclass(frozen=True)
class PreparedRequest:
    """A request that passed every check: token ids, resolved limits, compiled grammar."""

    prompt: str | None  # the text, when the prompt was given as text
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens, or what the context leaves after the prompt
    stop_token_ids: frozenset[int]  # params.stop_token_ids plus EOS (unless ignore_eos)
    grammar: CompiledGrammar | None = None
    pooling: PoolingParams | None = None  # an embedding request (prefill only; params is a stand-in)


class InputProcessor:
    """Checks and prepares requests for one engine (its tokenizer, vocabulary and limits)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int, num_kv_blocks: int,
                 block_size: int, structured_outputs_backend: str = "auto") -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.structured_outputs_backend = structured_outputs_backend  # GrammarBackend's library choice
        self._grammar_backend: GrammarBackend | None = None  # built on the first structured request
        self._grammar_lock = threading.Lock()

    # ---- checks ------------------------------------------------------------------------------
    def prepare(self, prompt: str | list[int], params: SamplingParams | PoolingParams | None = None) -> PreparedRequest:
        """Validate one request. Raises InvalidRequestError naming the field: "prompt" (empty, bad
        token ids, too long), "max_tokens" (prompt plus it exceeds the context or the KV pool),
        "stop_token_ids" / "logit_bias" (ids outside the vocabulary), "structured" (the grammar
        does not compile). PoolingParams make an embedding request: prefill only, so the prompt
        may fill the whole context. Thread-safe."""
        if isinstance(params, PoolingParams):
            text, token_ids = self._prompt_tokens(prompt)
            self._check_fits(len(token_ids), SamplingParams(max_tokens=0))
            return PreparedRequest(text, token_ids, SamplingParams(max_tokens=0), 0, frozenset(), pooling=params)
        params = params or SamplingParams()
        text, token_ids = self._prompt_tokens(prompt)
        max_tokens = self._check_fits(len(token_ids), params)
        self._check_vocab(params.stop_token_ids, "stop_token_ids")
        self._check_vocab(list(params.logit_bias or ()), "logit_bias")
        grammar = self.compile_structured(params.structured) if params.structured is not None else None
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.tokenizer.eos_token_ids)
        return PreparedRequest(text, token_ids, params, max_tokens, frozenset(stop_ids), grammar)

    def _prompt_tokens(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            try:
                token_ids = self.tokenizer.encode(prompt)
            except (TypeError, UnicodeError) as exc:  # e.g. a lone surrogate from a JSON escape
                raise InvalidRequestError("prompt", f"prompt is not valid Unicode text: {exc}") from exc
            text: str | None = prompt
        else:
            token_ids, text = list(prompt), None
            bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError("prompt", f"prompt token ids must be integers in [0, {self.vocab_size}); "
                                                    f"got {bad[:5]}")
        if not token_ids:
            raise InvalidRequestError("prompt", "prompt is empty: it must contain at least one token")
        return text, token_ids

    def _check_vocab(self, ids: list[int], field: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise SamplingParamsError(field, f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")

    def _check_fits(self, prompt_len: int, params: SamplingParams) -> int:
        limit = self.max_model_len
        prefill_only = params.max_tokens == 0  # scoring or pooling: no token is generated
        if prompt_len > limit or (prompt_len == limit and not prefill_only):
            room = "" if prefill_only else " (prompt plus at least one generated token)"
            raise InvalidRequestError(
                "prompt", f"the prompt has {prompt_len} tokens, but the maximum context length is {limit} tokens"
                          f"{room}", CONTEXT_LENGTH_EXCEEDED)
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - prompt_len
        if prompt_len + max_tokens > limit:
            raise InvalidRequestError(
                "max_tokens", f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) is "
                              f"{prompt_len + max_tokens} tokens, more than the maximum context length of {limit} "
                              f"tokens", CONTEXT_LENGTH_EXCEEDED)
        need = -(-(prompt_len + max_tokens) // self.block_size)
        if need > self.num_kv_blocks:
            raise InvalidRequestError(
                "max_tokens", f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) needs {need} KV blocks, "
                              f"but the whole KV cache has {self.num_kv_blocks}; raise kv_cache_memory or lower "
                              f"max_tokens")
        return max_tokens

    # ---- structured output (zili.structured) ---------------------------------------------------
    @property
    def grammar_backend(self) -> GrammarBackend:
        """The grammar compiler and mask builder, built on first use (thread-safe)."""
        with self._grammar_lock:
            if self._grammar_backend is None:
                self._grammar_backend = GrammarBackend(self.tokenizer, self.vocab_size,
                                                       backend=self.structured_outputs_backend)
            return self._grammar_backend

    def compile_structured(self, structured: StructuredOutput) -> CompiledGrammar:
        """Compile a StructuredOutput for this vocabulary (cached). SamplingParamsError("structured")."""
        try:
            return self.grammar_backend.compile(structured)
        except ValueError as exc:
            raise SamplingParamsError("structured", str(exc)) from exc

    def new_matcher(self, grammar: CompiledGrammar) -> GrammarMatcher:
        return self.grammar_backend.new_matcher(grammar)

    def grammar_mask(self, seqs: list[Sequence]) -> GrammarMask | None:
        """This step's allowed-token bitmask, or None when no sequence in it is constrained."""
        if self._grammar_backend is None or all(s.grammar is None for s in seqs):
            return None
        return self._grammar_backend.build_mask(seqs)
