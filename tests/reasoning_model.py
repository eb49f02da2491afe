"""A random-weight model that speaks DeepSeek-R1-Distill-Qwen's tokenizer and chat template.

The tokenizer, special tokens and chat template come from the real DeepSeek-R1-Distill-Qwen-7B
GGUF's metadata (tests/data/r1-distill-qwen-header.gguf.xz: the GGUF header alone, no tensors,
xz-compressed to 1.3 MB); the weights are a tiny
Qwen2 with that vocabulary, loaded with `load_format="dummy"` (seeded random weights). A real
thinking model is not on these machines, so what depends on the model actually thinking is driven
here by the engine's thinking budget (it writes the closing tag itself) or by token streams.
"""

from __future__ import annotations

import functools
import json
import lzma
import os
import tempfile
from pathlib import Path

R1_HEADER_XZ = Path(__file__).resolve().parent / "data" / "r1-distill-qwen-header.gguf.xz"


def r1_header_path() -> Path:
    """The header GGUF, decompressed once into the temp directory (shared by test processes)."""
    path = Path(tempfile.gettempdir()) / f"zili-tests-r1-header-{R1_HEADER_XZ.stat().st_size}.gguf"
    if not path.exists():
        partial = path.with_suffix(f".{os.getpid()}.part")
        partial.write_bytes(lzma.decompress(R1_HEADER_XZ.read_bytes()))
        partial.replace(path)
    return path


@functools.lru_cache(maxsize=1)
def r1_tokenizer():
    """zili's Tokenizer built from the R1 GGUF metadata (~5-10 s: a 152k vocabulary)."""
    from zili.tokenizer import Tokenizer
    from zili.weights.gguf import read_gguf_header

    path = r1_header_path()
    return Tokenizer.from_gguf_fields(read_gguf_header(path).metadata, source=str(path))


def write_r1_dummy(path: Path) -> Path:
    """config.json (a 2-layer Qwen2 with the R1 vocabulary) + tokenizer.json + tokenizer_config.json."""
    path.mkdir(parents=True, exist_ok=True)
    tok = r1_tokenizer()
    tok.backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
        "chat_template": tok.chat_template, "add_bos_token": True}))
    vocab = tok.vocab_size
    (path / "config.json").write_text(json.dumps(dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
        max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)))
    return path
