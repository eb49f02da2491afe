"""Scheduler: continuous batching with chunked prefill and preemption by recompute.

Each step packs one batch within a token budget (max_num_batched_tokens) and a sequence cap
(max_num_seqs). Running sequences go first (mostly one decode token each, or the next chunk of
a long prompt), then waiting sequences are admitted while the budget, the cap and the KV pool
allow. When the pool runs dry, the most recently admitted running sequence is preempted: its
blocks are freed and it goes back to the front of the queue to be recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from zili.engine.kv_cache import KVCacheManager
from zili.engine.request import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    def add(self, seq: Sequence, num_new: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    """Continuous batching over one KVCacheManager: the waiting queue, the running list, preemption."""

    def __init__(self, kv_cache: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 next_token_entries: bool = False) -> None:
        self.kv = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # A proposer keeps per-position entries in these blocks that need the position's next token
        # (DeepSeek MTP's, zili.engine.mtp): a prefill-only prompt's last position has none, so its
        # block is not offered to the prefix cache (a later hit that is not its last hit block, which
        # is recomputed, would read a stale entry there).
        self.next_token_entries = next_token_entries
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        """Choose what runs in the next step and reserve its KV blocks.

        Running sequences come first, in admission order: each gets its remaining tokens (one for a
        decode, the next chunk of a long prompt) within `max_num_batched_tokens`; when the pool
        cannot hold them, the most recently admitted running sequences are preempted (blocks freed,
        back to the front of the waiting queue, recomputed later). Then, unless this step
        preempted, waiting sequences are admitted in order while the token budget, `max_num_seqs`
        and the pool allow, reusing prefix-cached blocks (or a sibling's prompt blocks, for n > 1).
        Returns the batch: each sequence with its number of new tokens (possibly empty). Call
        `on_step_done(batch)` after the forward pass.
        """
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            num_new += self._fit_drafts(seq, num_new, budget)
            while not self.kv.allocate(seq.seq_id, seq.num_computed_tokens + num_new):
                if seq.draft_token_ids:  # drop the proposal before preempting anyone for it
                    num_new -= len(seq.draft_token_ids)
                    seq.draft_token_ids = []
                    continue
                preempted = True
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status == SequenceStatus.RUNNING:
                batch.add(seq, num_new)
                budget -= num_new
        if not preempted:
            self._admit_waiting(batch, budget)
        return batch

    @staticmethod
    def _fit_drafts(seq: Sequence, num_new: int, budget: int) -> int:
        """How many of the sequence's draft tokens (zili.engine.spec_decode) run this step: they follow
        a decode's one new token, within the token budget; none while its prompt is still prefilling."""
        if not seq.draft_token_ids:
            return 0
        if num_new != 1 or seq.num_tokens - seq.num_computed_tokens != 1 or budget < 2:
            seq.draft_token_ids = []
            return 0
        del seq.draft_token_ids[budget - 1:]
        return len(seq.draft_token_ids)

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            seq.draft_token_ids = []
            parent = seq.request.sequences[0]
            if seq is not parent and not self._fork_ready(seq, parent):
                deferred.append(seq)
                continue
            if seq is not parent and parent.seq_id in self.kv.tables:
                cached: list[int] = []
                seq.num_computed_tokens = self.kv.share_prefix(
                    parent.seq_id, seq.seq_id, min(seq.num_prompt_tokens - 1, parent.num_computed_tokens))
            else:
                # Positions a request still has to score or pool are computed, never taken from the cache.
                limit = seq.request.reusable_prefix_tokens(seq)
                cached = self.kv.find_cached_prefix(seq.token_ids if limit is None else seq.token_ids[:limit + 1])
                seq.num_computed_tokens = len(cached) * self.kv.block_size
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.kv.allocate(seq.seq_id, seq.num_computed_tokens + num_new, cached):
                self.kv.free(seq.seq_id)  # drop a forked child's shared blocks, if any
                seq.num_computed_tokens = 0
                self.waiting.appendleft(seq)
                break
            if seq.num_output_tokens == 0:
                seq.num_cached_prompt_tokens = seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, num_new)
            budget -= num_new
        self.waiting.extendleft(reversed(deferred))

    @staticmethod
    def _fork_ready(seq: Sequence, parent: Sequence) -> bool:
        """A sibling of an n > 1 request starts once the first sequence has its prompt computed."""
        return parent.is_finished or parent.num_computed_tokens >= seq.num_prompt_tokens

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.draft_token_ids = []
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove the sequence wherever it is and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq.seq_id)
        seq.status = SequenceStatus.FINISHED

    def on_step_done(self, batch: ScheduledBatch, num_rejected: list[int] | None = None) -> None:
        """Advance computed counts and register newly full blocks in the prefix cache.

        Call it after the step's tokens were appended and before finished sequences are freed.
        `num_rejected[i]` (speculative decoding): how many of sequence i's new tokens were drafts
        that verification rejected; their K/V slots are rolled back (blocks no longer needed are
        returned to the pool). A sequence never counts more tokens computed than it holds."""
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            rejected = num_rejected[i] if num_rejected is not None else 0
            seq.num_computed_tokens = min(seq.num_computed_tokens + num_new - rejected, seq.num_tokens)
            seq.draft_token_ids = []
            if seq.seq_id not in self.kv.tables:  # aborted during the step
                continue
            if rejected:
                self.kv.trim(seq.seq_id, seq.num_computed_tokens)
            complete = seq.num_computed_tokens
            if self.next_token_entries and seq.request.prefill_only and complete == seq.num_tokens:
                complete -= 1  # the last position's next token is unknown (see __init__)
            self.kv.register_full_blocks(seq.seq_id, seq.token_ids, complete)
