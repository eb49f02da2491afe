"""RotaryEmbedding against transformers' own rotary module, with real-model rope settings."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

from zili.layers.rotary import RotaryEmbedding, apply_rotary  # noqa: E402

MAX_POS = 16384
CASES = {
    "default": dict(head_dim=64, rope_theta=100000.0, rope_scaling=None),
    "linear": dict(head_dim=64, rope_theta=10000.0, rope_scaling=dict(rope_type="linear", factor=4.0)),
    # Llama 3.1 8B's settings.
    "llama3": dict(head_dim=128, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192)),
    # Qwen2.5 / Qwen3 long-context setting.
    "yarn": dict(head_dim=128, rope_theta=1000000.0, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=4096)),
    # DeepSeek-style mscale terms and betas, untruncated ramp.
    "yarn_mscale": dict(head_dim=64, rope_theta=10000.0, rope_scaling=dict(
        rope_type="yarn", factor=40.0, original_max_position_embeddings=4096, mscale=1.0,
        mscale_all_dim=0.707, beta_fast=24, beta_slow=2, truncate=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rotary_matches_hf(case: str) -> None:
    c = CASES[case]
    hf_cfg = transformers.LlamaConfig(
        hidden_size=c["head_dim"] * 4, num_attention_heads=4, max_position_embeddings=MAX_POS,
        rope_theta=c["rope_theta"], rope_scaling=c["rope_scaling"])
    hf_rope = LlamaRotaryEmbedding(hf_cfg)
    rope = RotaryEmbedding(c["head_dim"], MAX_POS, c["rope_theta"], c["rope_scaling"])

    positions = torch.cat([torch.arange(8), torch.randint(0, MAX_POS, (56,), generator=torch.Generator().manual_seed(0))])
    q = torch.randn(len(positions), 4, c["head_dim"], generator=torch.Generator().manual_seed(1))
    k = torch.randn(len(positions), 2, c["head_dim"], generator=torch.Generator().manual_seed(2))

    hf_cos, hf_sin = hf_rope(q, positions[None])  # [1, T, d]
    cos, sin = rope(positions, torch.float32)  # [T, d/2]
    torch.testing.assert_close(torch.cat([cos, cos], -1), hf_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat([sin, sin], -1), hf_sin[0], rtol=0, atol=1e-6)

    # HF wants [B, heads, T, d]; ours is flat [T, heads, d].
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin)
    torch.testing.assert_close(apply_rotary(q, cos, sin), hf_q[0].transpose(0, 1), rtol=0, atol=1e-5)
    torch.testing.assert_close(apply_rotary(k, cos, sin), hf_k[0].transpose(0, 1), rtol=0, atol=1e-5)


def test_rotary_low_precision_casts_like_hf() -> None:
    rope = RotaryEmbedding(64, 4096, 10000.0)
    cos, sin = rope(torch.tensor([0, 4095]), torch.bfloat16)
    assert cos.dtype == sin.dtype == torch.bfloat16 and cos.shape == (2, 32)
    assert torch.equal(cos, rope.cos_sin[[0, 4095], :32].to(torch.bfloat16))


def test_unsupported_rope_type() -> None:
    with pytest.raises(ValueError, match="'longrope' is not supported"):
        RotaryEmbedding(64, 128, 10000.0, dict(rope_type="longrope", factor=4.0))
    with pytest.raises(ValueError, match="low_freq_factor"):
        RotaryEmbedding(64, 128, 10000.0, dict(rope_type="llama3", factor=8.0))
