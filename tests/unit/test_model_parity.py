"""zili's Llama-family model against HF transformers (the oracle) on tiny random checkpoints.

Each variant is a transformers model with random weights (biases and norm weights included, so
none of them is a no-op), saved with save_pretrained and loaded back through zili. fp32 logits must
agree to 1e-4 on prefill, on token-by-token decode through the paged KV cache, on a mixed batch of
several sequences, and on chunked prefill. Block tables come from a shuffled free list, so every
sequence's context is scattered over non-contiguous blocks.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers  # noqa: E402

from tests.tiny_models import write_byte_tokenizer  # noqa: E402
from zili.config import ModelConfig  # noqa: E402
from zili.kernels.attention import AttentionMetadata  # noqa: E402
from zili.models.hf_config import model_config_from_hf  # noqa: E402
from zili.models.registry import SUPPORTED, build_model  # noqa: E402

ATOL = 1e-4
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)

# name -> (transformers config class, model class, config kwargs)
VARIANTS: dict[str, tuple[str, str, dict]] = {
    # GQA, tied embeddings, Llama 3.1 rope scaling with all three frequency bands in use
    # (head_dim 16, theta 1e4: wavelengths 6..20k around the 64 / 256 thresholds).
    "llama3_tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        SMALL, vocab_size=256, tie_word_embeddings=True, rope_theta=10000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=256))),
    # Untied, multi-head (no GQA), explicit head_dim != hidden/heads, attention_bias (q/k/v/o bias),
    # linear rope scaling.
    "llama_untied_bias": ("LlamaConfig", "LlamaForCausalLM", dict(
        SMALL, vocab_size=384, num_key_value_heads=4, head_dim=32, num_hidden_layers=3,
        tie_word_embeddings=False, attention_bias=True, rope_theta=50000.0,
        rope_scaling=dict(rope_type="linear", factor=2.0))),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        SMALL, vocab_size=512, tie_word_embeddings=True, rope_theta=1000000.0)),
    # Qwen3: q/k norm, head_dim 32 with hidden 64 / 4 heads (q width 128 != hidden), YaRN rope
    # (its cos/sin magnitude factor included).
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        SMALL, vocab_size=320, head_dim=32, tie_word_embeddings=False, rope_theta=1000000.0,
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128))),
    # Mistral with a sliding window shorter than the test sequences (every layer slides).
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        SMALL, vocab_size=256, sliding_window=24, tie_word_embeddings=False)),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Large enough random weights that every term (biases, norms) moves the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1.0 + noise if "norm" in name else noise)


def _load_zili(path: Path) -> torch.nn.Module:
    from zili.models.loader import load_model

    loaded = load_model(str(path), dtype="float32", device="cpu")
    assert loaded.config == loaded.model.config
    return loaded.model


class Checkpoint:
    """One tiny random checkpoint: the HF oracle and the zili model loaded from its files."""

    def __init__(self, name: str, root: Path) -> None:
        config_cls, model_cls, kwargs = VARIANTS[name]
        torch.manual_seed(0)
        hf_config = getattr(transformers, config_cls)(**kwargs)
        hf_config._attn_implementation = "eager"
        self.hf = getattr(transformers, model_cls)(hf_config).eval()
        _randomize(self.hf, seed=1)
        self.path = root / name
        self.hf.save_pretrained(self.path, safe_serialization=True)
        write_byte_tokenizer(self.path)  # the loader wants a tokenizer; the model ignores it
        self.model = _load_zili(self.path)
        self.config: ModelConfig = self.model.config
        self.vocab_size = hf_config.vocab_size

    @torch.no_grad()
    def hf_logits(self, ids: list[int]) -> torch.Tensor:
        return self.hf(torch.tensor([ids])).logits[0].float()  # [len, V]

    def tokens(self, n: int, seed: int) -> list[int]:
        return torch.randint(0, self.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class PagedRunner:
    """Drives a model through a paged KV cache the way the engine does (test-only).

    Blocks come from a shuffled free list, so block tables are non-contiguous and interleaved
    between sequences.
    """

    def __init__(self, model: torch.nn.Module, num_blocks: int = 96, block_size: int = 4, seed: int = 0) -> None:
        cfg: ModelConfig = model.config
        self.model = model
        self.block_size = block_size
        self.kv_caches = [torch.zeros(2, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
                          for _ in range(cfg.num_hidden_layers)]
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tables: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    @torch.no_grad()
    def step(self, chunks: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """Run one flat batch: new tokens per sequence -> their logits [len, V]."""
        ids, positions, query_lens, seq_lens, tables = [], [], [], [], []
        for seq, tokens in chunks.items():
            start = self.lens.get(seq, 0)
            end = start + len(tokens)
            table = self.tables.setdefault(seq, [])
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            self.lens[seq] = end
            ids += tokens
            positions += range(start, end)
            query_lens.append(len(tokens))
            seq_lens.append(end)
            tables.append(table)
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, self.block_size)
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), self.kv_caches, meta)
        logits = self.model.compute_logits(hidden)
        assert logits.dtype == torch.float32 and hidden.shape == (len(ids), self.model.config.hidden_size)
        return dict(zip(chunks, logits.split(query_lens)))


@pytest.fixture(scope="module", params=list(VARIANTS))
def ckpt(request, tmp_path_factory) -> Checkpoint:
    return Checkpoint(request.param, tmp_path_factory.mktemp("ckpt"))


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, what
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs diff {diff:.3g} > {ATOL}"


def test_config_mapping(ckpt: Checkpoint) -> None:
    hf, cfg = ckpt.hf.config, ckpt.config
    assert cfg.hf_architecture in SUPPORTED
    assert cfg.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    assert cfg.num_key_value_heads == hf.num_key_value_heads


def test_prefill_then_decode_matches_hf(ckpt: Checkpoint) -> None:
    ids = ckpt.tokens(64 + 16, seed=2)
    want = ckpt.hf_logits(ids)
    assert want.std() > 0.1  # the random weights make a non-trivial distribution
    runner = PagedRunner(ckpt.model)
    _assert_close(runner.step({"a": ids[:64]})["a"], want[:64], "prefill")
    for i in range(64, 80):
        _assert_close(runner.step({"a": [ids[i]]})["a"], want[i:i + 1], f"decode position {i}")


def test_mixed_batch_matches_hf(ckpt: Checkpoint) -> None:
    """Several sequences of different lengths per flat batch: prefill, then chunked prefill mixed
    with decodes, then a decode-only batch."""
    seqs = {"a": ckpt.tokens(33, seed=3), "b": ckpt.tokens(31, seed=4), "c": ckpt.tokens(7, seed=5)}
    want = {s: ckpt.hf_logits(t) for s, t in seqs.items()}
    got: dict[str, list[torch.Tensor]] = {s: [] for s in seqs}
    runner = PagedRunner(ckpt.model, seed=1)
    schedule = [
        {"a": (0, 30), "b": (0, 17), "c": (0, 5)},  # prefill of different lengths
        {"a": (30, 31), "b": (17, 29), "c": (5, 6)},  # decode, chunk, decode
        {"a": (31, 32), "b": (29, 30), "c": (6, 7)},  # decode only
        {"a": (32, 33), "b": (30, 31)},
    ]
    for plan in schedule:
        out = runner.step({s: seqs[s][lo:hi] for s, (lo, hi) in plan.items()})
        for s, logits in out.items():
            got[s].append(logits)
    for s in seqs:
        _assert_close(torch.cat(got[s]), want[s], f"sequence {s}")


def test_chunked_prefill_equals_unchunked(ckpt: Checkpoint) -> None:
    ids = ckpt.tokens(64, seed=6)
    whole = PagedRunner(ckpt.model, seed=2).step({"a": ids})["a"]
    chunked = PagedRunner(ckpt.model, seed=3)
    parts = [chunked.step({"a": ids[:40]})["a"], chunked.step({"a": ids[40:]})["a"]]
    diff = (torch.cat(parts) - whole).abs().max().item()
    assert diff <= 1e-5, f"chunked vs unchunked prefill: {diff:.3g}"


# --- loading errors ------------------------------------------------------------------------------

def _fresh(ckpt: Checkpoint) -> torch.nn.Module:
    return build_model(ckpt.config, torch.float32, "cpu")


def test_load_weights_rejects_bad_checkpoints(ckpt: Checkpoint) -> None:
    state = dict(ckpt.hf.state_dict())
    if ckpt.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    name = "model.layers.1.self_attn.k_proj.weight"
    missing = {k: v for k, v in state.items() if k != name}
    with pytest.raises(ValueError, match="missing.*k_proj"):
        _fresh(ckpt).load_weights(missing.items())
    with pytest.raises(ValueError, match="unexpected.*extra"):
        _fresh(ckpt).load_weights([*state.items(), ("model.layers.0.extra.weight", torch.zeros(2))])
    shaped = dict(state, **{name: state[name][:-1]})
    with pytest.raises(ValueError, match="k_proj.*shape"):
        _fresh(ckpt).load_weights(shaped.items())
    # Rotary buffers some checkpoints carry are ignored.
    _fresh(ckpt).load_weights([*state.items(), ("model.layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(8))])


@pytest.mark.parametrize("name", [n for n, (_, _, kw) in VARIANTS.items() if kw.get("tie_word_embeddings")])
def test_tied_model_loads_with_or_without_lm_head(name: str, tmp_path: Path) -> None:
    ckpt = Checkpoint(name, tmp_path)
    assert ckpt.config.tie_word_embeddings
    state = {k: v for k, v in ckpt.hf.state_dict().items() if k != "lm_head.weight"}
    for extra in ([], [("lm_head.weight", state["model.embed_tokens.weight"])]):
        model = _fresh(ckpt)
        model.load_weights([*state.items(), *extra])
        assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])


def test_build_model_dtype() -> None:
    cfg = ModelConfig(architecture="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128, head_dim=16, qk_norm=True)
    model = build_model(cfg, "bfloat16", "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.rotary_emb.cos_sin.dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        build_model(cfg, "int8", "cpu")


# --- HF config mapping ---------------------------------------------------------------------------

BASE = dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096)
LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=2048)


def test_hf_config_classic_and_v5_rope_fields_agree() -> None:
    classic = model_config_from_hf(dict(BASE, rope_theta=500000.0, rope_scaling=dict(LLAMA3, rope_type="llama3")))
    old_key = model_config_from_hf(dict(BASE, rope_theta=500000.0, rope_scaling=dict(LLAMA3, type="llama3")))
    v5 = model_config_from_hf(dict(BASE, rope_parameters=dict(LLAMA3, rope_type="llama3", rope_theta=500000.0)))
    assert classic == old_key == v5
    assert v5.rope_theta == 500000.0 and v5.rope_scaling == dict(LLAMA3, rope_type="llama3")
    plain = model_config_from_hf(dict(BASE, rope_parameters=dict(rope_type="default", rope_theta=1e6)))
    assert plain.rope_scaling is None and plain.rope_theta == 1e6
    assert model_config_from_hf(BASE).rope_theta == 10000.0
    yarn = model_config_from_hf(dict(BASE, rope_scaling=dict(type="yarn", factor=4.0)))
    assert yarn.rope_scaling == dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=4096)


def test_hf_config_llama3_defaults_original_positions() -> None:
    scaling = {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}
    cfg = model_config_from_hf(dict(BASE, rope_scaling=dict(scaling, rope_type="llama3")))
    assert cfg.rope_scaling["original_max_position_embeddings"] == 4096


def test_hf_config_fields() -> None:
    cfg = model_config_from_hf(dict(BASE, eos_token_id=[128001, 128009], bos_token_id=128000))
    assert cfg.eos_token_ids == [128001, 128009] and cfg.bos_token_id == 128000
    assert cfg.head_dim == 16 and not cfg.tie_word_embeddings and not cfg.attention_bias
    assert model_config_from_hf(dict(BASE, eos_token_id=2)).eos_token_ids == [2]
    assert model_config_from_hf(dict(BASE, head_dim=64)).head_dim == 64
    assert model_config_from_hf(dict(BASE, tie_word_embeddings=True)).tie_word_embeddings
    assert model_config_from_hf(dict(BASE, attention_bias=True)).attention_bias
    qwen2 = model_config_from_hf(dict(BASE, architectures=["Qwen2ForCausalLM"]))
    assert qwen2.architecture == "qwen2" and qwen2.attention_bias and not qwen2.qk_norm
    qwen3 = model_config_from_hf(dict(BASE, architectures=None, model_type="qwen3", head_dim=128))
    assert qwen3.architecture == "qwen3" and qwen3.qk_norm and qwen3.head_dim == 128
    assert qwen3.hf_architecture == "Qwen3ForCausalLM"


def test_hf_config_sliding_window_layers() -> None:
    """The window is applied per layer (no cap on the context): Mistral slides every layer, Qwen2/3
    the layers from max_window_layers on when use_sliding_window is set."""
    mistral = model_config_from_hf(dict(BASE, architectures=["MistralForCausalLM"], sliding_window=1024))
    assert mistral.architecture == "llama" and mistral.max_position_embeddings == BASE["max_position_embeddings"]
    assert mistral.layer_window(0) == mistral.layer_window(BASE["num_hidden_layers"] - 1) == 1024
    qwen = dict(BASE, architectures=["Qwen2ForCausalLM"], sliding_window=1024, max_window_layers=1)
    assert model_config_from_hf(qwen).layer_window(1) is None  # use_sliding_window false
    sliding = model_config_from_hf(dict(qwen, use_sliding_window=True))
    assert sliding.layer_window(0) is None and sliding.layer_window(1) == 1024


def test_hf_config_rejects_unsupported() -> None:
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*supported: .*LlamaForCausalLM.*Qwen3ForCausalLM"):
        model_config_from_hf(dict(BASE, architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ValueError, match=r"rope type 'dynamic' is not supported; supported: .*llama3"):
        model_config_from_hf(dict(BASE, rope_scaling=dict(rope_type="dynamic", factor=4.0)))
    with pytest.raises(ValueError, match="hidden_size"):
        model_config_from_hf({k: v for k, v in BASE.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="mlp_bias"):
        model_config_from_hf(dict(BASE, mlp_bias=True))
