"""DeepSeek multi-token prediction as a speculative-decoding proposer (method "deepseek_mtp", alias "mtp").

DeepSeek-V3 is trained with a multi-token-prediction (MTP) module beside its decoder (DeepSeek-AI 2024,
"DeepSeek-V3 Technical Report", section 2.2): from the main model's final hidden state h_i at position
i and the embedding of token t_{i+1}, one more decoder block (MLA + MoE, over its own KV cache)
predicts t_{i+2}. At inference it proposes drafts for the main model to verify (section 5.4.3 reports
85-90% acceptance of the second token); vLLM runs it as `speculative_config={"method": "deepseek_mtp"}`.
The module is `zili.models.deepseek.DeepseekMTP`; this file makes it a `Proposer`.

Where its KV cache lives. The MTP layer's latent cache is one more tensor shaped like a main layer's,
indexed by the target's own block tables (as vLLM gives drafter layers the target's block tables): its
entry at position i sits in the same block and slot as the target's entry at i. So the target's
bookkeeping keeps it in step with no second allocator: rejected drafts' slots are rolled back with the
target's (`Scheduler.on_step_done`), preemption and abort free both at once, and a prefix-cache hit
brings the MTP entries of the hit blocks with it. One rule makes hits exact: the entry at position i
depends on t_{i+1}, so the last block of a hit (whose last entry was made for another continuation, or
never made) is recomputed (`KVCacheManager(recompute_last_hit_block=True)`).

Each step (`observe`, after verification): for every position the target computed and kept this step
(prefill chunks, decode rows, accepted verify rows) the MTP layer runs on (h_i, t_{i+1}) and writes its
entry i; the target's hidden states are handed over by the runner (`StepInput.keep_hidden`, no copy).
For a sequence whose newest token t_{n-1} is now known, the row at i = n - 2 yields the first draft
d_1 (its argmax) and the block's output h''_{n-2}, kept for the next proposal.

Proposals (`propose`, before the next step's scheduling): d_1 as above; d_{j+1} for j >= 1 from one more
pass of the same layer on (h''_{previous row}, Emb(d_j)) at position n - 2 + j, feeding the layer's own
output hidden state back in place of the target's (the recursive scheme vLLM's MTP proposer uses when
num_speculative_tokens exceeds the checkpoint's MTP depth). Those passes write entries at positions
n - 1 .. n + k - 3 into slots reserved in the target's pool for the duration of the call and given back
after it (the verify step computes those positions again, and `observe` rewrites the entries of the
accepted ones from the target's true hidden states). A checkpoint with several MTP modules
(`num_nextn_predict_layers` > 1, none of DeepSeek's releases) drafts with the first one only: a deeper
module's cache would need the previous module's hidden state at every position.

Drafts are argmaxes (a point-mass draft distribution), so `Speculator.verify`'s rule is the exact
rejection rule and greedy output equals plain decoding token for token (zili.engine.spec_decode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zili.engine.kv_cache import KVCacheManager
from zili.engine.request import Sequence
from zili.engine.spec_decode import TargetRows
from zili.kernels.attention import AttentionMetadata
from zili.kernels.backends import AttentionBackend
from zili.models.deepseek import DeepseekMTP


@dataclass
class _FirstDraft:
    """d_1 of a sequence with `num_tokens` tokens, and the MTP block's output h''_{n-2} [hidden] it came from."""

    num_tokens: int
    token: int
    hidden: torch.Tensor


