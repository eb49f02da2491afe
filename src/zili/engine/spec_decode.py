"""Speculative decoding: drafts from a proposer, verified in the batch's step.

Proposers (`Proposer`, the seam): draftless n-gram lookup (`NgramProposer`, below), a draft model
(`zili.engine.draft_model.DraftModelProposer`, Leviathan et al. 2023) and DeepSeek's multi-token-prediction
layer (`zili.engine.mtp.MTPProposer`, a `HiddenStateProposer`: it drafts from the target's hidden
states). `Speculator` decides who gets drafts and how many, asks the proposer, and verifies; it knows
nothing of how drafts are made.

N-gram proposals. A sequence's last n tokens (n from prompt_lookup_max down to prompt_lookup_min) are looked
up earlier in its own prompt and output; the tokens that followed the most recent earlier occurrence
are proposed as drafts, at most num_speculative_tokens of them (Saxena 2023, "Prompt Lookup
Decoding"; vLLM's `ngram` method, llama.cpp's `--spec-type ngram-*`). Input-grounded work (filling a
form from a document, quoting a contract) copies long runs from the prompt, so many drafts hit.

Adaptive, per sequence: the draft length follows transformers' "heuristic" schedule for assisted
generation (+2 after a step that accepted every draft, -1 otherwise), and a step whose drafts all
missed pauses proposals for 1, 2, 4 ... 32 steps, so a request whose text does not repeat costs no
more than a few wasted verify rows. `disable_by_batch_size` stops proposals in large batches, where
a step is no longer bound by reading the weights and verify rows cost nearly as much as new tokens.

Verification (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling"). A decode
sequence with k drafts d1..dk sends k + 1 tokens (its last token and the drafts) through the same
forward pass as the other sequences' decodes and prefill chunks. The engine gives each of those
tokens its own decode row (same block table, one more context position per row), so every attention
backend's batched decode path, the compiled decode graph and captured device graphs verify drafts
without a multi-token query path of their own, and the rows' logits come back in order. Row j's
logits give the target distribution p_j of the token after d1..dj. The sampler draws t_j ~ p_j for
every row (the argmax for greedy requests, with the request's own processing and seed); drafts are
accepted while t_j == d_{j+1}, and the first t_j that differs, or t_k after all k were accepted (the
bonus token), ends the step's output.

For a draftless proposer, and for a draft model drafting greedily (its argmax is a function of the
context), the draft distribution is a point mass on d, and this is exactly the
speculative rejection rule: accept d with probability min(1, p(d) / 1) = p(d); on rejection draw from
the residual max(0, p - q), renormalised, which is p with d removed. Drawing t ~ p and accepting when
t == d does both at once: P(accept) = p(d), and given t != d, t is distributed as p restricted to
x != d, renormalised. So the output distribution equals plain decoding's, and greedy output is
identical token for token (tests/unit/test_spec_decode.py checks both) where the verify rows' logits
are plain decoding's bits (EngineConfig.deterministic; otherwise a near-tie can flip, as with any
change of the batch).

Rejected drafts' K/V slots are rolled back by the scheduler (`Scheduler.on_step_done(num_rejected)`,
`KVCacheManager.trim`).

Structured output: drafts go through the sequence's grammar matcher. A proposal is cut before the
first token the grammar refuses (or that would end it), then the matcher is rolled back; at
verification row j is masked with the grammar's state after d1..dj (`DraftGrammarRows` accepts the
drafts one by one while the rows' bitmasks are filled, then rolls them back), so each row's draw is
what plain constrained decoding would draw after the same tokens, and the output processor advances
the matcher over the accepted tokens as it does over sampled ones.

Forced drafts (jump-forward structured decoding in "verify" mode, zili.engine.jump_forward). Where a
sequence's grammar admits a single continuation, a `ForcedProposer` spells it as the tokenizer would;
those tokens lead the sequence's drafts, and a `ContinuingProposer` (the n-gram lookup) may add its own
drafts after them. They are verified like any draft: the model keeps its own token where it would
split the forced text differently, so the output is the same as decoding without them (greedy: token
for token; sampled: in distribution, the forced drafts being a deterministic proposal). Their budget
is separate from num_speculative_tokens (at most MAX_FORCED_DRAFT_TOKENS): num_speculative_tokens
bounds guesses, adaptively, because a missed guess wastes its row, while forced text is what the
grammar allows byte for byte, rejected only where the model splits it differently (at its first or
last token, as a rule), so a long forced run is accepted nearly whole and saves that many steps.
They are counted in the forced proposer's statistics, not in `SpecDecodeStats` (whose acceptance
rate stays the proposer's), and the proposer's adaptive length and pauses see only its own drafts
(and only in steps where every forced draft before them was accepted, so that they were verified).

Sequences that do not speculate: those with repetition / presence / frequency penalties or a pending
min_tokens (both change with every position of the draft), a thinking budget (the engine may replace
a token mid-step), or a grammar still held back while a reasoning model thinks; they decode one token
a step beside the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from zili.config import SpeculativeConfig
from zili.engine.kv_cache import KVCacheManager
from zili.engine.request import GrammarMatcher, Sequence, SequenceStatus, TokenLogprob

MAX_PAUSE_STEPS = 32  # the longest pause in proposals after repeated misses
# The most forced drafts (jump-forward "verify" mode) a sequence carries into one step: a JSON key with its
# punctuation is 3-8 tokens, a tool call's `{"name": "get_weather", "arguments": {"` about 12.
MAX_FORCED_DRAFT_TOKENS = 16


@runtime_checkable
class RollbackGrammar(GrammarMatcher, Protocol):
    """A grammar matcher that can undo accepted tokens (xgrammar's `GrammarMatcher.rollback`):
    what drafts need. A matcher without it (a reasoning model's think-or-answer switch) gets none."""

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens."""
        ...


class NgramIndex:
    """Where each n-gram (n in [min_n, max_n]) of one sequence's tokens last occurred, kept up to date
    as tokens are appended (token lists only grow, also across preemption), so a lookup costs
    O(new tokens * number of n) instead of a scan of the whole context."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.sizes = list(range(max_n, min_n - 1, -1))  # longest first
        self.ends: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.indexed = 0  # n-grams ending (exclusive) before this position are in `ends`

    def propose(self, tokens: list[int], k: int, known: int | None = None) -> list[int]:
        """Up to `k` tokens that followed the most recent earlier occurrence of the longest suffix of
        `tokens` found (none when no suffix of at least min_n tokens occurred before). A match that
        runs into the end of `tokens` continues periodically (the repeat continues the repeat).
        `known`: only `tokens[:known]` are the sequence's for good (the rest are drafts that may be
        rejected): occurrences are indexed from those alone."""
        length = len(tokens)
        limit = length if known is None else min(known, length)
        # Index occurrences whose continuation starts inside the known tokens (end <= limit - 1); the
        # suffix itself (end == length) is not an earlier occurrence.
        for end in range(max(self.indexed, 1), limit):
            for n in self.sizes:
                if end >= n:
                    self.ends[n][tuple(tokens[end - n:end])] = end
        self.indexed = max(self.indexed, limit)
        for n in self.sizes:
            if length <= n:
                continue
            found = self.ends[n].get(tuple(tokens[length - n:]))
            if found is None:
                continue
            draft: list[int] = []
            for i in range(k):
                j = found + i
                draft.append(tokens[j] if j < length else draft[j - length])
            return draft
        return []


@runtime_checkable
class Proposer(Protocol):
    """Makes draft tokens for `Speculator` (the seam between proposing and verifying).

    A proposer may keep per-sequence state (an n-gram index, a draft model's KV cache); `release`
    drops it and gives back what it holds. The speculator releases a sequence when it finishes, is
    aborted, or stops running (preempted), and asks again from scratch later."""

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        """Per sequence, at most `num_tokens[i]` (>= 1) tokens to follow `seqs[i].token_ids` (fewer or
        none where it has no proposal). The drafts must be a deterministic function of the sequence's
        tokens (a point-mass draft distribution): that is what the verification rule assumes."""
        ...

    def release(self, seq_id: str) -> None:
        """Forget a sequence (idempotent)."""
        ...


@runtime_checkable
class ContinuingProposer(Proposer, Protocol):
    """A proposer that can also draft after hypothetical tokens (the n-gram lookup): used to continue
    after forced drafts."""

    def propose_after(self, seqs: list[Sequence], heads: list[list[int]], num_tokens: list[int]) -> list[list[int]]:
        """As `propose`, for tokens that follow `seqs[i].token_ids + heads[i]`."""
        ...


@runtime_checkable
class ForcedProposer(Protocol):
    """Proposes the tokens a sequence's grammar forces next (zili.engine.jump_forward.JumpForward in
    "verify" mode) and keeps the counts of what verification made of them."""

    def forced_drafts(self, seq: Sequence, max_tokens: int) -> tuple[list[int], bool]:
        """At most `max_tokens` (>= 1) tokens of the text the sequence's grammar forces after its tokens,
        each accepted by the grammar (which is left as it was), and whether another proposer may draft
        after them (False where they stop short of the forced text's end). ([], True) when nothing is
        forced. A deterministic function of the sequence's tokens."""
        ...

    def record_forced(self, seq: Sequence, proposed: int, accepted: int) -> None:
        """After verification: `proposed` forced drafts of the sequence were checked, `accepted` kept."""
        ...


@dataclass
class TargetRows:
    """One sequence's rows of a step that the target computed and kept (verified), each with its next token
    known: positions start .. start + num_rows - 1, whose final hidden states are rows first_row ..
    first_row + num_rows - 1 of the step's hidden states (StepInput order), and whose next tokens are
    seq.token_ids[start + 1 .. start + num_rows]."""

    seq: Sequence
    start: int
    first_row: int
    num_rows: int


@runtime_checkable
class HiddenStateProposer(Proposer, Protocol):
    """A proposer that drafts from the target's final hidden states and keeps its KV entries in the
    target's own blocks (DeepSeek MTP, zili.engine.mtp): the engine asks the runner for every step's hidden
    states (`StepInput.keep_hidden`), hands them over after verification, and makes its KV pool recompute
    a prefix hit's last block (`KVCacheManager.recompute_last_hit_block`)."""

    def bind_kv_cache(self, kv: KVCacheManager) -> None:
        """The target's block bookkeeping (called once by the engine, before any step)."""
        ...

    def observe(self, hidden: torch.Tensor, rows: list[TargetRows]) -> None:
        """After each step's verification, before rejected slots are rolled back and finished sequences
        free their blocks: the step's hidden states [step rows, hidden] and the rows to take from them."""
        ...


class NgramProposer:
    """Prompt-lookup drafts (see the module docstring): one `NgramIndex` per sequence."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.indexes: dict[str, NgramIndex] = {}

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        out = []
        for seq, k in zip(seqs, num_tokens):
            index = self.indexes.get(seq.seq_id)
            if index is None:
                index = self.indexes[seq.seq_id] = NgramIndex(self.min_n, self.max_n)
            out.append(index.propose(seq.token_ids, k))
        return out

    def propose_after(self, seqs: list[Sequence], heads: list[list[int]], num_tokens: list[int]) -> list[list[int]]:
        """Per sequence, at most `num_tokens[i]` tokens to follow `seqs[i].token_ids + heads[i]` (the
        head: forced drafts, not yet verified): the suffix of that text is looked up among the earlier
        occurrences in the sequence's own tokens, which alone are indexed (`NgramIndex.propose(known=...)`:
        verification may reject the head). [] where nothing matches."""
        out = []
        for seq, head, k in zip(seqs, heads, num_tokens):
            index = self.indexes.get(seq.seq_id)
            if index is None:
                index = self.indexes[seq.seq_id] = NgramIndex(self.min_n, self.max_n)
            out.append(index.propose([*seq.token_ids, *head], k, known=len(seq.token_ids)))
        return out

    def release(self, seq_id: str) -> None:
        self.indexes.pop(seq_id, None)


@dataclass
class SpecState:
    """One sequence's adaptive draft length and pause (whatever the proposer)."""

    draft_len: int
    misses: int = 0  # consecutive verify steps that accepted nothing
    pause: int = 0  # steps left without proposals


@dataclass
class SpecDecodeStats:
    """Counters since the engine started (vLLM's spec_decode_* metrics)."""

    num_drafts: int = 0  # verify steps of a sequence with at least one draft token
    num_draft_tokens: int = 0  # draft tokens proposed and verified
    num_accepted_tokens: int = 0  # of which accepted
    accepted_per_pos: list[int] = field(default_factory=list)  # accepted drafts at each draft position

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verify step yields on average: 1 (the target's own token) + accepted drafts."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


@dataclass
class VerifiedStep:
    """A step's sampled tokens after verification, for `OutputProcessor.process`: `seqs[i]` gains
    `token_ids[i]` (a sequence repeats once per accepted token, in order)."""

    seqs: list[Sequence]
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Speculator:
    """Gets drafts for running decode sequences from a `Proposer` (default: n-gram lookup per `config`)
    and, where a `ForcedProposer` is given, the grammar's forced text before them; verifies them after
    the forward pass. `config` None: forced drafts only (speculative decoding off, jump-forward's
    "verify" mode on)."""

    def __init__(self, config: SpeculativeConfig | None, max_model_len: int, proposer: Proposer | None = None,
                 forced: ForcedProposer | None = None) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.proposer: Proposer | None = proposer if proposer is not None or config is None else \
            NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        self.forced = forced
        self.states: dict[str, SpecState] = {}
        self.proposing: set[str] = set()  # sequences the proposer may hold state for
        self.num_forced: dict[str, int] = {}  # per sequence: how many of its drafts this step are forced
        self.stats = SpecDecodeStats(accepted_per_pos=[0] * (config.num_speculative_tokens if config else 0))

    # ---- proposals ---------------------------------------------------------------------------------
    def propose(self, running: list[Sequence]) -> None:
        """Set `draft_token_ids` on the running sequences that decode next and have a proposal (the
        scheduler may shorten or drop it to fit the step's budget and the KV pool)."""
        for seq in running:  # last step's proposals are spent or stale
            seq.draft_token_ids = []
        self.num_forced = {}
        live = {seq.seq_id for seq in running}
        if self.proposer is not None:
            for seq_id in self.proposing - live:  # preempted since: give back what the proposer holds
                self.proposer.release(seq_id)
        self.proposing &= live
        config = self.config
        limit = config.disable_by_batch_size if config is not None else None
        proposer_on = self.proposer is not None and (limit is None or len(running) < limit)
        structured_only = config is not None and config.requests == "structured"
        asked: list[Sequence] = []
        lengths: list[int] = []
        for seq in running:
            if not self.eligible(seq):
                continue
            req = seq.request
            room = min(req.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens) - 1
            if room <= 0:
                continue
            forced: list[int] = []
            may_continue = True
            if self.forced is not None:
                forced, may_continue = self.forced.forced_drafts(seq, min(room, MAX_FORCED_DRAFT_TOKENS))
                if forced:
                    seq.draft_token_ids = forced
                    self.num_forced[seq.seq_id] = len(forced)
            if not proposer_on or (structured_only and req.params.structured is None):
                continue
            if forced and not (may_continue and isinstance(self.proposer, ContinuingProposer)):
                continue
            state = self.states.get(seq.seq_id)
            if state is None:
                assert config is not None
                state = self.states[seq.seq_id] = SpecState(config.num_speculative_tokens)
            if state.pause > 0:
                state.pause -= 1
                continue
            k = min(state.draft_len, room - len(forced))
            if k > 0:
                asked.append(seq)
                lengths.append(k)
        if not asked:
            return
        assert self.proposer is not None
        self.proposing.update(seq.seq_id for seq in asked)
        heads = [seq.draft_token_ids for seq in asked]
        if any(heads):
            assert isinstance(self.proposer, ContinuingProposer)
            proposals = self.proposer.propose_after(asked, heads, lengths)
        else:
            proposals = self.proposer.propose(asked, lengths)
        for seq, k, head, drafts in zip(asked, lengths, heads, proposals):
            drafts = drafts[:k]
            if drafts and isinstance(seq.grammar, RollbackGrammar):
                drafts = grammar_prefix(seq.grammar, [*head, *drafts])[len(head):]
            seq.draft_token_ids = [*head, *drafts]

    @staticmethod
    def eligible(seq: Sequence) -> bool:
        """Whether this sequence may carry drafts into its next step (see the module docstring)."""
        p = seq.request.params
        # A grammar must be attached and able to roll back (not held back behind a reasoning model's thinking).
        grammar_ok = p.structured is None or isinstance(seq.grammar, RollbackGrammar)
        return (seq.status == SequenceStatus.RUNNING and seq.num_computed_tokens == seq.num_tokens - 1
                and not seq.request.prefill_only and grammar_ok and not p.needs_penalties
                and seq.num_output_tokens >= p.min_tokens and p.max_reasoning_tokens is None)

    def release(self, seq: Sequence) -> None:
        """Forget a finished or aborted sequence (and give back what the proposer holds for it)."""
        self.states.pop(seq.seq_id, None)
        self.proposing.discard(seq.seq_id)
        if self.proposer is not None:
            self.proposer.release(seq.seq_id)

    # ---- verification ------------------------------------------------------------------------------
    def verify(self, sampled_ids: list[int], logprobs: list[TokenLogprob | None],
               sampling: list[Sequence]) -> tuple[VerifiedStep, list[int]]:
        """Accept drafts against the target's tokens.

        `sampled_ids` / `logprobs`: one per logits row, the sampler's draw from each row, rows in the
        order of `rows_of(sampling)`. Returns the tokens to append and, per entry of `sampling`,
        how many of its draft tokens were rejected (their K/V slots are rolled back)."""
        out = VerifiedStep([], [], [])
        num_rejected: list[int] = []
        row = 0
        for seq in sampling:
            drafts = seq.draft_token_ids
            accepted = 0
            while accepted < len(drafts) and sampled_ids[row + accepted] == drafts[accepted]:
                accepted += 1
            for j in range(accepted + 1):  # the accepted drafts (= the target's tokens), then its next one
                out.seqs.append(seq)
                out.token_ids.append(sampled_ids[row + j])
                out.logprobs.append(logprobs[row + j])
            # The scheduler may have cut the drafts: the forced ones lead, so they are cut last.
            forced = min(self.num_forced.get(seq.seq_id, 0), len(drafts))
            if forced:
                assert self.forced is not None
                self.forced.record_forced(seq, forced, min(accepted, forced))
            if len(drafts) > forced and accepted >= forced:  # the proposer's drafts were reached and checked
                self._record(seq, len(drafts) - forced, accepted - forced)
            num_rejected.append(len(drafts) - accepted)
            row += 1 + len(drafts)
        return out, num_rejected

    @staticmethod
    def rows_of(sampling: list[Sequence]) -> list[Sequence]:
        """One entry per logits row: each sequence once, then once more per draft token."""
        return [seq for seq in sampling for _ in range(1 + len(seq.draft_token_ids))]

    def _record(self, seq: Sequence, proposed: int, accepted: int) -> None:
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += proposed
        stats.num_accepted_tokens += accepted
        for pos in range(accepted):
            stats.accepted_per_pos[pos] += 1
        state = self.states.get(seq.seq_id)
        if state is None or self.config is None:
            return
        k_max = self.config.num_speculative_tokens
        if accepted == proposed:
            state.draft_len = min(k_max, state.draft_len + 2)
        else:
            state.draft_len = max(1, state.draft_len - 1)
        if accepted == 0:
            state.misses += 1
            state.pause = min(MAX_PAUSE_STEPS, 2 ** (state.misses - 1))
        else:
            state.misses = 0


def grammar_prefix(grammar: RollbackGrammar, drafts: list[int]) -> list[int]:
    """The longest prefix of `drafts` the grammar accepts without ending; the matcher is left as it was."""
    accepted = 0
    for token_id in drafts:
        if not grammar.accept_token(token_id):
            break
        accepted += 1
        if grammar.is_terminated():  # no row may be masked by a finished grammar
            break
    if accepted and grammar.is_terminated():
        grammar.rollback(1)
        accepted -= 1
    if accepted:
        grammar.rollback(accepted)
    return drafts[:accepted]


class DraftGrammarRows:
    """The grammar seen by a sequence's verify rows: row j's bitmask is filled in the matcher's state
    after the first j drafts. Rows must be filled in order (GrammarBackend.build_mask does); `close()`
    rolls the matcher back to where it was."""

    def __init__(self, grammar: RollbackGrammar, drafts: list[int]) -> None:
        self.grammar, self.drafts = grammar, drafts
        self.advanced = 0  # drafts the matcher has accepted

    def row(self, j: int) -> _DraftRowGrammar:
        return _DraftRowGrammar(self, j)

    def fill(self, j: int, bitmask: torch.Tensor, index: int) -> None:
        while self.advanced < j:
            if not self.grammar.accept_token(self.drafts[self.advanced]):  # proposals were checked: cannot happen
                raise RuntimeError(f"draft token {self.drafts[self.advanced]} left the grammar")
            self.advanced += 1
        if self.advanced > j:
            self.grammar.rollback(self.advanced - j)
            self.advanced = j
        self.grammar.fill_next_token_bitmask(bitmask, index)

    def close(self) -> None:
        if self.advanced:
            self.grammar.rollback(self.advanced)
            self.advanced = 0


@dataclass
class _DraftRowGrammar:
    """One verify row's view of the grammar, for GrammarBackend.build_mask (which reads `.grammar`)."""

    rows: DraftGrammarRows
    j: int

    @property
    def grammar(self) -> _DraftRowGrammar:
        return self

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        self.rows.fill(self.j, bitmask, index)


def grammar_rows(sampling: list[Sequence]) -> tuple[list[object], list[DraftGrammarRows]]:
    """Per logits row, what the grammar mask builder reads (`.grammar`): the sequence itself, or for
    a constrained sequence's verify rows, a view in the state after that row's drafts. Also the
    views to `close()` once the mask is built."""
    out: list[object] = []
    opened: list[DraftGrammarRows] = []
    for seq in sampling:
        if not seq.draft_token_ids or not isinstance(seq.grammar, RollbackGrammar):
            out += [seq] * (1 + len(seq.draft_token_ids))
            continue
        rows = DraftGrammarRows(seq.grammar, seq.draft_token_ids)
        opened.append(rows)
        out += [rows.row(j) for j in range(1 + len(seq.draft_token_ids))]
    return out, opened


def expand_rows(token_ids: list[int], start: int, table: list[int]) -> tuple[list[list[int]], list[int],
                                                                                list[list[int]]]:
    """A verify sequence's k + 1 tokens as k + 1 one-token decode rows: token lists, start positions and
    block tables (the same table; row j sees the context through its own position start + j)."""
    return [[t] for t in token_ids], [start + j for j in range(len(token_ids))], [table] * len(token_ids)
