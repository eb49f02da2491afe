"""Output processing: sampled tokens -> per-sequence deltas (text, ids, logprobs, finish).

One `OutputProcessor` per engine. For every sequence it keeps a `SequenceOutputProcessor`, which
owns that sequence's incremental detokenizer and stop-string state and advances its grammar
matcher. A step's sampled tokens go in; `CompletionDelta`s (grouped into `RequestDelta`s) and the
sequences that finished come out. The engine frees finished sequences' KV blocks; nothing here
touches the scheduler or the model.

Held-back text: text is released as soon as it cannot be part of a stop string. Only the longest
tail of the pending text that is a proper prefix of some stop string is held (not a fixed
`len(stop) - 1` characters, which stalled streams whenever stop strings were set). Everything a
step does here is O(new tokens + stop-string lengths), never O(tokens generated so far).

Seam for per-sequence policies (reasoning budgets, a grammar that starts after `</think>`):
subclass `SequenceOutputProcessor` and pass the subclass as `OutputProcessor(sequence_processor=...)`.
Its `accept` is called with each sampled token and returns the sequence's delta for the step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from zili.engine.request import CompletionDelta, RequestDelta, Sequence, SequenceStatus, TokenLogprob
from zili.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)


class Detokenizer(Protocol):
    """Incremental detokenizer (zili.tokenizer.IncrementalDetokenizer): token ids in, text pieces out."""

    def add(self, token_id: int) -> str:
        """Append one token id; the newly completed text ("" while a character is unfinished)."""
        ...

    def flush(self) -> str:
        """Release whatever is still held (an unfinished character decodes as U+FFFD)."""
        ...


class StopStringMatcher:
    """Finds stop strings across token boundaries while holding back as little text as possible.

    `feed(piece)` returns (text safe to emit, the stop string found or None). Text that is emitted
    never contains the start of a stop string that later text could complete: the held tail is the
    longest suffix of the pending text that is a proper prefix of some stop string.
    """

    def __init__(self, stops: list[str], include_stop: bool) -> None:
        self.stops = stops
        self.include_stop = include_stop
        self.held = ""

    def feed(self, piece: str) -> tuple[str, str | None]:
        text = self.held + piece
        found: tuple[int, str] | None = None
        for stop in self.stops:
            idx = text.find(stop)
            if idx != -1 and (found is None or idx < found[0]):
                found = (idx, stop)
        if found is not None:
            idx, stop = found
            self.held = ""
            return text[:idx + len(stop)] if self.include_stop else text[:idx], stop
        keep = self._held_tail(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], None

    def _held_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """The held tail, released when the sequence ends for another reason."""
        text, self.held = self.held, ""
        return text


class SequenceOutputProcessor:
    """One sequence's output state. `accept` turns a sampled token into the sequence's delta.

    Order per token: the grammar (a token outside it aborts; its end finishes), stop token ids,
    the detokenizer, stop strings, then the length limits. On a finish the remaining text is
    flushed (except after a stop string, which ends the text) and `seq.finish_reason` is set.
    """

    def __init__(self, seq: Sequence, detokenizer: Detokenizer, eos_token_ids: frozenset[int],
                 max_model_len: int) -> None:
        self.seq = seq
        self.detokenizer = detokenizer
        params = seq.request.params
        self.stop = StopStringMatcher(list(params.stop), params.include_stop_str_in_output) if params.stop else None
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def accept(self, token_id: int, logprob: TokenLogprob | None) -> CompletionDelta:
        """Append the sampled token to the sequence and say what it adds to the output."""
        seq, req = self.seq, self.seq.request
        seq.token_ids.append(token_id)
        delta = CompletionDelta(seq.index, "", [token_id],
                                [logprob] if logprob is not None and req.params.logprobs is not None else None)
        if seq.grammar is not None and self.advance_grammar(token_id, delta):
            return delta
        if token_id in req.stop_token_ids:
            user_stop = token_id not in self.eos_token_ids or token_id in req.params.stop_token_ids
            return self.finish(delta, "stop", token_id if user_stop else None)
        piece = self.detokenizer.add(token_id)
        if self.stop is not None:
            delta.text, stop = self.stop.feed(piece)
            if stop is not None:
                return self.finish(delta, "stop", stop, flush=False)
        else:
            delta.text = piece
        if seq.num_output_tokens >= req.max_tokens or seq.num_tokens >= self.max_model_len:
            return self.finish(delta, "length", None)
        return delta

    def advance_grammar(self, token_id: int, delta: CompletionDelta) -> bool:
        """Feed the token to the sequence's matcher; True when that finished the sequence."""
        assert self.seq.grammar is not None
        if not self.seq.grammar.accept_token(token_id):  # only if the mask was overridden: end, don't crash
            logger.error("structured output: %s sampled token %d outside its grammar", self.seq.seq_id, token_id)
            self.finish(delta, "abort", None)
            return True
        if self.seq.grammar.is_terminated() and token_id not in self.seq.request.stop_token_ids:
            delta.text = self.detokenizer.add(token_id)  # the grammar's own end (e.g. EOS under ignore_eos)
            self.finish(delta, "stop", token_id)
            return True
        return False

    def finish(self, delta: CompletionDelta, reason: str, stop_reason: int | str | None,
               flush: bool = True) -> CompletionDelta:
        """Mark the sequence finished (its blocks are freed by the engine) and close its text."""
        if flush:
            if self.stop is not None:
                delta.text += self.stop.flush()
            delta.text += self.detokenizer.flush()
        self.seq.finish_reason, self.seq.stop_reason = reason, stop_reason
        delta.finish_reason, delta.stop_reason = reason, stop_reason
        return delta


