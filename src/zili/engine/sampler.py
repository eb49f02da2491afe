"""Sampler: turns a batch of logits into next tokens, vectorised over the batch.

Order of operations, per row: logit_bias and min_tokens masks, then repetition / presence /
frequency penalties, then (for non-greedy rows) temperature, top-k, top-p and min-p, then a draw.
Greedy rows take the argmax of the processed logits. Logprobs are those of the model's raw
distribution (log-softmax of the unprocessed logits), as vLLM reports them by default.

Seeded rows draw noise keyed on (the sequence's seed, the output position of the token drawn)
(`position_seed`), not from a stream consumed row by row: a row's draw depends neither on what else
is in the batch nor on how many verify rows (speculative drafts, jump-forward's forced drafts) the
step gave its sequence, which the scheduler cuts to the step's token budget. So a verify row draws
what plain decoding draws at the same position, and a seeded request's tokens are as reproducible as
its logits (bit for bit under EngineConfig.deterministic). Unseeded rows share one engine-wide draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from zili.engine.request import Sequence, TokenLogprob

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """SplitMix64's output function (Steele, Lea & Flood, "Fast splittable pseudorandom number
    generators", OOPSLA 2014; Vigna's splitmix64.c): a bijection on 64-bit integers whose every output
    bit depends on every input bit. `x` is taken modulo 2**64 (negative seeds included)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sequence_seed(seed: int, index: int) -> int:
    """The torch.Generator seed for choice `index` (0..n-1) of a request seeded `seed` (any 64-bit
    value, signed or not), as a 64-bit unsigned int.

    The seed and the index are hashed together, not added: `seed + index` made choice i of seed s the
    same draw as choice 0 of seed s+i. And torch's CPU generator (mt19937) keeps only the low 32 bits
    of the number it is seeded with, so seeds 1 and 2**32+1 drew the same tokens; the hash folds all
    64 bits into those 32."""
    return splitmix64(splitmix64(seed & _MASK64) ^ index)


