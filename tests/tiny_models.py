"""Tiny random HF checkpoints written by the tests themselves (no downloads).

The tokenizer is byte-level: one token per byte (so multi-byte characters span several
tokens, which exercises the incremental detokenizer), plus ChatML special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_byte_tokenizer(path: Path) -> int:
    """Write tokenizer.json + tokenizer_config.json; returns the vocab size used."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens(specials)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "chat_template": CHATML, "add_bos_token": False, "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def write_tiny_llama(path: Path, seed: int = 0, **overrides) -> Path:
    """A 2-layer random Llama with GQA and the byte tokenizer, saved as an HF checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    vocab = write_byte_tokenizer(path)
    eos = json.loads((path / "tokenizer.json").read_text())["added_tokens"][2]["id"]
    kwargs = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, initializer_range=0.3, bos_token_id=None, eos_token_id=eos,
                  pad_token_id=eos - 2)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    model.save_pretrained(path)
    return path


# Tiny DeepSeek shapes: dense and MoE layers, 8-16 experts in groups, distinct nope / rope / v head dims.
_DEEPSEEK_DEFAULTS = {
    # q LoRA, interleaved rotary, YaRN with both mscales, sigmoid + noaux_tc routing with its bias.
    "v3": dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, n_shared_experts=1,
               num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=32,
               q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=24, norm_topk_prob=True,
               routed_scaling_factor=2.5, rope_interleave=True, max_position_embeddings=512,
               rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0, mscale_all_dim=0.8,
                                    original_max_position_embeddings=128, beta_fast=32, beta_slow=1)),
    # No q LoRA, attention bias, softmax + group-limited greedy routing, two shared experts, plain rotary.
    "v2": dict(hidden_size=128, intermediate_size=192, moe_intermediate_size=48, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2,
               num_experts_per_tok=3, n_group=4, topk_group=2, topk_method="group_limited_greedy",
               first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=24,
               v_head_dim=32, routed_scaling_factor=1.5, attention_bias=True, max_position_embeddings=512,
               rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
}


def write_tiny_deepseek(path: Path, version: str = "v3", seed: int = 0, init_std: float = 0.1, **overrides) -> Path:
    """A 3-layer random DeepSeek V2 or V3 (layer 0 dense, 1-2 MoE) with the byte tokenizer.

    Every weight is random, norms and the router's score-correction bias included, so none is a no-op."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    vocab = write_byte_tokenizer(path)
    eos = json.loads((path / "tokenizer.json").read_text())["added_tokens"][2]["id"]
    kwargs = dict(_DEEPSEEK_DEFAULTS[version], vocab_size=vocab, bos_token_id=None, eos_token_id=eos,
                  pad_token_id=eos - 2, tie_word_embeddings=False)
    kwargs.update(overrides)
    name = {"v2": "DeepseekV2", "v3": "DeepseekV3"}[version]
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(**kwargs)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for tname, t in [*model.named_parameters(), *model.named_buffers()]:
            if tname.endswith("e_score_correction_bias"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            elif t.is_floating_point() and "rotary" not in tname:
                noise = torch.randn(t.shape, generator=gen) * init_std
                t.copy_(1.0 + noise if "norm" in tname else noise)
    model.save_pretrained(path)
    return path


def write_tiny_deepseek_mtp(root: Path, main_layers: int = 3, branch_scale: float | None = None) -> tuple[Path, Path]:
    """A tiny random DeepSeek-V3 with one multi-token-prediction layer (num_nextn_predict_layers=1), as
    HF checkpoints ship it. Returns (big, path): `big` is a random (main_layers + 1)-layer model; `path`
    declares main_layers layers, so big's last layer becomes the MTP block (MoE, as in V3), and holds
    enorm, hnorm, eh_proj, shared_head.{norm,head} and a copy of the embedding under
    model.layers.{main_layers}.

    `branch_scale` (None: all random) makes the MTP layer a good predictor, for acceptance tests: every
    attention and MLP output projection (main and MTP) is scaled by it, so the main model is close to a
    bigram model (its next token a function of the current one), and the MTP layer reads only the
    embedding of the token it is given (eh_proj = [I, 0]) through the main model's final norm and LM
    head: its prediction of the token after next is then close to the main model's next prediction."""
    from safetensors.torch import load_file, save_file

    big = write_tiny_deepseek(root / "big", "v3", num_hidden_layers=main_layers + 1)
    path = root / "main"
    path.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_text((big / name).read_text())
    config = json.loads((big / "config.json").read_text())
    config.update(num_hidden_layers=main_layers, num_nextn_predict_layers=1)
    (path / "config.json").write_text(json.dumps(config))
    tensors = load_file(big / "model.safetensors")
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    gen = torch.Generator().manual_seed(11)
    prefix = f"model.layers.{main_layers}"
    for name in ("enorm", "hnorm", "shared_head.norm"):
        tensors[f"{prefix}.{name}.weight"] = 1.0 + 0.1 * torch.randn(hidden, generator=gen)
    tensors[f"{prefix}.eh_proj.weight"] = 0.1 * torch.randn(hidden, 2 * hidden, generator=gen)
    tensors[f"{prefix}.shared_head.head.weight"] = 0.1 * torch.randn(vocab, hidden, generator=gen)
    tensors[f"{prefix}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    if branch_scale is not None:
        for name in tensors:
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                tensors[name] = tensors[name] * branch_scale
        tensors[f"{prefix}.eh_proj.weight"] = torch.cat([torch.eye(hidden), torch.zeros(hidden, hidden)], dim=1)
        tensors[f"{prefix}.enorm.weight"] = torch.ones(hidden)
        tensors[f"{prefix}.shared_head.norm.weight"] = tensors["model.norm.weight"].clone()
        tensors[f"{prefix}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return big, path