class MTPProposer:
    """Drafts from DeepSeek's MTP layer (implements `zili.engine.spec_decode.HiddenStateProposer`).

    `mtp`: the checkpoint's first MTP layer (`DeepseekMTP` with one layer, sharing the target's
    embedding); `kv_cache`: its latent cache, [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]
    with the target pool's num_blocks and block_size (entries addressed by the target's block tables);
    `attention`: the target runner's backend; `vocab_size`: drafts are argmaxes over the first
    `vocab_size` logits. The target's `KVCacheManager` comes with `bind_kv_cache` (the engine makes it)."""

    def __init__(self, mtp: DeepseekMTP, kv_cache: torch.Tensor, attention: AttentionBackend | None,
                 block_size: int, vocab_size: int) -> None:
        self.mtp = mtp
        self.kv_caches = [kv_cache]
        self.attention = attention
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.device = kv_cache.device
        self.kv: KVCacheManager | None = None
        self.first_drafts: dict[str, _FirstDraft] = {}  # from the last step, per sequence
        self.num_forward_passes = 0

    def bind_kv_cache(self, kv: KVCacheManager) -> None:
        """The target's block bookkeeping: its block tables address this layer's cache too."""
        if kv.block_size != self.block_size or kv.num_blocks != self.kv_caches[0].shape[0]:
            raise ValueError(f"the MTP cache has {self.kv_caches[0].shape[0]} blocks of {self.block_size} tokens; "
                             f"the target's pool {kv.num_blocks} of {kv.block_size}")
        self.kv = kv

    # ---- after each step: the MTP entries of the positions the target computed -------------------
    @torch.inference_mode()
    def observe(self, hidden: torch.Tensor, rows: list[TargetRows]) -> None:
        """Write the MTP entry of every position in `rows` from the target's final hidden states
        `hidden` [step rows, hidden] (StepExtras.hidden_states), and keep d_1 for each sequence whose
        newest token is the one after its last row. Replaces what the previous step kept."""
        self.first_drafts = {}
        if not rows:
            return
        kv = self._kv()
        ids: list[int] = []
        positions: list[int] = []
        picked: list[int] = []
        tables: list[list[int]] = []
        for r in rows:
            ids += r.seq.token_ids[r.start + 1:r.start + 1 + r.num_rows]
            positions += range(r.start, r.start + r.num_rows)
            picked += range(r.first_row, r.first_row + r.num_rows)
            tables.append(kv.block_ids(r.seq.seq_id))
        previous = hidden.index_select(0, torch.tensor(picked, dtype=torch.long, device=hidden.device))
        out = self._forward(ids, positions, previous, [r.num_rows for r in rows],
                            [r.start + r.num_rows for r in rows], tables)
        ends, proposing = [], []
        end = 0
        for r in rows:
            end += r.num_rows
            if r.start + r.num_rows == len(r.seq.token_ids) - 1 and not r.seq.is_finished:
                ends.append(end - 1)
                proposing.append(r.seq)
        if not proposing:
            return
        last = out.index_select(0, torch.tensor(ends, dtype=torch.long, device=out.device))
        tokens = self._argmax(last)
        for i, (seq, token) in enumerate(zip(proposing, tokens)):
            self.first_drafts[seq.seq_id] = _FirstDraft(len(seq.token_ids), token, last[i])

    # ---- proposals ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        """Up to `num_tokens[i]` drafts per sequence: d_1 from the last `observe`, then k - 1 recursive
        passes (none for a sequence the last step did not bring to its newest token, e.g. one that was
        not scheduled; only d_1 where the target's pool has no room for the passes' slots)."""
        kv = self._kv()
        drafts: list[list[int]] = [[] for _ in seqs]
        active: list[int] = []  # indices into seqs that run recursive passes
        hidden: list[torch.Tensor] = []
        for i, (seq, k) in enumerate(zip(seqs, num_tokens)):
            first = self.first_drafts.get(seq.seq_id)
            n = len(seq.token_ids)
            if first is None or first.num_tokens != n:
                continue
            drafts[i].append(first.token)
            # Pass j writes its entry at position n - 2 + j, j = 1 .. k - 1.
            if k > 1 and kv.allocate(seq.seq_id, n + k - 2):
                active.append(i)
                hidden.append(first.hidden)
        if not active:
            return drafts
        try:
            self._recurse(seqs, num_tokens, drafts, active, torch.stack(hidden))
        finally:
            for i in active:  # the passes' slots: the verify step reserves its own
                kv.trim(seqs[i].seq_id, seqs[i].num_computed_tokens)
        return drafts

    def _recurse(self, seqs: list[Sequence], num_tokens: list[int], drafts: list[list[int]], active: list[int],
                 hidden: torch.Tensor) -> None:
        """Passes j = 1 .. k - 1: feed d_j with the previous pass's output at position n - 2 + j."""
        kv = self._kv()
        rows = active
        for j in range(1, max(num_tokens[i] for i in active)):
            keep = [a for a, i in enumerate(rows) if num_tokens[i] > j]
            if len(keep) < len(rows):
                hidden = hidden[keep]
                rows = [rows[a] for a in keep]
            lengths = [len(seqs[i].token_ids) for i in rows]
            out = self._forward([drafts[i][-1] for i in rows], [n - 2 + j for n in lengths], hidden,
                                [1] * len(rows), [n - 1 + j for n in lengths],
                                [kv.block_ids(seqs[i].seq_id) for i in rows])
            for i, token in zip(rows, self._argmax(out)):
                drafts[i].append(token)
            hidden = out

    # ---- the layer -----------------------------------------------------------------------------------
    def _forward(self, ids: list[int], positions: list[int], previous: torch.Tensor, query_lens: list[int],
                 seq_lens: list[int], tables: list[list[int]]) -> torch.Tensor:
        """The MTP block on rows (previous hidden, next token) -> its outputs h'' [rows, hidden]."""
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, self.block_size, self.device, self.attention)
        self.num_forward_passes += 1
        return self.mtp(torch.tensor(ids, dtype=torch.long, device=self.device),
                        torch.tensor(positions, dtype=torch.long, device=self.device), self.kv_caches, meta,
                        previous_hidden=previous)

    def _argmax(self, hidden: torch.Tensor) -> list[int]:
        return [int(t) for t in self.mtp.compute_logits(hidden)[:, :self.vocab_size].argmax(dim=-1).tolist()]

    def _kv(self) -> KVCacheManager:
        assert self.kv is not None, "MTPProposer.bind_kv_cache was not called (the engine does it)"
        return self.kv

    def release(self, seq_id: str) -> None:
        """Forget a sequence's pending first draft (its MTP entries live in the target's blocks)."""
        self.first_drafts.pop(seq_id, None)
