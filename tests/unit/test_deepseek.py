"""DeepSeek V2/V3 against HF transformers (the oracle), on tiny random checkpoints.

Each variant is a transformers model with random weights (norms and the router's correction bias
included), saved with save_pretrained and loaded back through zili. fp32 logits must agree to 1e-4 on
prefill and on 16 decode steps through the latent paged cache (decode attends in the absorbed form),
and on a mixed batch (prefill, chunked prefill and decodes together). Routing is compared with HF's
routers directly, for every scoring / top-k method; the grouped expert computation with a dense loop.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers  # noqa: E402

from tests.tiny_models import write_tiny_deepseek  # noqa: E402
from zili.config import ModelConfig  # noqa: E402
from zili.kernels import mla_attention as mla_kernels  # noqa: E402
from zili.kernels.attention import AttentionMetadata  # noqa: E402
from zili.layers.moe import DeepseekMoE, FusedExperts, GatedMLP, select_experts  # noqa: E402
from zili.models.hf_config import model_config_from_hf  # noqa: E402
from zili.models.registry import build_model  # noqa: E402

ATOL = 1e-4
HF_CLASSES = {"v2": "DeepseekV2ForCausalLM", "v3": "DeepseekV3ForCausalLM"}


class Checkpoint:
    def __init__(self, version: str, root: Path) -> None:
        from zili.models.loader import load_model

        self.path = write_tiny_deepseek(root / version, version)
        self.hf = getattr(transformers, HF_CLASSES[version]).from_pretrained(
            self.path, attn_implementation="eager").eval()
        loaded = load_model(str(self.path), dtype="float32", device="cpu")
        self.model = loaded.model
        self.config: ModelConfig = loaded.config

    @torch.no_grad()
    def hf_logits(self, ids: list[int]) -> torch.Tensor:
        return self.hf(torch.tensor([ids])).logits[0].float()

    def tokens(self, n: int, seed: int) -> list[int]:
        return torch.randint(0, self.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class PagedRunner:
    """Drives a model through latent paged caches the way the engine does; blocks come from a
    shuffled free list, so every context is scattered over non-contiguous blocks."""

    def __init__(self, model: torch.nn.Module, num_blocks: int = 64, block_size: int = 4, seed: int = 0) -> None:
        cfg: ModelConfig = model.config
        self.model, self.block_size = model, block_size
        self.kv_caches = [torch.zeros(cfg.kv_cache_shape(num_blocks, block_size)) for _ in range(cfg.num_hidden_layers)]
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tables: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    @torch.no_grad()
    def step(self, chunks: dict[str, list[int]]) -> dict[str, torch.Tensor]:
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
        return dict(zip(chunks, self.model.compute_logits(hidden).split(query_lens)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from intra-op threads, and on a busy shared machine the thread
    hand-offs cost milliseconds per op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["v3", "v2"])
def ckpt(request, tmp_path_factory) -> Checkpoint:
    return Checkpoint(request.param, tmp_path_factory.mktemp("deepseek"))


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str, atol: float = ATOL) -> None:
    assert got.shape == want.shape, what
    diff = (got - want).abs().max().item()
    assert diff <= atol, f"{what}: max abs diff {diff:.3g} > {atol}"


def test_config_and_cache_layout(ckpt: Checkpoint) -> None:
    hf, cfg = ckpt.hf.config, ckpt.config
    for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
                 "first_k_dense_replace", "n_group", "topk_group", "routed_scaling_factor"):
        assert getattr(cfg, name) == getattr(hf, name), name
    # The cache holds one latent + rotary key per token, not per-head keys and values.
    assert cfg.kv_cache_shape(10, 4) == (10, 4, hf.kv_lora_rank + hf.qk_rope_head_dim)
    kinds = [type(layer.mlp) for layer in ckpt.model.model.layers]
    assert kinds == [GatedMLP, DeepseekMoE, DeepseekMoE]


def test_prefill_then_decode_matches_hf(ckpt: Checkpoint, monkeypatch) -> None:
    ids = ckpt.tokens(48 + 16, seed=2)
    want = ckpt.hf_logits(ids)
    assert want.std() > 0.1
    runner = PagedRunner(ckpt.model)
    _assert_close(runner.step({"a": ids[:48]})["a"], want[:48], "prefill")
    calls = _count_calls(monkeypatch, "mla_prefill_expanded", "mla_decode_absorbed")
    for i in range(48, 64):
        _assert_close(runner.step({"a": [ids[i]]})["a"], want[i:i + 1], f"decode position {i}")
    # Decode attends in the absorbed form only, over the same cache the expanded prefill wrote.
    assert calls == {"mla_prefill_expanded": 0, "mla_decode_absorbed": 16 * ckpt.config.num_hidden_layers}


def _count_calls(monkeypatch, *names: str) -> dict[str, int]:
    calls = dict.fromkeys(names, 0)
    for name in names:
        def counted(*args, _name=name, _fn=getattr(mla_kernels, name)):
            calls[_name] += 1
            return _fn(*args)
        monkeypatch.setattr(mla_kernels, name, counted)
    return calls


def test_mixed_batch_matches_hf(ckpt: Checkpoint) -> None:
    """Prefills of different lengths; then chunked prefill mixed with decodes; then decode only."""
    seqs = {"a": ckpt.tokens(23, seed=3), "b": ckpt.tokens(21, seed=4), "c": ckpt.tokens(7, seed=5)}
    want = {s: ckpt.hf_logits(t) for s, t in seqs.items()}
    got: dict[str, list[torch.Tensor]] = {s: [] for s in seqs}
    runner = PagedRunner(ckpt.model, seed=1)
    schedule = [
        {"a": (0, 20), "b": (0, 9), "c": (0, 5)},
        {"a": (20, 21), "b": (9, 19), "c": (5, 6)},  # decode, chunk over a cached prefix, decode
        {"a": (21, 22), "b": (19, 20), "c": (6, 7)},
        {"a": (22, 23), "b": (20, 21)},
    ]
    for plan in schedule:
        for s, logits in runner.step({s: seqs[s][lo:hi] for s, (lo, hi) in plan.items()}).items():
            got[s].append(logits)
    for s in seqs:
        _assert_close(torch.cat(got[s]), want[s], f"sequence {s}")


def test_load_weights_rejects_bad_checkpoints(ckpt: Checkpoint) -> None:
    from safetensors.torch import load_file

    state = load_file(str(ckpt.path / "model.safetensors"))
    fresh = lambda: build_model(ckpt.config, torch.float32, "cpu")  # noqa: E731
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    with pytest.raises(ValueError, match="missing.*experts.5.up_proj"):
        fresh().load_weights((k, v) for k, v in state.items() if k != name)
    with pytest.raises(ValueError, match="experts.5.up_proj.*shape"):
        fresh().load_weights({**state, name: state[name][:-1]}.items())
    with pytest.raises(ValueError, match="unexpected.*extra"):
        fresh().load_weights([*state.items(), ("model.layers.0.extra.weight", torch.zeros(2))])
    # V3 ships a multi-token-prediction layer after the last one; it is not part of the model.
    fresh().load_weights([*state.items(), ("model.layers.3.eh_proj.weight", torch.zeros(2))])


# --- the two attention forms -----------------------------------------------------------------------

def test_absorbed_decode_equals_expanded() -> None:
    gen = torch.Generator().manual_seed(0)
    H, d_nope, d_rope, d_v, r, bs = 4, 16, 8, 12, 24, 4
    cache = torch.randn(20, bs, r + d_rope, generator=gen)
    w_kv_b = torch.randn(H, d_nope + d_v, r, generator=gen) * 0.3
    seq_lens = [9, 3, 14]
    tables = torch.tensor([[5, 1, 7, 0], [2, 0, 0, 0], [19, 4, 11, 8]])
    q_nope, q_rope = torch.randn(3, H, d_nope, generator=gen), torch.randn(3, H, d_rope, generator=gen)
    got = mla_kernels.mla_decode_absorbed(q_nope, q_rope, cache, tables, torch.tensor(seq_lens), 14, w_kv_b, 0.2)
    for b, slen in enumerate(seq_lens):
        context = mla_kernels.gather_latent_context(cache, tables[b], slen)
        want = mla_kernels.mla_prefill_expanded(q_nope[b:b + 1], q_rope[b:b + 1], context, w_kv_b, 0.2)
        _assert_close(got[b:b + 1], want, f"sequence {b}", atol=1e-5)


# --- routing against HF's routers ------------------------------------------------------------------

ROUTERS = {
    "v2_greedy": ("DeepseekV2", dict(topk_method="greedy", num_experts_per_tok=3, routed_scaling_factor=16.0)),
    "v2_group_limited": ("DeepseekV2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                            num_experts_per_tok=3, routed_scaling_factor=1.5)),
    "v3_noaux_tc": ("DeepseekV3", dict(n_group=4, topk_group=2, num_experts_per_tok=4, norm_topk_prob=True)),
    "v3_unnormalised": ("DeepseekV3", dict(n_group=8, topk_group=3, num_experts_per_tok=6, norm_topk_prob=False,
                                           routed_scaling_factor=1.0)),
    "v3_one_group": ("DeepseekV3", dict(n_group=1, topk_group=1, num_experts_per_tok=2)),
}


@pytest.mark.parametrize("variant", list(ROUTERS))
def test_routing_matches_hf(variant: str) -> None:
    family, kw = ROUTERS[variant]
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    hf_cfg = getattr(transformers, f"{family}Config")(hidden_size=32, num_attention_heads=4, n_routed_experts=16, **kw)
    router = {"DeepseekV2": DeepseekV2TopkRouter, "DeepseekV3": DeepseekV3TopkRouter}[family](hf_cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.copy_(torch.randn(16, generator=gen) * 0.1)
    x = torch.randn(200, 32, generator=gen)
    logits, want_w, want_ids = router(x)
    cfg = model_config_from_hf(dict(hf_cfg.to_dict(), architectures=[f"{family}ForCausalLM"]))
    bias = getattr(router, "e_score_correction_bias", None) if cfg.topk_method == "noaux_tc" else None
    got_w, got_ids = select_experts(logits, cfg, bias)
    got_ids, order = got_ids.sort(dim=-1)
    want_ids, want_order = want_ids.sort(dim=-1)
    assert torch.equal(got_ids, want_ids)
    _assert_close(got_w.gather(1, order), want_w.gather(1, want_order), "routing weights", atol=1e-6)


def test_routing_softmax_noaux_and_norm_topk_prob() -> None:
    """Combinations HF's routers do not offer, against the definitions."""
    cfg = ModelConfig(architecture="deepseek_v3", hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, vocab_size=8, n_routed_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=8, scoring_func="softmax", topk_method="greedy",
                      norm_topk_prob=True, routed_scaling_factor=2.0)
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    weights, ids = select_experts(logits, cfg)
    top, top_ids = logits.softmax(-1).topk(2, dim=-1)
    assert torch.equal(ids.sort(-1)[0], top_ids.sort(-1)[0])
    _assert_close(weights.sum(-1), torch.full((50,), 2.0), "normalised and scaled", atol=1e-6)