def position_seed(seed: int, position: int) -> int:
    """The torch.Generator seed of a seeded sequence's draw for its output token `position` (0-based):
    output `position` + 1 of SplitMix64 started at `seed` (a `sequence_seed`), i.e. `splitmix64` of
    seed + position * 0x9E3779B97F4A7C15. Counter-based (Salmon et al., "Parallel random numbers: as
    easy as 1, 2, 3", SC 2011): any position's noise without drawing the ones before it."""
    return splitmix64((seed + position * 0x9E3779B97F4A7C15) & _MASK64)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}  # unseeded rows, one per device
        self._keyed = torch.Generator()  # seeded rows: re-seeded per row with position_seed

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], grammar_mask: Any = None) -> SamplerOutput:
        """logits: [N, V] float32, one row per sequence that samples this step, except that a sequence
        verifying k drafts has k + 1 adjacent rows (`Speculator.rows_of`), row j drawing its output
        token num_output_tokens + j. grammar_mask (structured output,
        zili.structured.backend.GrammarMask) forbids tokens, applied last."""
        raw = logits
        params = [s.request.params for s in seqs]
        logits = self.process_logits(logits, seqs, grammar_mask)
        greedy = [p.temperature == 0 for p in params]
        if all(greedy):  # max() finds the first maximum like argmax(), about 3x faster on CPU
            token_ids = logits.max(dim=-1).indices
            return SamplerOutput(token_ids.tolist(), self._logprobs(raw, token_ids, seqs))
        token_ids = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        if any(greedy):
            rows = [i for i, g in enumerate(greedy) if g]
            token_ids[rows] = logits[rows].max(dim=-1).indices
        if not all(greedy):
            rows = [i for i, g in enumerate(greedy) if not g]
            token_ids[rows] = self._sample(logits[rows], [seqs[i] for i in rows])
        return SamplerOutput(token_ids.tolist(), self._logprobs(raw, token_ids, seqs))

    # ---- logit processing -----------------------------------------------------------------------
    def process_logits(self, logits: torch.Tensor, seqs: list[Sequence], grammar_mask: Any = None) -> torch.Tensor:
        """logit_bias, min_tokens, penalties and the grammar mask applied to a copy of `logits` [N, V]
        (the same tensor when none applies): what greedy rows take the argmax of."""
        if grammar_mask is not None or any(_modifies_logits(s) for s in seqs):
            logits = logits.clone()  # the raw logits stay untouched for logprobs
            self._apply_bias_and_min_tokens(logits, seqs)
            self._apply_penalties(logits, seqs)
            if grammar_mask is not None:
                grammar_mask.apply(logits)
        return logits

    def probabilities(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The distribution non-greedy rows draw from: processed logits [N, V] through temperature,
        top-k, top-p and min-p -> probabilities [N, V] (rows sum to 1)."""
        params = [s.request.params for s in seqs]
        dev = logits.device
        temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=dev)[:, None]
        logits = logits / temps
        logits = apply_top_k_top_p(logits,
                                   torch.tensor([p.top_k if p.top_k > 0 else self.vocab_size for p in params],
                                                device=dev),
                                   torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=dev))
        probs = torch.softmax(logits, dim=-1)
        min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=dev)[:, None]
        if (min_p > 0).any():
            probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        return probs

    def _apply_bias_and_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        for i, seq in enumerate(seqs):
            p = seq.request.params
            if p.logit_bias:
                ids = torch.tensor([t for t in p.logit_bias if t < self.vocab_size], dtype=torch.long,
                                   device=logits.device)
                vals = torch.tensor([b for t, b in p.logit_bias.items() if t < self.vocab_size], device=logits.device)
                logits[i].index_add_(0, ids, vals.to(logits.dtype))
            # (a grammar decides for itself when it may end: min_tokens does not override it)
            if seq.num_output_tokens < p.min_tokens and seq.request.stop_token_ids and seq.grammar is None:
                banned = [t for t in seq.request.stop_token_ids if t < self.vocab_size]
                logits[i, banned] = float("-inf")

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        rows = [i for i, s in enumerate(seqs) if s.request.params.needs_penalties]
        if not rows:
            return
        V, dev = self.vocab_size, logits.device
        out_counts = torch.zeros(len(rows), V, device=dev)
        seen = torch.zeros(len(rows), V, dtype=torch.bool, device=dev)
        for j, i in enumerate(rows):
            out = torch.tensor(seqs[i].output_token_ids, dtype=torch.long, device=dev)
            if len(out):
                out_counts[j].index_add_(0, out, torch.ones(len(out), device=dev))
            seen[j, torch.tensor(seqs[i].token_ids, dtype=torch.long, device=dev)] = True  # prompt + output
        rep = torch.tensor([seqs[i].request.params.repetition_penalty for i in rows], device=dev)[:, None]
        pres = torch.tensor([seqs[i].request.params.presence_penalty for i in rows], device=dev)[:, None]
        freq = torch.tensor([seqs[i].request.params.frequency_penalty for i in rows], device=dev)[:, None]
        sub = logits[rows]
        # Repetition penalty (CTRL / HF): shrink the logit of every token already seen.
        penalised = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalised, sub)
        # OpenAI's presence and frequency penalties count generated tokens only.
        sub = sub - freq * out_counts - pres * (out_counts > 0).float()
        logits[rows] = sub

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        probs = self.probabilities(logits, seqs)
        dev = logits.device
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, one draw per row.
        noise = torch.empty_like(probs)
        shared = [i for i, s in enumerate(seqs) if s.seed is None]
        if shared:
            noise[shared] = torch.empty(len(shared), probs.shape[1], device=dev).exponential_(
                generator=self.generator_for(dev))
        offset = 0  # a sequence's verify rows are adjacent: row j draws output position num_output_tokens + j
        for i, seq in enumerate(seqs):
            offset = offset + 1 if i and seqs[i - 1] is seq else 0
            if seq.seed is not None:  # a seeded request draws on the host: same tokens on every device
                self._keyed.manual_seed(position_seed(seq.seed, seq.num_output_tokens + offset))
                noise[i] = torch.empty(probs.shape[1]).exponential_(generator=self._keyed).to(dev)
        return (probs / noise).argmax(dim=-1)

    def generator_for(self, device: torch.device) -> torch.Generator:
        """The engine-wide generator for unseeded rows, drawing on the logits' own device."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def _logprobs(self, raw: torch.Tensor, token_ids: torch.Tensor, seqs: list[Sequence]) -> list[TokenLogprob | None]:
        wanted = [s.request.params.logprobs for s in seqs]
        if all(w is None for w in wanted):
            return [None] * len(seqs)
        logp = torch.log_softmax(raw, dim=-1)
        k = max(w or 0 for w in wanted)
        best = logp.topk(k, dim=-1) if k else None  # (values, indices), each [B, k]
        chosen = logp.gather(1, token_ids[:, None])[:, 0].tolist()
        out: list[TokenLogprob | None] = []
        for i, w in enumerate(wanted):
            if w is None:
                out.append(None)
                continue
            top = list(zip(best.indices[i, :w].tolist(), best.values[i, :w].tolist())) if w and best is not None else []
            out.append(TokenLogprob(int(token_ids[i]), chosen[i], top))
        return out


def _modifies_logits(seq: Sequence) -> bool:
    p = seq.request.params
    return bool(p.logit_bias) or p.needs_penalties or (p.min_tokens > seq.num_output_tokens)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) everything outside each row's top-k and top-p nucleus. logits: [N, V].

    top_k: [N] long (V disables), top_p: [N] (1.0 disables). At least one token always survives.
    """
    V = logits.shape[-1]
    if bool((top_k >= V).all()) and bool((top_p >= 1.0).all()):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(V, device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    # The nucleus is taken over the top-k survivors, renormalised.
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly better tokens
    remove = mass_before >= top_p[:, None]
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