SequenceProcessorFactory = Callable[[Sequence, Detokenizer, frozenset[int], int], SequenceOutputProcessor]


class OutputProcessor:
    """Turns each step's sampled tokens into `RequestDelta`s; one per engine."""

    def __init__(self, tokenizer: Tokenizer, max_model_len: int,
                 sequence_processor: SequenceProcessorFactory = SequenceOutputProcessor) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids)
        self.sequence_processor = sequence_processor
        self._sequences: dict[Sequence, SequenceOutputProcessor] = {}

    def add(self, seq: Sequence) -> None:
        """Start tracking a new sequence (called once, when its request is added)."""
        detokenizer = IncrementalDetokenizer(self.tokenizer, seq.request.params.skip_special_tokens)
        self._sequences[seq] = self.sequence_processor(seq, detokenizer, self.eos_token_ids, self.max_model_len)

    def release(self, seq: Sequence) -> None:
        """Forget a sequence (finished or aborted)."""
        self._sequences.pop(seq, None)

    @property
    def num_sequences(self) -> int:
        return len(self._sequences)

    def process(self, seqs: list[Sequence], token_ids: list[int],
                logprobs: Iterable[TokenLogprob | None]) -> tuple[list[RequestDelta], list[Sequence]]:
        """Apply one step's sampled tokens (one per entry of `seqs`, in order).

        A sequence may appear several times in a row (speculative decoding accepts several tokens
        a step): its tokens are applied in order into one delta, and those after its finish are
        dropped. Returns the deltas of every touched request (sequences of one request grouped, in
        order) and the sequences that finished in this step (the caller frees their KV blocks)."""
        by_request: dict[str, list[CompletionDelta]] = {}
        requests = {}
        finished: list[Sequence] = []
        last: tuple[Sequence, CompletionDelta] | None = None
        for seq, token_id, logprob in zip(seqs, token_ids, logprobs):
            if seq.status == SequenceStatus.FINISHED:  # tokens after a finish in the same step
                continue
            delta = self._sequences[seq].accept(token_id, logprob)
            if delta.finish_reason is not None:
                finished.append(seq)
                seq.status = SequenceStatus.FINISHED
                self.release(seq)
            if last is not None and last[0] is seq:
                _merge(last[1], delta)
                continue
            last = (seq, delta)
            rid = seq.request.request_id
            by_request.setdefault(rid, []).append(delta)
            requests[rid] = seq.request
        return [requests[rid].delta(deltas) for rid, deltas in by_request.items()], finished

    def abort(self, seqs: list[Sequence]) -> list[CompletionDelta]:
        """End these unfinished sequences as "abort" (no further text); their final deltas."""
        return self.end(seqs, "abort")

    def end(self, seqs: list[Sequence], finish_reason: str) -> list[CompletionDelta]:
        """End these sequences without a new token (abort; a prefill-only request whose prompt is
        done ends as "length"); their final deltas."""
        out = []
        for seq in seqs:
            seq.finish_reason, seq.stop_reason = finish_reason, None
            self.release(seq)
            out.append(CompletionDelta(seq.index, "", [], None, finish_reason, None))
        return out


def _merge(into: CompletionDelta, delta: CompletionDelta) -> None:
    """Append a later token's delta of the same sequence to the step's delta."""
    into.text += delta.text
    into.token_ids += delta.token_ids
    if delta.logprobs is not None:
        into.logprobs = (into.logprobs or []) + delta.logprobs
    into.finish_reason, into.stop_reason = delta.finish_reason, delta.stop_reason
