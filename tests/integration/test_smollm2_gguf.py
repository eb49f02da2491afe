"""The default model end to end: SmolLM2-135M-Instruct loaded from its Q4_1 GGUF into zili
(through load_model and the paged-attention forward) against transformers loading the same file."""

from __future__ import annotations

import pytest
import torch

from zili.kernels.attention import AttentionMetadata
from zili.models.loader import LoadedModel

pytestmark = pytest.mark.slow

NEW_TOKENS = 32
BLOCK_SIZE = 16
PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
]


@pytest.fixture(scope="module")
def zili_model(smollm2_fp32: LoadedModel) -> LoadedModel:
    """`load_model(None, dtype="float32")`, shared with tests/unit/test_quant.py (tests/conftest.py)."""
    return smollm2_fp32


@pytest.fixture(scope="module")
def hf_model(zili_model: LoadedModel, hf_smollm2_model):
    """transformers loading the same file (`gguf_file=`, float32), shared with the scoring server's tests."""
    assert hf_smollm2_model.config.num_hidden_layers == zili_model.config.num_hidden_layers
    return hf_smollm2_model


@pytest.fixture(scope="module")
def prompt_ids(zili_model: LoadedModel) -> list[list[int]]:
    tok = zili_model.tokenizer
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in PROMPTS]


class PagedRunner:
    """Drives zili's model the way the engine does: per-layer paged KV caches, one block table
    per sequence, a prefill step and then one token per sequence per step."""

    def __init__(self, loaded: LoadedModel, max_len: int, num_seqs: int) -> None:
        cfg = loaded.config
        self.model = loaded.model
        blocks_per_seq = -(-max_len // BLOCK_SIZE)
        # Interleave the sequences' blocks so that a block table that is not contiguous is exercised.
        self.tables = [list(range(s, blocks_per_seq * num_seqs, num_seqs)) for s in range(num_seqs)]
        self.caches = [torch.zeros(2, blocks_per_seq * num_seqs, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim)
                       for _ in range(cfg.num_hidden_layers)]
        self.lens = [0] * num_seqs

    @torch.no_grad()
    def step(self, chunks: list[list[int]], every_token: bool = False) -> torch.Tensor:
        """Feed chunks[i] to sequence i; return the logits of each sequence's last new token
        (of every new token with every_token)."""
        ids, positions, last = [], [], []
        for i, chunk in enumerate(chunks):
            ids += chunk
            positions += range(self.lens[i], self.lens[i] + len(chunk))
            self.lens[i] += len(chunk)
            last.append(len(ids) - 1)
        meta = AttentionMetadata.build([len(c) for c in chunks], list(self.lens), self.tables, BLOCK_SIZE)
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), self.caches, meta)
        return self.model.compute_logits(hidden if every_token else hidden[last])


@torch.no_grad()
def hf_greedy(hf_model, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor, list[torch.Tensor]]:
    """Greedy continuation with transformers' own KV cache: (tokens, prompt logits, per-step logits)."""
    out = hf_model(torch.tensor([ids]), use_cache=True)
    prompt_logits, past = out.logits[0].float(), out.past_key_values
    step_logits = [prompt_logits[-1]]
    tokens = [int(step_logits[-1].argmax())]
    for _ in range(steps - 1):
        out = hf_model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        step_logits.append(out.logits[0, -1].float())
        tokens.append(int(step_logits[-1].argmax()))
    return tokens, prompt_logits, step_logits


@pytest.fixture(scope="module")
def hf_results(hf_model, prompt_ids):
    return [hf_greedy(hf_model, ids, NEW_TOKENS) for ids in prompt_ids]


def test_prompt_logits_match_transformers(zili_model, prompt_ids, hf_results) -> None:
    runner = PagedRunner(zili_model, len(prompt_ids[0]) + 1, 1)
    all_logits = runner.step([prompt_ids[0]], every_token=True)
    hf_prompt_logits = hf_results[0][1]
    assert all_logits.shape == hf_prompt_logits.shape == (len(prompt_ids[0]), 49152)
    assert (all_logits - hf_prompt_logits).abs().max().item() <= 1e-3


def test_greedy_continuation_matches_transformers(zili_model, prompt_ids, hf_results) -> None:
    """One sequence: prefill, then one token per step; logits stay within 1e-3 at every step."""
    ids = prompt_ids[0]
    hf_tokens, _, hf_step_logits = hf_results[0]
    runner = PagedRunner(zili_model, len(ids) + NEW_TOKENS, 1)
    logits = runner.step([ids])
    tokens = []
    for step in range(NEW_TOKENS):
        assert (logits[0] - hf_step_logits[step]).abs().max().item() <= 1e-3, f"step {step}"
        tokens.append(int(logits[0].argmax()))
        if step + 1 < NEW_TOKENS:
            logits = runner.step([[tokens[-1]]])
    assert tokens == hf_tokens
    text = zili_model.tokenizer.decode(tokens)
    assert text == zili_model.tokenizer.decode(hf_tokens) and text.strip()


def test_batched_paged_decode_matches_transformers(zili_model, prompt_ids, hf_results) -> None:
    """All prompts prefilled in one flat batch and decoded together: each gets transformers'
    greedy 32 tokens."""
    runner = PagedRunner(zili_model, max(map(len, prompt_ids)) + NEW_TOKENS, len(prompt_ids))
    logits = runner.step(prompt_ids)
    generated: list[list[int]] = [[] for _ in prompt_ids]
    for step in range(NEW_TOKENS):
        for seq, row in enumerate(logits):
            assert (row - hf_results[seq][2][step]).abs().max().item() <= 1e-3, f"sequence {seq}, step {step}"
            generated[seq].append(int(row.argmax()))
        if step + 1 < NEW_TOKENS:
            logits = runner.step([[g[-1]] for g in generated])
    assert generated == [r[0] for r in hf_results]
