"""Jump-forward structured decoding: text the grammar forces comes in one step, as the model's
tokenizer would spell it, either verified as speculative drafts ("verify", the default) or appended
("append").

Where a grammar admits a single continuation (a JSON object's keys and punctuation, a tool call's
`{"name": "get_weather", "arguments": ` prefix), masked decoding still spends one step per token on
it, and the mask lets the model pick any split of the forced text: a forced `City` can come out as
`C|i|ty`, a spelling the model never saw in training, which a small model then imitates in the free
text that follows. Jump-forward decoding (Zheng et al. 2024, "SGLang: Efficient Execution of
Structured Language Model Programs", the compressed finite-state machine; SGLang's jump-forward with
re-tokenization) appends the forced text itself.

"verify" mode (`JumpForward.forced_drafts`, a `zili.engine.spec_decode.ForcedProposer`). Appending
changes the context from the first forced token on: where the model would have written `{` then `"`,
it now reads `{"`, and its later near-tie choices can flip (on the extraction workload this cost 2
fields of 66, benchmarks/notes/extract-accuracy.md). So by default the forced text's tokens are
drafts instead: before each step, a decoding sequence's grammar is asked for its forced continuation,
which is spelled by the tokenizer (the text alone: the sequence's last token is the model's and stays)
and proposed to the `Speculator` ahead of any n-gram drafts. The step verifies them under the grammar
mask: every token the model agrees with is kept in one forward pass, and where it would split the
text differently the draft is rejected and the model's own token kept. The output is what decoding
without jump-forward gives, token for token under greedy decoding and in distribution under sampling
(a deterministic proposal, so `Speculator.verify`'s rule is the exact rejection rule) -- bit for bit
where the logits are (EngineConfig.deterministic; otherwise the verify rows change the batch, and a
near-tie can flip as with any batching) -- and each
forced token accepted is a step saved. The last forced token is held back when the grammar allows a
longer token starting with it (as in "append" mode, below): the model's next token decides there
anyway, and holding it back saves a row that would mostly be rejected. Forced drafts carry the
model's own logprobs, as any sampled token.

"append" mode (`JumpForward.extend`): after a step, for each constrained sequence whose grammar can
roll back (`RollbackGrammar`):

1. The grammar is advanced over the step's tokens and asked for its forced continuation
   (xgrammar's `find_jump_forward_string`: complete UTF-8 characters only).
2. Re-tokenization across the boundary: the step's last token t (its K/V is not computed yet, so it
   may still change) and the forced text are encoded together by the model's tokenizer. The result
   must spell exactly t's bytes followed by the forced bytes and be accepted by the grammar, else the
   forced text is encoded alone after t; if that fails too, nothing is appended.
3. The last token is held back while the grammar allows a longer token that starts with it (after a
   forced ` "`, the value may start with `"`, and ` ""` is one token): the model's next free token
   then chooses between them, so the end of the jump never forces a split the tokenizer would not
   make.
4. The tokens replace t in the step's output and go through the output processor like sampled ones
   (stop strings, max_tokens, streaming deltas); the scheduler computes their K/V in the next step as
   a short prefill chunk of the running sequence, whose last row samples the next free token.

The grammar is left where it was: the output processor advances it over the appended tokens.

Logprobs ("append" mode). A forced token carries logprob 0.0 and itself as its only alternative: the constrained
process chose it with probability 1 (as the thinking budget's forced closing tokens do,
zili.engine.thinking). The model's own probability of a forced token is not computed: doing so
costs the forward pass jump-forward saves. When re-tokenization merges the sampled token with forced
text (`{` sampled, `{"` appended), the merged token carries the sampled token's logprob and
alternatives: the text it adds beyond the sampled token was forced, with probability 1.

Seeded sampling draws noise keyed on the sequence's seed and the output position (zili.engine.sampler),
so in "verify" mode a verify row draws what plain decoding draws at its position: however the scheduler
cuts the forced drafts to the step's token budget (which depends on the other requests), a seeded request
gets the tokens it gets without jump-forward, bit for bit where its logits are the same bits
(EngineConfig.deterministic). "append" mode changes the context, so the tokens after a jump differ.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from zili.engine.request import Sequence, SequenceStatus, TokenLogprob
from zili.engine.spec_decode import ForcedProposer, RollbackGrammar, VerifiedStep


@runtime_checkable
class JumpGrammar(RollbackGrammar, Protocol):
    """A matcher that rolls back and names its forced continuation (xgrammar's GrammarMatcher)."""

    def find_jump_forward_string(self) -> str:
        """The longest text every continuation starts with (whole UTF-8 characters); state unchanged."""
        ...


@dataclass
class JumpForwardStats:
    """Counters since the engine started."""

    num_jumps: int = 0  # steps in which a sequence got forced text appended ("append") or verified ("verify")
    # Forced tokens that took no step of their own (steps saved): "append": appended beyond the sampled
    # ones (net of boundary merges); "verify": forced drafts accepted.
    num_forced_tokens: int = 0
    num_forced_draft_tokens: int = 0  # "verify": forced tokens proposed as drafts and verified

    @property
    def acceptance_rate(self) -> float:
        """"verify": accepted / proposed forced drafts (0 before any)."""
        n = self.num_forced_draft_tokens
        return self.num_forced_tokens / n if n else 0.0


class JumpForward(ForcedProposer):
    """Grammar-forced text as verified drafts (`forced_drafts`, mode "verify") or appended to a step's
    sampled tokens (`extend`, mode "append"); see the module docstring.

    `grammar_backend` returns the engine's `zili.structured.backend.GrammarBackend` (built lazily
    by the input processor; only called once a constrained sequence is seen): its `token_bytes`
    spell each token id and its bitmasks tell which tokens the grammar allows. `mode`: one of
    zili.choices.JUMP_FORWARD_MODES."""

    def __init__(self, tokenizer: Any, grammar_backend: Callable[[], Any], mode: str = "verify") -> None:
        self.tokenizer = tokenizer
        self.mode = mode
        self._backend_of = grammar_backend
        self._token_bytes: list[bytes] | None = None
        self._longest_token: int | None = None
        self._extensions: dict[int, torch.Tensor] | None = None
        self._bitmask: torch.Tensor | None = None
        self.stats = JumpForwardStats()

    # ---- "verify": forced drafts --------------------------------------------------------------
    def forced_drafts(self, seq: Sequence, max_tokens: int) -> tuple[list[int], bool]:
        """The tokenizer's spelling of the text the sequence's grammar forces after its tokens, at most
        `max_tokens`, each accepted by the grammar (left as it was), the last held back where the
        grammar could extend it; and whether a proposer may draft after them (they spell the whole
        forced text). ([], True) when nothing is forced or the sequence is not eligible."""
        grammar = seq.grammar
        if not self.eligible(seq) or grammar.is_terminated():  # type: ignore[union-attr]
            return [], True
        assert isinstance(grammar, JumpGrammar)
        forced = grammar.find_jump_forward_string()
        if not forced:
            return [], True
        # Only the first max_tokens tokens are used: spell a prefix that surely holds them (twice their
        # longest spelling), not the whole forced text every step (a 64 KB `const` in a client's schema
        # made each step encode 64 KB: ~200 ms on the tiny model). Where the tokenizer would split the
        # text differently at the cut, those tokens are past max_tokens anyway.
        limit = 2 * max_tokens * self.longest_token
        cut = len(forced) > limit
        ids = self._encode(forced[:limit].encode("utf-8") if cut else forced.encode("utf-8"))
        if ids is None:
            return [], False
        stops = seq.request.stop_token_ids
        accepted = 0
        try:
            for t in ids[:max_tokens]:
                if t in stops or not grammar.accept_token(t):
                    break
                accepted += 1
                if grammar.is_terminated():  # no verify row may be masked by a finished grammar
                    grammar.rollback(1)
                    accepted -= 1
                    break
            drafts = ids[:accepted]
            held_back = self._hold_back_last(grammar, drafts, keep_tokens=0)
            accepted = len(drafts)  # what the grammar holds now, rolled back below
            return drafts, not held_back and not cut and accepted == len(ids)
        finally:
            if accepted:
                grammar.rollback(accepted)

    def record_forced(self, seq: Sequence, proposed: int, accepted: int) -> None:
        """After verification (`Speculator.verify`): `proposed` forced drafts of `seq` (after the
        scheduler's cut) were checked and the first `accepted` kept; counted in `stats` (one jump per
        sequence and step)."""
        self.stats.num_jumps += 1
        self.stats.num_forced_draft_tokens += proposed
        self.stats.num_forced_tokens += accepted

    # ---- "append": the step --------------------------------------------------------------------
    def extend(self, step: VerifiedStep) -> VerifiedStep:
        """The step with forced tokens appended after each eligible sequence's last token (which
        re-tokenization may replace). Sequences keep their order; a sequence's entries stay adjacent."""
        groups: dict[Sequence, list[int]] = defaultdict(list)
        for i, seq in enumerate(step.seqs):
            groups[seq].append(i)
        replace: dict[int, tuple[list[int], list[TokenLogprob | None]]] = {}
        for seq, idx in groups.items():
            if not self.eligible(seq):
                continue
            tokens = [step.token_ids[i] for i in idx]
            jump = self._jump(seq, tokens)
            if jump is None:
                continue
            last = step.logprobs[idx[-1]]
            logprobs: list[TokenLogprob | None] = [
                None if last is None else TokenLogprob(jump[0], last.logprob, last.top)]
            logprobs += [None if last is None else TokenLogprob(t, 0.0, [(t, 0.0)]) for t in jump[1:]]
            replace[idx[-1]] = (jump, logprobs)
            self.stats.num_jumps += 1
            self.stats.num_forced_tokens += len(jump) - 1
        if not replace:
            return step
        out = VerifiedStep([], [], [])
        for i, (seq, token_id, logprob) in enumerate(zip(step.seqs, step.token_ids, step.logprobs)):
            ids, lps = replace.get(i, ([token_id], [logprob]))
            out.seqs += [seq] * len(ids)
            out.token_ids += ids
            out.logprobs += lps
        return out

    @staticmethod
    def eligible(seq: Sequence) -> bool:
        """A running sequence with a grammar that can roll back; not one under a thinking budget
        (the engine may replace its tokens mid-step, zili.engine.thinking)."""
        return (seq.status == SequenceStatus.RUNNING and isinstance(seq.grammar, JumpGrammar)
                and seq.request.params.max_reasoning_tokens is None)

    def _jump(self, seq: Sequence, tokens: list[int]) -> list[int] | None:
        """The tokens that replace the step's last token: itself (or a merge) and the forced text;
        None when there is nothing to append. The grammar is left as it was."""
        grammar = seq.grammar
        assert isinstance(grammar, JumpGrammar)
        stops = seq.request.stop_token_ids
        depth = 0  # tokens the matcher accepted here, rolled back at the end
        try:
            for t in tokens:
                if t in stops or not grammar.accept_token(t):
                    return None
                depth += 1
                if grammar.is_terminated():
                    return None
            forced = grammar.find_jump_forward_string()
            if not forced:
                return None
            grammar.rollback(1)  # back to before the last token, which re-tokenization may change
            depth -= 1
            ids = self._retokenize(grammar, tokens[-1], forced.encode("utf-8"))
            if ids is None:
                return None
            depth += len(ids)
            depth -= self._hold_back_last(grammar, ids, len(self.token_bytes[tokens[-1]]))
            if ids == tokens[-1:]:
                return None
            return ids
        finally:
            if depth:
                grammar.rollback(depth)

    def _retokenize(self, grammar: RollbackGrammar, last: int, forced: bytes) -> list[int] | None:
        """The last token and the forced bytes in the tokenizer's own spelling, accepted by the
        grammar (left advanced over them); None when neither spelling fits."""
        head = self.token_bytes[last]
        for candidate in (self._encode(head + forced), self._encode(forced, prefix=[last])):
            if candidate is None:
                continue
            accepted = 0
            for t in candidate:
                if not grammar.accept_token(t):
                    break
                accepted += 1
            if accepted == len(candidate) and not grammar.is_terminated():
                return candidate
            if accepted:
                grammar.rollback(accepted)
        return None

    def _encode(self, data: bytes, prefix: list[int] | None = None) -> list[int] | None:
        """`prefix` + the tokenizer's encoding of `data` (no special tokens), if it spells `data`
        byte for byte (a SentencePiece tokenizer's dummy prefix or normalisation would not)."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # the sampled token ends inside a character
            return None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        table = self.token_bytes
        if not ids or any(i >= len(table) for i in ids) or b"".join(table[i] for i in ids) != data:
            return None
        return (prefix or []) + ids

    def _hold_back_last(self, grammar: RollbackGrammar, ids: list[int], keep_bytes: int = 0, keep_tokens: int = 1) -> int:
        """Drop trailing tokens of `ids` (which the grammar has just accepted) that it could extend into a
        longer token (the model's next free token decides there), keeping the first `keep_tokens` and
        never cutting into the first `keep_bytes` bytes (those the model sampled). `ids` is shortened in
        place; returns how many were dropped (the grammar is rolled back over them)."""
        dropped = 0
        while len(ids) > keep_tokens:
            grammar.rollback(1)
            if not self._extendable(grammar, ids[-1]) or sum(len(self.token_bytes[i]) for i in ids[:-1]) < keep_bytes:
                grammar.accept_token(ids[-1])
                break
            ids.pop()
            dropped += 1
        return dropped

    def _extendable(self, grammar: RollbackGrammar, token_id: int) -> bool:
        """Whether the grammar, in its current state, allows a token that strictly extends `token_id`."""
        longer = self.extensions.get(token_id)
        if longer is None:
            return False
        if self._bitmask is None:
            self._bitmask = torch.zeros(1, (len(self.token_bytes) + 31) // 32, dtype=torch.int32)
        grammar.fill_next_token_bitmask(self._bitmask, 0)
        words = self._bitmask[0, longer // 32]
        return bool(((words >> (longer % 32)) & 1).any())

    # ---- the vocabulary ------------------------------------------------------------------------
    @property
    def token_bytes(self) -> list[bytes]:
        if self._token_bytes is None:
            self._token_bytes = self._backend_of().token_bytes
        return self._token_bytes

    @property
    def longest_token(self) -> int:
        """The most bytes one token spells (at least 1)."""
        if self._longest_token is None:
            self._longest_token = max(1, max(map(len, self.token_bytes), default=1))
        return self._longest_token

    @property
    def extensions(self) -> dict[int, torch.Tensor]:
        """Token id -> ids of the tokens whose bytes start with its bytes and are longer (built once)."""
        if self._extensions is None:
            by_bytes: dict[bytes, list[int]] = defaultdict(list)
            for i, b in enumerate(self.token_bytes):
                if b:
                    by_bytes[b].append(i)
            longer: dict[int, list[int]] = defaultdict(list)
            for i, b in enumerate(self.token_bytes):
                for n in range(1, len(b)):
                    for j in by_bytes.get(b[:n], ()):
                        longer[j].append(i)
            self._extensions = {j: torch.tensor(ids, dtype=torch.long) for j, ids in longer.items()}
        return self._extensions
