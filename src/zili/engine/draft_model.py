"""A draft model proposer for speculative decoding (method "draft_model", `--speculative-model`).

A smaller model of the same tokenizer runs in the engine's process with its own paged KV cache (its
own `KVCacheManager` pool and block tables, its own `ModelRunner`) and proposes k tokens a step
greedily: k forward passes, batched across the sequences that speculate (Leviathan et al. 2023,
"Fast Inference from Transformers via Speculative Decoding"; vLLM's `draft_model`). The first pass
also catches the draft's cache up with the sequence: the tokens the target accepted (and the prompt,
the first time) since the draft last ran.

Why greedy drafts under sampling too: the argmax is a function of the context, so the draft
distribution is a point mass and `Speculator.verify`'s rule (draw t ~ p, accept while t == d) is the
exact rejection rule; the output distribution stays the target's (zili.engine.spec_decode).

Cache bookkeeping. Per sequence the proposer remembers which tokens its cache holds, positions
0..len-1: the sequence's tokens plus the drafts it fed itself. At the next proposal the longest
common prefix with the sequence's tokens is still valid (K/V at position p depends only on tokens
0..p); everything past it is trimmed and recomputed. Full blocks of verified tokens are registered in
the draft pool's prefix cache, so requests sharing a prompt share the draft's blocks as the target's.
A sequence the draft pool cannot hold gets no drafts (decodes one token a step) rather than
preempting anyone; `release` gives every block back (finish, abort, preemption).
"""

from __future__ import annotations

from zili.engine.kv_cache import KVCacheManager
from zili.engine.request import Sequence
from zili.engine.runner import ModelRunner, StepInput
from zili.tokenizer import Tokenizer


class DraftModelProposer:
    """Greedy drafts from a draft model (implements `zili.engine.spec_decode.Proposer`).

    `runner`: the draft model with its own KV tensors; `kv`: the book-keeping of that pool (same
    block size as the runner's); `vocab_size`: the target's, drafts are argmaxes over its first
    `vocab_size` logits (a draft's padded embedding rows are never proposed); `max_model_len`: the
    longest sequence the draft may see (its own context length, or the engine's if shorter)."""

    def __init__(self, runner: ModelRunner, kv: KVCacheManager, vocab_size: int, max_model_len: int) -> None:
        self.runner, self.kv = runner, kv
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.cached: dict[str, list[int]] = {}  # per sequence: the tokens whose K/V the draft cache holds
        self.num_forward_passes = 0

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        """Up to `num_tokens[i]` greedy draft tokens per sequence (none where the draft pool or the draft's
        context length cannot hold them)."""
        drafts: list[list[int]] = [[] for _ in seqs]
        active: list[int] = []  # indices into seqs that draft this step
        lengths: list[int] = []
        ids: list[list[int]] = []
        starts: list[int] = []
        for i, (seq, k) in enumerate(zip(seqs, num_tokens)):
            tokens = seq.token_ids
            n = len(tokens)
            k = min(k, self.max_model_len - n + 1)  # the last draft fed sits at position n + k - 2
            if k < 1:
                continue
            start = self._prepare(seq.seq_id, tokens, n + k - 1)
            if start is None:
                continue
            active.append(i)
            lengths.append(k)
            ids.append(tokens[start:n])
            starts.append(start)
        if not active:
            return drafts
        # Pass 0 catches up and drafts d1; pass j >= 1 feeds d_j (at position n + j - 1) and drafts d_{j+1}.
        for j in range(max(lengths)):
            rows = [i for i, k in zip(active, lengths) if k > j]
            if j:
                ids = [[drafts[i][-1]] for i in rows]
                starts = [len(seqs[i].token_ids) + j - 1 for i in rows]
            tables = [self.kv.block_ids(seqs[i].seq_id) for i in rows]
            logits = self.runner.execute(StepInput(ids, starts, tables, [True] * len(rows)))
            self.num_forward_passes += 1
            for i, token in zip(rows, logits[:, :self.vocab_size].argmax(dim=-1).tolist()):
                drafts[i].append(int(token))
        for i, k in zip(active, lengths):
            seq = seqs[i]
            # The cache now holds the sequence's tokens and every draft but the last (never fed).
            self.cached[seq.seq_id] = [*seq.token_ids, *drafts[i][:k - 1]]
        return drafts

    def _prepare(self, seq_id: str, tokens: list[int], num_slots: int) -> int | None:
        """Trim the draft cache of `seq_id` to what is still valid for `tokens`, reserve `num_slots`
        positions; the first position to compute (None, and nothing held, if the pool is full)."""
        kv = self.kv
        if seq_id in kv.tables:
            cached = self.cached.get(seq_id, [])
            common = _common_prefix(cached, tokens, len(tokens) - 1)  # at least the last token is fed
            kv.trim(seq_id, common)
            kv.register_full_blocks(seq_id, tokens, common)
            hit: list[int] = []
        else:
            hit = kv.find_cached_prefix(tokens)  # leaves at least one token to compute
            common = len(hit) * kv.block_size
        if not kv.allocate(seq_id, num_slots, hit):
            self.release(seq_id)
            return None
        self.cached[seq_id] = tokens[:common]
        return common

    def release(self, seq_id: str) -> None:
        """Give back every draft block the sequence holds (idempotent)."""
        self.kv.free(seq_id)
        self.cached.pop(seq_id, None)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of `a` and `b`, at most `limit`."""
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def check_same_vocab(target: Tokenizer, draft: Tokenizer, field: str) -> None:
    """ValueError naming `field` unless the two tokenizers map the same strings to the same ids (a
    draft token id must mean to the target what it meant to the draft)."""
    t_vocab = target.backend.get_vocab(with_added_tokens=True)
    d_vocab = draft.backend.get_vocab(with_added_tokens=True)
    if t_vocab == d_vocab:
        return
    if len(t_vocab) != len(d_vocab):
        detail = f"{len(d_vocab)} tokens against the target's {len(t_vocab)}"
    else:
        token = next(t for t, i in d_vocab.items() if t_vocab.get(t) != i)
        detail = f"token {token!r} is id {d_vocab[token]} in the draft, {t_vocab.get(token)} in the target"
    raise ValueError(f"{field}: the draft model's tokenizer vocabulary differs from the target's ({detail}); "
                     "a draft model must share the target's tokenizer")

