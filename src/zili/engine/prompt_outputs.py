"""What a prefill step can return besides next-token logits: prompt logprobs and pooled hidden states.

Scoring (SamplingParams.prompt_logprobs, as vLLM's): the row of prompt position p predicts prompt
token p + 1, so its logprob is log_softmax(logits at p)[token p + 1]. Full-vocabulary logits for a
long prompt are large (8k positions x 152k tokens x 4 bytes = 5 GB), so they are computed a few
rows at a time (at most `MAX_SCORE_LOGITS` floats at once) and only the target's logprob and the
top-k alternatives of each row are kept.

Pooling (PoolingParams, llama.cpp's `--embeddings --pooling`): the model's final hidden states
(after its final norm, which is what `CausalLM.forward` returns) of one sequence's rows, reduced per
chunk so that chunked prefill can add the pieces up: the sum of the rows ("mean"), the first row
("cls") or the last one ("last").

The runner (zili.engine.runner) calls `compute_step_extras` inside its forward pass, on every tensor-parallel
rank alike, so the LM head's collectives stay in step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from zili.models.base import CausalLM

MAX_SCORE_LOGITS = 1 << 24  # float32 logits held at once while scoring (64 MiB)


@dataclass
class PromptScoring:
    """Prompt logprobs wanted from one sequence's rows in one step."""

    first_row: int  # index, among this sequence's new tokens, of the first row to score
    target_ids: list[int]  # the prompt token each scored row predicts, one per row from first_row on
    num_top: int  # top alternatives to keep per row (0: only the target's logprob)


@dataclass
class ScoredRows:
    """One sequence's scored rows (on the host): R rows, k alternatives."""

    logprobs: torch.Tensor  # [R] float32: the target token's logprob
    top_ids: torch.Tensor  # [R, k] int64, best first
    top_logprobs: torch.Tensor  # [R, k] float32


@dataclass
class StepExtras:
    """What a step computed besides logits, keyed by the sequence's index in the step (StepInput order)."""

    prompt_logprobs: dict[int, ScoredRows] = field(default_factory=dict)
    pooled: dict[int, torch.Tensor] = field(default_factory=dict)  # [hidden] float32 on the host
    # The step's final hidden states [rows, hidden] (after the final norm, rows in StepInput order, on the
    # device), when StepInput.keep_hidden asked for them; else None.
    hidden_states: torch.Tensor | None = None


def compute_step_extras(model: CausalLM, hidden: torch.Tensor, query_lens: list[int],
                scoring: list[PromptScoring | None] | None, pooling: list[str | None] | None) -> StepExtras:
    """Prompt logprobs and pooled states for the sequences of one step that asked for them.

    hidden: [T, H], the step's final hidden states (sequences' rows in order, `query_lens` each).
    scoring / pooling: per sequence, what it wants (None: nothing), or None for the whole step."""
    out = StepExtras()
    starts = [0]
    for q in query_lens[:-1]:
        starts.append(starts[-1] + q)
    if scoring is not None and any(s is not None and s.target_ids for s in scoring):
        _score(model, hidden, starts, scoring, out)
    for i, kind in enumerate(pooling or []):
        if kind is None:
            continue
        rows = hidden[starts[i]:starts[i] + query_lens[i]]
        vector = rows.float().sum(dim=0) if kind == "mean" else rows[0 if kind == "cls" else -1].float()
        out.pooled[i] = vector.cpu()
    return out


def _score(model: CausalLM, hidden: torch.Tensor, starts: list[int], scoring: list[PromptScoring | None],
           out: StepExtras) -> None:
    wanted = [(i, s) for i, s in enumerate(scoring) if s is not None and s.target_ids]
    row_ids = [starts[i] + s.first_row + r for i, s in wanted for r in range(len(s.target_ids))]
    targets = torch.tensor([t for _, s in wanted for t in s.target_ids], dtype=torch.long, device=hidden.device)
    rows = hidden.index_select(0, torch.tensor(row_ids, dtype=torch.long, device=hidden.device))
    k = max(s.num_top for _, s in wanted)
    per_chunk: int = max(1, MAX_SCORE_LOGITS // model.config.vocab_size)
    chosen, top_ids, top_vals = [], [], []
    for a in range(0, len(row_ids), per_chunk):
        logp = torch.log_softmax(model.compute_logits(rows[a:a + per_chunk]).float(), dim=-1)  # [r, V]
        chosen.append(logp.gather(1, targets[a:a + per_chunk, None])[:, 0].cpu())
        vals, ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
        top_vals.append(vals.cpu())
        top_ids.append(ids.cpu())
    all_chosen, all_ids, all_vals = torch.cat(chosen), torch.cat(top_ids), torch.cat(top_vals)
    at = 0
    for i, s in wanted:
        n = len(s.target_ids)
        out.prompt_logprobs[i] = ScoredRows(all_chosen[at:at + n], all_ids[at:at + n, :s.num_top],
                                            all_vals[at:at + n, :s.num_top])
        at += n
