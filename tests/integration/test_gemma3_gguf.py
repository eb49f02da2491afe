"""Gemma 3 270M (Q4_K_M GGUF, the `gemma3-270m` alias) in zili against transformers loading the same
file (`gguf_file=`, dequantized to fp32): logits and greedy tokens for English, Chinese and Spanish
prompts, a prompt longer than the 512-token sliding window prefilled in chunks, and the engine's
default (packed int4/int8) weights. Both models are loaded once for the module.

transformers reads the file with `gguf.GGUFReader`, which spends minutes on this 262k-token
vocabulary (a numpy view per string); its model is loaded from a copy of the file without the
tokenizer arrays (same tensors, byte for byte, same model metadata), which it does not need."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402

from tests.integration.test_smollm2_gguf import PagedRunner, hf_greedy  # noqa: E402
from zili.models.loader import LoadedModel, load_model, open_checkpoint  # noqa: E402
from zili.models.quantize import quantize_model  # noqa: E402
from zili.weights.gguf import read_gguf_header  # noqa: E402

pytestmark = pytest.mark.slow

NEW_TOKENS = 12
PROMPTS = [
    "The capital of France is",
    "中国的首都是",
    "La capital de Francia es",
]
# Long enough that the last tokens' local layers see only part of it (window 512).
LONG_PROMPT = " ".join(["Paris is the capital of France and Madrid is the capital of Spain."] * 36
                       + ["北京是中国的首都。"] * 20 + ["Therefore the capital of France is"])


@pytest.fixture(scope="module")
def zili_model() -> LoadedModel:
    return load_model("gemma3-270m", dtype="float32")


def without_vocabulary(src: Path, dst: Path) -> None:
    """Copy a GGUF file minus its tokenizer arrays (tokens, scores, types, merges), recording the
    vocabulary size as `<arch>.vocab_size`; tensors are copied as stored."""
    header = read_gguf_header(src)
    arch = header.metadata["general.architecture"]
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, value in header.metadata.items():
        if key in ("general.architecture", "general.alignment") or (key.startswith("tokenizer.ggml.")
                                                                      and isinstance(value, list)):
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    writer.add_uint32(f"{arch}.vocab_size", len(header.metadata["tokenizer.ggml.tokens"]))
    data = np.memmap(src, dtype=np.uint8, mode="r")
    for info in header.tensors.values():
        rows = np.array(data[info.offset:info.offset + info.num_rows * info.row_bytes]).reshape(info.num_rows, -1)
        qtype = gguf.GGMLQuantizationType(info.qtype)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(info.name, rows.view(np.float32).reshape(info.shape))
        else:
            writer.add_tensor(info.name, rows, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def hf_model(zili_model: LoadedModel, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma3")
    without_vocabulary(zili_model.source.path, folder / "model.gguf")
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="model.gguf",
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(zili_model: LoadedModel) -> list[list[int]]:
    return [zili_model.tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_results(hf_model, prompt_ids):
    return [hf_greedy(hf_model, ids, NEW_TOKENS) for ids in prompt_ids]


def test_config_is_gemma3_270m(zili_model: LoadedModel) -> None:
    cfg = zili_model.config
    assert (cfg.architecture, cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.vocab_size) == \
        ("gemma3", 640, 18, 256, 262144)
    assert cfg.sliding_window == 512 and cfg.tie_word_embeddings
    assert [cfg.layer_window(i) for i in range(6)] == [512] * 5 + [None]
    assert (cfg.rope_theta, cfg.rope_local_base_freq, cfg.query_pre_attn_scalar) == (1e6, 1e4, 256.0)


def test_prompt_logits_match_transformers(zili_model, prompt_ids, hf_results) -> None:
    for ids, (_, hf_prompt_logits, _) in zip(prompt_ids, hf_results):
        runner = PagedRunner(zili_model, len(ids) + 1, 1)
        logits = runner.step([ids], every_token=True)
        assert logits.shape == hf_prompt_logits.shape == (len(ids), 262144)
        assert (logits - hf_prompt_logits).abs().max().item() <= 2e-3


def test_batched_greedy_tokens_match_transformers(zili_model, prompt_ids, hf_results) -> None:
    """English, Chinese and Spanish prompts prefilled in one flat batch and decoded together."""
    runner = PagedRunner(zili_model, max(map(len, prompt_ids)) + NEW_TOKENS, len(prompt_ids))
    logits = runner.step(prompt_ids)
    generated: list[list[int]] = [[] for _ in prompt_ids]
    for step in range(NEW_TOKENS):
        for seq, row in enumerate(logits):
            assert (row - hf_results[seq][2][step]).abs().max().item() <= 2e-3, f"sequence {seq}, step {step}"
            generated[seq].append(int(row.argmax()))
        if step + 1 < NEW_TOKENS:
            logits = runner.step([[g[-1]] for g in generated])
    assert generated == [r[0] for r in hf_results]
    texts = [zili_model.tokenizer.decode(g) for g in generated]
    assert "France" in texts[0] and "中国" in texts[1] and "ciudades" in texts[2], texts


def test_long_prompt_beyond_the_window_chunked(zili_model, hf_model) -> None:
    """A prompt longer than the sliding window, prefilled in 200-token chunks (so later chunks'
    local layers drop cached positions), then decoded: the logits at each chunk's end and at every
    decode step match transformers' (whose sliding layers mask by the same window)."""
    ids = zili_model.tokenizer.encode(LONG_PROMPT)
    assert len(ids) > 600
    ends = list(range(199, len(ids) - 1, 200)) + [len(ids) - 1]
    with torch.no_grad():
        out = hf_model(torch.tensor([ids]), use_cache=True, logits_to_keep=torch.tensor(ends))
    hf_chunk_logits, past = out.logits[0].float(), out.past_key_values
    runner = PagedRunner(zili_model, len(ids) + 3, 1)
    for i, start in enumerate(range(0, len(ids), 200)):
        logits = runner.step([ids[start:start + 200]])
        assert (logits[0] - hf_chunk_logits[i]).abs().max().item() <= 2e-3, f"chunk {i}"
    tokens = [int(logits[0].argmax())]
    assert tokens[0] == int(hf_chunk_logits[-1].argmax())
    for step in range(3):
        with torch.no_grad():
            out = hf_model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = runner.step([[tokens[-1]]])
        assert (logits[0] - out.logits[0, -1].float()).abs().max().item() <= 2e-3, f"step {step}"
        tokens.append(int(logits[0].argmax()))


def test_default_weights_stay_packed_and_agree(zili_model, prompt_ids, hf_results) -> None:
    """`--quantization auto`: Q4_K projections keep their 4-bit codes (packed int4, group 32),
    Q5_0/Q6_K/Q8_0 ones become int8 per row, the tied 262k head int8. Greedy tokens stay those of
    the fp32 model on these prompts' first steps."""
    loaded = LoadedModel(copy.deepcopy(zili_model.model).to(torch.bfloat16), zili_model.config,
                         zili_model.tokenizer, zili_model.source, torch.bfloat16)
    counts = quantize_model(loaded.model, "auto", open_checkpoint(loaded.source))
    # attn_output is Q4_K in every layer, ffn_down in half of them; the rest is int8.
    assert counts["int4"] == 18 + 9 and counts["int8"] == 18 * 3 - 9 + 1 and not counts["dense"]
    runner = PagedRunner(loaded, max(map(len, prompt_ids)) + 1, len(prompt_ids))
    logits = runner.step(prompt_ids)
    assert [int(row.argmax()) for row in logits] == [r[0][0] for r in hf_results]
