"""Reasoning models in the engine: a thinking budget, and structured output that starts after the
thinking. Both are per-sequence policies on the output seam (`OutputProcessor(sequence_processor=...)`).

- Thinking budget (`SamplingParams.max_reasoning_tokens`): the thinking may take at most that many
  tokens, closing tag included. When only the closing tokens still fit, the engine ends the thinking
  itself: for those positions the sampler's choice is replaced by the tokens of "\\n</think>\\n\\n"
  (THINK_END_TEXT), which then go through the KV cache like sampled ones, and the model answers.
  Forced tokens carry logprob 0.0 (the engine chose them with certainty) and the sampled token's top
  alternatives. A budget below the closing tag's own length still spends those tokens.
- Structured output after the thinking: a request's grammar (JSON schema, tool calls...) is held
  back while the model thinks and attached to the sequence when the thinking is over (and any forced
  closing tokens are written), so the thinking is free text and the answer follows the grammar. A
  model that would end (EOS) while a grammar is still waiting is made to close its thinking instead,
  so a finished answer is never missing. Under the qwen3 style, where the model decides whether to
  think, the first token may be `<think>` or whatever the grammar allows.

Which style a model uses comes from `EngineConfig.reasoning_parser` (zili.reasoning); requests with
neither a budget nor a grammar, and models that do not think, get the plain processor.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from zili.engine.output_processor import Detokenizer, SequenceOutputProcessor
from zili.engine.request import CompletionDelta, GrammarMatcher, RequestOutput, Sequence, TokenLogprob
from zili.reasoning import NONE, QWEN3, THINK_END, THINK_END_TEXT, THINK_START, ReasoningParser, split_reasoning
from zili.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_PROMPT_TAIL_TOKENS = 8  # enough prompt tokens to see whether the template opened or closed the thinking


class ThinkingOutputs:
    """The sequence-processor factory for `OutputProcessor`: a `ThinkingSequenceProcessor` for the
    sequences that need one (a budget, or a grammar on a thinking model), the plain one otherwise.

    `style` is a resolved reasoning-parser name ("deepseek-r1", "qwen3" or "none")."""

    def __init__(self, tokenizer: Tokenizer, style: str) -> None:
        self.tokenizer, self.style = tokenizer, style
        self.end_ids = tokenizer.encode(THINK_END_TEXT, add_special_tokens=False)
        tag = tokenizer.encode(THINK_END, add_special_tokens=False)
        # The closing tokens that count as thinking: through the tag (the rest separates the answer).
        self.end_reasoning_len = _end_of(self.end_ids, tag)
        self.end_token_id = tag[0] if len(tag) == 1 else None
        start = tokenizer.encode(THINK_START, add_special_tokens=False)
        self.start_token_id = start[0] if len(start) == 1 else None

    def __call__(self, seq: Sequence, detokenizer: Detokenizer, eos_token_ids: frozenset[int],
                 max_model_len: int) -> SequenceOutputProcessor:
        budget = seq.request.params.max_reasoning_tokens
        if self.style == NONE or (budget is None and seq.grammar is None):
            return SequenceOutputProcessor(seq, detokenizer, eos_token_ids, max_model_len)
        prompt = self.tokenizer.decode(seq.request.prompt_token_ids[-_PROMPT_TAIL_TOKENS:], skip_special_tokens=False)
        parser = ReasoningParser(self.style, prompt, self.end_token_id)
        return ThinkingSequenceProcessor(seq, detokenizer, eos_token_ids, max_model_len, self, parser, budget)


class ThinkingSequenceProcessor(SequenceOutputProcessor):
    """One sequence of a thinking model: counts its thinking, ends it at the budget, and attaches the
    request's grammar once the answer begins."""

    def __init__(self, seq: Sequence, detokenizer: Detokenizer, eos_token_ids: frozenset[int], max_model_len: int,
                 outputs: ThinkingOutputs, parser: ReasoningParser, budget: int | None) -> None:
        super().__init__(seq, detokenizer, eos_token_ids, max_model_len)
        self.outputs, self.parser, self.budget = outputs, parser, budget
        self.forced: list[int] = []  # closing tokens still to write, in order
        self.pending_grammar: GrammarMatcher | None = None
        if seq.grammar is not None and not parser.answering:
            self.pending_grammar, seq.grammar = seq.grammar, None
            if parser.style == QWEN3 and not parser.thinking and outputs.start_token_id is not None:
                seq.grammar = _ThinkOrGrammar(self.pending_grammar, outputs.start_token_id)

    def accept(self, token_id: int, logprob: TokenLogprob | None) -> CompletionDelta:
        token_id, logprob = self._choose(token_id, logprob)
        if isinstance(self.seq.grammar, _ThinkOrGrammar):
            self.seq.grammar = self.seq.grammar.decide(token_id)
        delta = super().accept(token_id, logprob)
        self.parser.feed(delta.text, [token_id])
        if self.pending_grammar is not None and self.parser.answering and not self.forced:
            self.seq.grammar, self.pending_grammar = self.pending_grammar, None
        return delta

    def _choose(self, token_id: int, logprob: TokenLogprob | None) -> tuple[int, TokenLogprob | None]:
        """The sampled token, unless the engine is writing the end of the thinking."""
        if not self.forced and self.parser.thinking and self._must_close(token_id):
            self.forced = list(self.outputs.end_ids)
        if not self.forced:
            return token_id, logprob
        forced = self.forced.pop(0)
        if logprob is not None:
            logprob = TokenLogprob(forced, 0.0, logprob.top)
        return forced, logprob

    def _must_close(self, token_id: int) -> bool:
        if self.budget is not None and self.parser.thinking_tokens + self.outputs.end_reasoning_len >= self.budget:
            return True
        # A model about to stop while its answer's grammar still waits closes the thinking instead.
        return self.pending_grammar is not None and token_id in self.seq.request.stop_token_ids