# --- grouped expert computation ---------------------------------------------------------------------

def _experts(num_experts: int = 8, hidden: int = 16, inter: int = 12, expert_range: range | None = None,
             seed: int = 0) -> FusedExperts:
    experts = FusedExperts(num_experts, hidden, inter, expert_range)
    gen = torch.Generator().manual_seed(seed)
    full_w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.3
    full_w2 = torch.randn(num_experts, hidden, inter, generator=gen) * 0.3
    with torch.no_grad():
        experts.w13.copy_(full_w13[experts.expert_range.start:experts.expert_range.stop])
        experts.w2.copy_(full_w2[experts.expert_range.start:experts.expert_range.stop])
    return experts


def _dense_loop(experts: FusedExperts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    inter = experts.intermediate_size
    for e in range(experts.num_experts):
        h = x @ experts.w13[e].T
        y = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ experts.w2[e].T
        out += y * (weights * (ids == e)).sum(-1, keepdim=True)
    return out


def test_grouped_experts_equal_dense_loop_and_touch_only_routed_experts() -> None:
    experts = _experts()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 16, generator=gen)
    ids = torch.tensor([[1, 5], [5, 1], [1, 6]] * 3 + [[6, 5]])
    weights = torch.rand(10, 2, generator=gen)
    want = _dense_loop(experts, x, weights, ids)
    with torch.no_grad():
        for e in (0, 2, 3, 4, 7):  # never routed to: poison them
            experts.w13[e] = float("nan")
    _assert_close(experts(x, weights, ids), want, "grouped vs dense loop", atol=1e-5)


