"""DeepSeek-V3's multi-token-prediction layer (zili.models.deepseek.DeepseekMTP) against transformers.

transformers' DeepseekV3 does not run the MTP layer, so the reference is built from its modules per
the DeepSeek-V3 report's equations (section 2.2): its DeepseekV3DecoderLayer (the checkpoint's layer
num_hidden_layers), DeepseekV3RMSNorm for enorm / hnorm / the shared head's norm, and nn.Linear for
eh_proj and the shared head, all with the checkpoint's weights."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tests.tiny_models import write_tiny_deepseek_mtp
from zili.kernels.attention import AttentionMetadata
from zili.models.deepseek import DeepseekMTP
from zili.models.loader import load_model, open_checkpoint

MAIN_LAYERS = 3


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory):
    """A tiny random DeepSeek-V3 with num_nextn_predict_layers=1 (tests.tiny_models.write_tiny_deepseek_mtp)."""
    return write_tiny_deepseek_mtp(tmp_path_factory.mktemp("deepseek-mtp"), MAIN_LAYERS)


def reference_logits(big, path, ids: torch.Tensor) -> torch.Tensor:
    """transformers: the main model's final (normed) hidden states h_i, then per row i < T - 1
    head(norm(Block(eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)])))) at position i (embedding first: the
    released checkpoints' order, as vLLM's deepseek_mtp reads it)."""
    from transformers import DeepseekV3ForCausalLM
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    main = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager").eval()
    four = DeepseekV3ForCausalLM.from_pretrained(big, torch_dtype=torch.float32, attn_implementation="eager").eval()
    block, rotary = four.model.layers[MAIN_LAYERS], four.model.rotary_emb
    weights = load_file(path / "model.safetensors")
    prefix = f"model.layers.{MAIN_LAYERS}"
    cfg = main.config
    enorm, hnorm, shared_norm = (DeepseekV3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) for _ in range(3))
    eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
    head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    for module, name in ((enorm, "enorm"), (hnorm, "hnorm"), (shared_norm, "shared_head.norm"),
                         (eh_proj, "eh_proj"), (head, "shared_head.head")):
        module.weight.data.copy_(weights[f"{prefix}.{name}.weight"])
    with torch.no_grad():
        h = main.model(ids[None]).last_hidden_state[0]  # after the final norm
        embeds = main.model.embed_tokens(ids[1:])
        embeds[0] = 0.0  # the row at position 0 has no token embedding (vLLM's convention for V3's MTP)
        x = eh_proj(torch.cat([enorm(embeds), hnorm(h[:-1])], dim=-1))[None]
        n = x.shape[1]
        positions = torch.arange(n)[None]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        x = block(x, attention_mask=mask, position_ids=positions, position_embeddings=rotary(x, positions))
        return head(shared_norm(x[0])).float()


def zili_mtp(path):
    loaded = load_model(str(path), dtype="float32", device="cpu")
    mtp = DeepseekMTP(loaded.config, loaded.model.model.embed_tokens, 1)
    with torch.no_grad():
        mtp.load_weights(open_checkpoint(loaded.source).tensors(torch.float32))
    return loaded, mtp.eval()


def run(model, ids, positions, caches, table, block_size, seq_len, **kw):
    meta = AttentionMetadata.build([len(ids)], [seq_len], [table], block_size, "cpu")
    with torch.no_grad():
        return model(ids, positions, caches, meta, **kw)


def test_mtp_logits_equal_transformers_reference(mtp_checkpoint):
    big, path = mtp_checkpoint
    torch.manual_seed(0)
    ids = torch.randint(0, 250, (13,))
    want = reference_logits(big, path, ids)

    loaded, mtp = zili_mtp(path)
    cfg, bs = loaded.config, 4
    table = list(range(4))
    caches = [torch.zeros(cfg.kv_cache_shape(4, bs, torch.float32)) for _ in range(cfg.num_hidden_layers)]
    mtp_cache = [torch.zeros(cfg.kv_cache_shape(4, bs, torch.float32))]
    n = len(ids)
    hidden = run(loaded.model, ids, torch.arange(n), caches, table, bs, n)
    out = run(mtp, ids[1:], torch.arange(n - 1), mtp_cache, table, bs, n - 1, previous_hidden=hidden[:-1])
    got = mtp.compute_logits(out)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    # The MTP layer is not the main head: its predictions differ from the model's own next-token logits.
    assert not torch.allclose(got, loaded.model.compute_logits(hidden[1:]), atol=1e-2)

    # Its KV cache: the last rows one at a time after a prefill of the rest give the same logits.
    fresh = [torch.zeros(cfg.kv_cache_shape(4, bs, torch.float32))]
    split = n - 4
    rows = [run(mtp, ids[1:split + 1], torch.arange(split), fresh, table, bs, split, previous_hidden=hidden[:split])]
    for i in range(split, n - 1):
        rows.append(run(mtp, ids[i + 1:i + 2], torch.tensor([i]), fresh, table, bs, i + 1,
                        previous_hidden=hidden[i:i + 1]))
    torch.testing.assert_close(mtp.compute_logits(torch.cat(rows)), want, atol=2e-4, rtol=1e-4)


def test_mtp_needs_its_layer(mtp_checkpoint, tmp_path):
    _, path = mtp_checkpoint
    loaded, _ = zili_mtp(path)
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        DeepseekMTP(loaded.config, loaded.model.model.embed_tokens, 0)
    # A checkpoint without the MTP tensors is refused, naming what is missing.
    stripped = tmp_path / "stripped"
    shutil.copytree(path, stripped)
    tensors = {k: v for k, v in load_file(stripped / "model.safetensors").items() if ".eh_proj." not in k}
    save_file(tensors, stripped / "model.safetensors", metadata={"format": "pt"})
    other = load_model(str(stripped), dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="eh_proj"):
        DeepseekMTP(other.config, other.model.model.embed_tokens, 1).load_weights(
            open_checkpoint(other.source).tensors(torch.float32))