class _ThinkOrGrammar:
    """Before a qwen3-style model has decided whether to think: the grammar's tokens or `<think>`."""

    def __init__(self, grammar: GrammarMatcher, start_token_id: int) -> None:
        self.grammar, self.start_token_id = grammar, start_token_id

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> Any:
        self.grammar.fill_next_token_bitmask(bitmask, index)
        word, bit = divmod(self.start_token_id, 32)
        value = (int(bitmask[index, word]) & 0xFFFFFFFF) | (1 << bit)  # the int32 word as unsigned bits
        bitmask[index, word] = value - (1 << 32) if value >= 1 << 31 else value

    def accept_token(self, token_id: int) -> bool:
        return True  # `decide` has already routed the token

    def is_terminated(self) -> bool:
        return False

    def decide(self, token_id: int) -> GrammarMatcher | None:
        """The matcher for the rest of the output: none while thinking, else the grammar (fed this token)."""
        if token_id == self.start_token_id:
            return None
        return self.grammar


def split_output_reasoning(output: RequestOutput, style: str, tokenizer: Tokenizer) -> RequestOutput:
    """A finished output of a reasoning model with each choice's thinking moved from `text` into
    `reasoning_text` (text keeps the answer, "" when the output was all thinking). Unchanged for "none"."""
    if style == NONE:
        return output
    prompt = tokenizer.decode(output.prompt_token_ids[-_PROMPT_TAIL_TOKENS:], skip_special_tokens=False)
    for choice in output.outputs:
        reasoning, answer = split_reasoning(choice.text, style, prompt)
        choice.reasoning_text, choice.text = reasoning, answer or ""
    return output


def _end_of(ids: list[int], tag: list[int]) -> int:
    """How many of `ids` reach through the first occurrence of `tag` (all of them if absent)."""
    for i in range(len(ids) - len(tag) + 1):
        if ids[i:i + len(tag)] == tag:
            return i + len(tag)
    return len(ids)