def test_expert_parallel_slices_sum_to_the_whole() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(12, 16, generator=gen)
    ids = torch.stack([torch.randperm(8, generator=gen)[:3] for _ in range(12)])
    weights = torch.rand(12, 3, generator=gen)
    whole = _experts()(x, weights, ids)
    parts = _experts(expert_range=range(0, 3))(x, weights, ids) + _experts(expert_range=range(3, 8))(x, weights, ids)
    _assert_close(parts, whole, "sum of expert-parallel slices", atol=1e-5)
    half = _experts(expert_range=range(4, 8))
    assert not half.load_expert(1, "gate_proj", torch.zeros(12, 16))  # another rank's expert
    assert half.load_expert(5, "down_proj", torch.zeros(16, 12)) and half.w2[1].abs().sum() == 0


# --- config mapping ----------------------------------------------------------------------------------

V3_JSON = dict(  # the fields of DeepSeek-V3's own config.json that change the math
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_size=7168, intermediate_size=18432,
    moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
    n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
    qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc", n_group=8, topk_group=4,
    num_experts_per_tok=8, moe_layer_freq=1, first_k_dense_replace=3, norm_topk_prob=True, scoring_func="sigmoid",
    max_position_embeddings=163840, vocab_size=129280, rope_theta=10000,
    rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=1.0, mscale_all_dim=1.0,
                      original_max_position_embeddings=4096, type="yarn"),
    quantization_config=dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8", weight_block_size=[128, 128]),
)


