"""DeepSeek V2/V3 from GGUF (llama.cpp's "deepseek2" architecture) against transformers on the HF weights.

A tiny random DeepSeek-V3 (q LoRA, YaRN, sigmoid + noaux_tc routing with its bias, a leading dense
layer, shared experts) and a V2 (no q LoRA, softmax group-limited routing) are saved with
transformers, then written to GGUF by this file's own writer with llama.cpp's names, layouts and
metadata keys (gguf-py's MODEL_ARCH.DEEPSEEK2 and convert_hf_to_gguf.py's DeepseekV2Model):
experts stacked per projection, kv_b either merged (`attn_kv_b`, older files, head_count_kv = heads)
or split into a transposed key half and a value half (`attn_k_b` / `attn_v_b`, current files, MQA
metadata: head_count_kv 1, key_length = kv_lora_rank + rope, *_mla lengths). zili loads the GGUF;
fp32 logits must equal transformers' to 1e-4 through the latent paged cache and absorbed decode,
and the engine's greedy tokens must equal transformers' generate.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from tests.tiny_models import write_tiny_deepseek  # noqa: E402
from tests.unit.test_deepseek import PagedRunner, _count_calls  # noqa: E402
from zili import LLM, SamplingParams  # noqa: E402
from zili.models.deepseek import merge_kv_b  # noqa: E402
from zili.models.loader import load_model, open_checkpoint, resolve_model  # noqa: E402
from zili.weights.errors import UnsupportedModelError  # noqa: E402

ATOL = 1e-4
# GGUF keeps one YaRN magnitude (0.1 * mscale_all_dim): llama.cpp assumes mscale == mscale_all_dim,
# as DeepSeek's own configs have, so the tiny V3 does too.
V3_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=0.8, mscale_all_dim=0.8,
               original_max_position_embeddings=128, beta_fast=32, beta_slow=1)
VARIANTS = {
    "v3-split": ("v3", True, dict(rope_parameters=V3_YARN)),
    "v3-merged": ("v3", False, dict(rope_parameters=V3_YARN)),
    "v2-split": ("v2", True, dict(attention_bias=False)),  # llama.cpp's deepseek2 has no attention biases
}
Q8 = gguf.GGMLQuantizationType.Q8_0
_EXPERT_LEAVES = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_ATTN = {"q_proj": "attn_q", "q_a_proj": "attn_q_a", "q_a_layernorm": "attn_q_a_norm", "q_b_proj": "attn_q_b",
         "kv_a_proj_with_mqa": "attn_kv_a_mqa", "kv_a_layernorm": "attn_kv_a_norm", "o_proj": "attn_output"}


def write_deepseek2_gguf(hf_dir: Path, path: Path, split_kv_b: bool, gating: int | None = None,
                         q8: bool = False) -> None:
    """An HF DeepSeek V2/V3 checkpoint -> a llama.cpp "deepseek2" GGUF (F32 tensors). `gating`
    overrides the expert_gating_func value written (for the error test); `q8` stores every matrix
    whose rows are whole 32-value blocks as Q8_0 (stacked experts and k_b / v_b included)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    sd = load_file(str(hf_dir / "model.safetensors"))
    H, r = cfg["num_attention_heads"], cfg["kv_lora_rank"]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    w = gguf.GGUFWriter(str(path), "deepseek2")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(H)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
    if cfg.get("q_lora_rank"):
        w.add_q_lora_rank(cfg["q_lora_rank"])
    w.add_kv_lora_rank(r)
    if split_kv_b:  # current converters: MLA as MQA over the latent
        w.add_head_count_kv(1)
        w.add_key_length(r + rope)
        w.add_value_length(r)
        w.add_key_length_mla(nope + rope)
        w.add_value_length_mla(v)
    else:  # older converters: per-head lengths
        w.add_head_count_kv(H)
        w.add_key_length(nope + rope)
        w.add_value_length(v)
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_count(cfg["n_routed_experts"])
    w.add_expert_shared_count(cfg["n_shared_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_weights_scale(cfg["routed_scaling_factor"])
    if cfg.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    if gating is None:
        # transformers' V3 config has no scoring_func: V3 always scores with a sigmoid
        scoring = cfg.get("scoring_func") or ("sigmoid" if cfg["model_type"] == "deepseek_v3" else "softmax")
        gating = gguf.ExpertGatingFuncType.SIGMOID if scoring == "sigmoid" else gguf.ExpertGatingFuncType.SOFTMAX
    w.add_uint32(gguf.Keys.LLM.EXPERT_GATING_FUNC.format(arch="deepseek2"), int(gating))
    w.add_expert_group_count(cfg["n_group"])
    w.add_expert_group_used_count(cfg["topk_group"])
    w.add_rope_dimension_count(rope)
    params = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(params.get("rope_theta", 10000.0))
    if params.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(params["factor"])
        w.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_log_mul(0.1 * params["mscale_all_dim"])
        w.add_rope_scaling_yarn_beta_fast(params["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(params["beta_slow"])
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["id"] for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges([])
    w.add_eos_token_id(cfg["eos_token_id"])

    def add(name: str, t: torch.Tensor) -> None:
        values = t.float().contiguous().numpy().astype(np.float32)
        if q8 and values.ndim >= 2 and values.shape[-1] % 32 == 0 and "norm" not in name:
            w.add_tensor(name, gguf.quants.quantize(values, Q8), raw_dtype=Q8)
        else:
            w.add_tensor(name, values)

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    add("output.weight", sd["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        for hf, ll in _ATTN.items():
            if p + f"self_attn.{hf}.weight" in sd:
                add(f"blk.{i}.{ll}.weight", sd[p + f"self_attn.{hf}.weight"])
        kv_b = sd[p + "self_attn.kv_b_proj.weight"]
        if split_kv_b:  # as convert_hf_to_gguf.py: per head [nope | v] rows, the key half transposed
            k_b, v_b = kv_b.view(H, nope + v, r).split([nope, v], dim=1)
            add(f"blk.{i}.attn_k_b.weight", k_b.transpose(1, 2))
            add(f"blk.{i}.attn_v_b.weight", v_b)
        else:
            add(f"blk.{i}.attn_kv_b.weight", kv_b)
        if i < cfg["first_k_dense_replace"]:
            for hf, ll in _EXPERT_LEAVES.items():
                add(f"blk.{i}.{ll}.weight", sd[p + f"mlp.{hf}.weight"])
            continue
        add(f"blk.{i}.ffn_gate_inp.weight", sd[p + "mlp.gate.weight"])
        if p + "mlp.gate.e_score_correction_bias" in sd:
            add(f"blk.{i}.exp_probs_b.bias", sd[p + "mlp.gate.e_score_correction_bias"])
        for hf, ll in _EXPERT_LEAVES.items():
            add(f"blk.{i}.{ll}_exps.weight",
                torch.stack([sd[p + f"mlp.experts.{e}.{hf}.weight"] for e in range(cfg["n_routed_experts"])]))
            add(f"blk.{i}.{ll}_shexp.weight", sd[p + f"mlp.shared_experts.{hf}.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class Pair:
    """The HF checkpoint (transformers' model on it) and its GGUF conversion (zili's model on it)."""

    def __init__(self, variant: str, root: Path) -> None:
        version, split, overrides = VARIANTS[variant]
        self.hf_dir = write_tiny_deepseek(root / "hf", version, **overrides)
        self.gguf = root / f"{variant}.gguf"
        write_deepseek2_gguf(self.hf_dir, self.gguf, split)
        self.split = split
        cls = getattr(transformers, {"v2": "DeepseekV2ForCausalLM", "v3": "DeepseekV3ForCausalLM"}[version])
        self.hf = cls.from_pretrained(self.hf_dir, attn_implementation="eager").eval()
        loaded = load_model(str(self.gguf), dtype="float32", device="cpu")
        self.model, self.config = loaded.model, loaded.config

    def tokens(self, n: int, seed: int) -> list[int]:
        return torch.randint(0, self.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory) -> Pair:
    return Pair(request.param, tmp_path_factory.mktemp(request.param))


def test_config_from_metadata_equals_hf(pair: Pair) -> None:
    hf, cfg = pair.hf.config, pair.config
    assert cfg.architecture in ("deepseek_v2", "deepseek_v3") and cfg.use_mla
    for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
                 "first_k_dense_replace", "n_group", "topk_group", "num_hidden_layers", "num_attention_heads",
                 "hidden_size", "intermediate_size", "vocab_size"):
        assert getattr(cfg, name) == getattr(hf, name), name
    assert cfg.routed_scaling_factor == pytest.approx(hf.routed_scaling_factor)
    assert cfg.norm_topk_prob == bool(hf.norm_topk_prob)
    assert cfg.num_key_value_heads == hf.num_attention_heads
    assert cfg.head_dim == hf.qk_nope_head_dim + hf.qk_rope_head_dim
    if cfg.architecture == "deepseek_v3":
        assert (cfg.scoring_func, cfg.topk_method) == ("sigmoid", "noaux_tc")
        assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["factor"] == 4.0
        assert cfg.rope_scaling["mscale_all_dim"] == pytest.approx(0.8)
        assert cfg.rope_scaling["original_max_position_embeddings"] == 128
    else:
        assert (cfg.scoring_func, cfg.topk_method) == ("softmax", "group_limited_greedy")
        assert cfg.rope_scaling is None


def test_weights_equal_the_hf_checkpoint(pair: Pair) -> None:
    """Every parameter zili loaded from the GGUF equals the HF one it stands for (kv_b merged back,
    experts unstacked, the router bias in fp32)."""
    sd = load_file(str(pair.hf_dir / "model.safetensors"))
    layer = pair.model.model.layers[1]
    w_kv_b = layer.self_attn.kv_b_proj.weight
    assert torch.equal(w_kv_b, sd["model.layers.1.self_attn.kv_b_proj.weight"])
    experts = layer.mlp.experts
    inter = experts.intermediate_size
    for e in (0, experts.num_experts - 1):
        assert torch.equal(experts.w13[e, :inter], sd[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"])
        assert torch.equal(experts.w13[e, inter:], sd[f"model.layers.1.mlp.experts.{e}.up_proj.weight"])
        assert torch.equal(experts.w2[e], sd[f"model.layers.1.mlp.experts.{e}.down_proj.weight"])
    bias = layer.mlp.gate.e_score_correction_bias
    if bias is not None:
        assert bias.dtype == torch.float32
        assert torch.equal(bias, sd["model.layers.1.mlp.gate.e_score_correction_bias"])


def test_prefill_then_absorbed_decode_match_hf(pair: Pair, monkeypatch) -> None:
    ids = pair.tokens(40 + 12, seed=3)
    with torch.no_grad():
        want = pair.hf(torch.tensor([ids])).logits[0].float()
    assert want.std() > 0.1
    runner = PagedRunner(pair.model)
    # The cache is the latent one: kv_lora_rank + qk_rope_head_dim per token, no per-head keys.
    assert runner.kv_caches[0].shape[-1] == pair.config.kv_lora_rank + pair.config.qk_rope_head_dim
    got = runner.step({"a": ids[:40]})["a"]
    assert (got - want[:40]).abs().max().item() <= ATOL
    calls = _count_calls(monkeypatch, "mla_prefill_expanded", "mla_decode_absorbed")
    for i in range(40, 52):
        got = runner.step({"a": [ids[i]]})["a"]
        diff = (got - want[i:i + 1]).abs().max().item()
        assert diff <= ATOL, f"decode position {i}: max abs diff {diff:.3g}"
    assert calls == {"mla_prefill_expanded": 0, "mla_decode_absorbed": 12 * pair.config.num_hidden_layers}


def test_engine_greedy_tokens_equal_transformers(pair: Pair, monkeypatch) -> None:
    calls = _count_calls(monkeypatch, "mla_decode_absorbed")
    llm = LLM(str(pair.gguf), dtype="float32", block_size=4, max_num_seqs=4, threads=1, enforce_eager=True,
              kv_cache_memory=1 << 22)
    caches = llm.engine.runner.kv_caches
    assert caches[0].shape[1:] == (4, pair.config.kv_lora_rank + pair.config.qk_rope_head_dim)
    prompts = [pair.tokens(n, seed=10 + n) for n in (5, 17, 9)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    for prompt, tokens in zip(prompts, got, strict=True):
        assert list(tokens) == hf_greedy(pair.hf, prompt, 12)
    assert calls["mla_decode_absorbed"] > 0  # decode ran the absorbed form over the latent cache


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """transformers' argmax continuation, recomputed over the whole sequence each step (no EOS stop)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_merge_kv_b_inverts_llama_cpps_split() -> None:
    H, r, nope, v = 3, 8, 5, 4
    kv_b = torch.randn(H * (nope + v), r, generator=torch.Generator().manual_seed(0))
    k_b, v_b = kv_b.view(H, nope + v, r).split([nope, v], dim=1)
    assert torch.equal(merge_kv_b(k_b.transpose(1, 2), v_b), kv_b)
    with pytest.raises(ValueError, match=r"attn_k_b \[3, 5, 8\] and attn_v_b"):
        merge_kv_b(k_b, v_b)  # the key half not transposed, as no converter writes it


def test_deepseek2_errors_name_what_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "half.gguf"
    hf_dir = write_tiny_deepseek(tmp_path / "hf", "v3", rope_parameters=V3_YARN)
    write_deepseek2_gguf(hf_dir, path, split_kv_b=True)
    ck = open_checkpoint(resolve_model(str(path)))
    assert ck.config().architecture == "deepseek_v3"
    # A file with only one kv_b half: the loader says so instead of a shape error later.
    model = load_model(str(path), dtype="float32", device="cpu", load_format="dummy").model
    only_k = [(n, t) for n, t in ck.tensors() if not n.endswith("v_b_proj.weight")]
    with pytest.raises(ValueError, match="only one half of kv_b"):
        model.load_weights(only_k)
    bad = tmp_path / "gating.gguf"
    write_deepseek2_gguf(hf_dir, bad, split_kv_b=True, gating=7)  # not softmax (1) or sigmoid (2)
    with pytest.raises(UnsupportedModelError, match=r"expert_gating_func 7 is not supported; supported: 1 \(softmax\)"):
        open_checkpoint(resolve_model(str(bad))).config()


def test_q8_0_file_loads_blocks_exactly_and_matches_hf_on_the_same_values(tmp_path: Path) -> None:
    """A quantized file (Q8_0 matrices, 3-D stacked experts and k_b / v_b included): zili's weights
    are exactly the dequantized blocks, and its fp32 logits equal transformers' run on those same
    dequantized values (the HF model's kv_b and experts overwritten with them)."""
    hf_dir = write_tiny_deepseek(tmp_path / "hf", "v3", rope_parameters=V3_YARN)
    path = tmp_path / "q8.gguf"
    write_deepseek2_gguf(hf_dir, path, split_kv_b=True, q8=True)
    ck = open_checkpoint(resolve_model(str(path)))
    stored = {info.name: info.type_name for info in ck.header.tensors.values()}
    assert stored["blk.1.ffn_gate_exps.weight"] == "Q8_0" and stored["blk.1.attn_k_b.weight"] == "Q8_0"
    loaded = load_model(str(path), dtype="float32", device="cpu")
    # The HF checkpoint again, every tensor replaced by the value the GGUF file holds for it.
    # Values decoded by gguf-py's own reader and dequantizer, independent of zili's.
    assert ck.layout is not None
    got = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        got[ck.layout.hf_name(t.name)] = torch.from_numpy(np.array(values, dtype=np.float32))
    sd = load_file(str(hf_dir / "model.safetensors"))
    for name, tensor in got.items():
        stacked = re.fullmatch(r"(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.weight", name)
        if stacked is not None:  # [E, out, in]
            for e in range(tensor.shape[0]):
                sd[f"{stacked.group(1)}.{e}.{stacked.group(2)}.weight"] = tensor[e].clone()
        elif not name.endswith(("k_b_proj.weight", "v_b_proj.weight")):
            sd[name] = tensor
    for i in range(loaded.config.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        sd[p + "kv_b_proj.weight"] = merge_kv_b(got[p + "k_b_proj.weight"], got[p + "v_b_proj.weight"])
    q_dir = tmp_path / "hf-q8-values"
    shutil.copytree(hf_dir, q_dir)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(q_dir / "model.safetensors"))
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(q_dir, attn_implementation="eager").eval()
    hf_sd = sd
    kv_b = loaded.model.model.layers[1].self_attn.kv_b_proj.weight
    assert torch.equal(kv_b, hf_sd["model.layers.1.self_attn.kv_b_proj.weight"])
    original = load_file(str(hf_dir / "model.safetensors"))["model.layers.1.self_attn.kv_b_proj.weight"]
    assert not torch.equal(kv_b, original)  # the blocks are lossy: the test would notice a float copy
    ids = torch.randint(0, loaded.config.vocab_size, (24,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].float()
    got_logits = PagedRunner(loaded.model).step({"a": ids})["a"]
    assert (got_logits - want).abs().max().item() <= ATOL