def test_hf_config_deepseek_v3_fields() -> None:
    from zili.layers.mla import mla_softmax_scale

    cfg = model_config_from_hf(V3_JSON)
    assert cfg.architecture == "deepseek_v3" and cfg.use_mla and cfg.rope_interleave
    assert (cfg.scoring_func, cfg.topk_method, cfg.n_group, cfg.topk_group) == ("sigmoid", "noaux_tc", 8, 4)
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["mscale_all_dim"] == 1.0
    # 576 values per token per layer: 61 layers * 576 * 2 bytes is about 69 KiB per token in bf16.
    assert cfg.kv_cache_shape(1, 1) == (1, 1, 576)
    assert [cfg.is_moe_layer(i) for i in range(5)] == [False, False, False, True, True]
    m = 0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1.0
    assert mla_softmax_scale(192, cfg.rope_scaling) == pytest.approx(192 ** -0.5 * m * m)
    freq2 = model_config_from_hf(dict(V3_JSON, moe_layer_freq=2, first_k_dense_replace=1))
    assert [freq2.is_moe_layer(i) for i in range(6)] == [False, False, True, False, True, False]
    with pytest.raises(ValueError, match="topk_method 'bogus'"):
        model_config_from_hf(dict(V3_JSON, topk_method="bogus"))
    with pytest.raises(ValueError, match="n_group"):
        model_config_from_hf(dict(V3_JSON, n_group=7))


def test_moe_layer_freq_builds_the_layout() -> None:
    cfg = model_config_from_hf(dict(V3_JSON, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                    num_hidden_layers=5, num_attention_heads=2, n_routed_experts=8, n_group=2,
                                    topk_group=1, num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=None,
                                    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, vocab_size=64,
                                    max_position_embeddings=64, first_k_dense_replace=1, moe_layer_freq=2,
                                    rope_scaling=None))
    model = build_model(cfg, torch.float32, "cpu")
    assert [type(layer.mlp) for layer in model.model.layers] == [GatedMLP, GatedMLP, DeepseekMoE, GatedMLP, DeepseekMoE]
