"""SentencePiece GGUF tokenizers (`tokenizer.ggml.model` "llama") against transformers' tokenizer
loaded from the same GGUF (`gguf_file=`): Gemma 3 270M's real 262k vocabulary, and a Llama 2 /
Mistral-style file (space prefix, merges ranked by score) written here with gguf's writer.
Decoding round-trips, and the incremental detokenizer joins byte-fallback pieces into whole
characters."""

from __future__ import annotations

import numpy as np
import pytest

from zili.tokenizer import PLAIN_COMPLETION_TEMPLATE, IncrementalDetokenizer, Tokenizer, sentencepiece_merges
from zili.weights.errors import UnsupportedModelError
from zili.weights.gguf import read_gguf_header
from zili.weights.resolve import resolve_model

TEXTS = [
    "The capital of France is Paris.",
    "La capital de Francia es",
    "中国的首都是北京。我们今天去长城。",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "emoji 😀👍🏽 🇫🇷 👨‍👩‍👧",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # naive\n\n\n",
    "   leading spaces and    inner   runs\t\ttabs",
    "lines\n\n\n\nand\r\nbreaks\n",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "rare: 𓀀 ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃",
    " ",
    "",
]


@pytest.fixture(scope="module")
def gemma_path():
    return resolve_model("gemma3-270m").path


@pytest.fixture(scope="module")
def gemma(gemma_path) -> Tokenizer:
    return Tokenizer.from_gguf_fields(read_gguf_header(gemma_path).metadata, source=str(gemma_path))


@pytest.fixture(scope="module")
def hf_gemma(gemma_path, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("gemma")
    (folder / gemma_path.name).symlink_to(gemma_path)
    return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=gemma_path.name)


@pytest.mark.parametrize("text", TEXTS)
def test_gemma_encoding_matches_transformers(gemma: Tokenizer, hf_gemma, text: str) -> None:
    assert gemma.encode(text) == hf_gemma.encode(text)
    assert gemma.encode(text, add_special_tokens=False) == hf_gemma.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_gemma_decoding_round_trips(gemma: Tokenizer, hf_gemma, text: str) -> None:
    ids = gemma.encode(text)
    assert gemma.decode(ids) == hf_gemma.decode(ids, skip_special_tokens=True)
    assert gemma.decode(ids, skip_special_tokens=False) == hf_gemma.decode(ids)
    if "<start_of_turn>" not in text:
        assert gemma.decode(gemma.encode(text, add_special_tokens=False)) == text


def test_gemma_special_tokens(gemma: Tokenizer, hf_gemma) -> None:
    assert (gemma.bos_token_id, gemma.eos_token_id, gemma.pad_token_id) == (2, 1, 0)
    assert (hf_gemma.bos_token_id, hf_gemma.eos_token_id, hf_gemma.pad_token_id) == (2, 1, 0)
    assert gemma.vocab_size == len(hf_gemma) == 262144
    assert gemma.encode("x")[0] == 2  # add_bos_token
    # A control token in the text is matched whole; byte tokens stand for raw bytes.
    assert gemma.encode("<end_of_turn>", add_special_tokens=False) == [gemma.token_to_id("<end_of_turn>")]


def test_gemma_uses_the_plain_completion_template(gemma: Tokenizer) -> None:
    """Gemma 3 270M ships no chat template and has no ChatML tokens: chat turns become plain text."""
    assert gemma.chat_template == PLAIN_COMPLETION_TEMPLATE
    text = gemma.apply_chat_template([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "La capital de Francia es"}])
    assert text == "<bos>Be brief.\n\nLa capital de Francia es"


def test_incremental_detokenizer_joins_byte_fallback_pieces(gemma: Tokenizer) -> None:
    """Characters outside the vocabulary arrive as one `<0xNN>` token per UTF-8 byte; no piece may
    end inside a character, and the pieces add up to the text."""
    text = "𓀀 and ꙮ then 中文 😀"
    ids = gemma.encode(text, add_special_tokens=False)
    byte_tokens = [i for i in ids if (gemma.id_to_token(i) or "").startswith("<0x")]
    assert len(byte_tokens) >= 4  # 𓀀 is four bytes, none of them in the vocabulary as a character
    detok = IncrementalDetokenizer(gemma)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text == gemma.decode(ids)


def test_merges_are_ranked_best_first() -> None:
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    merges = sentencepiece_merges(tokens, {"ab": -1.0, "bc": -2.0, "abc": -0.5, "a": 0.0, "b": 0.0, "c": 0.0})
    # "abc" (best score) splits as a+bc and ab+c, ordered by the left part's length, then ab, then bc.
    assert merges == [("ab", "c"), ("a", "bc"), ("a", "b"), ("b", "c")]


def test_unknown_tokenizer_model_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match=r"tokenizer model 'bert'.*'gpt2'.*'llama'"):
        Tokenizer.from_gguf_fields({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, source="m.gguf")


# ---- a Llama 2 / Mistral-style SentencePiece file ----


def _write_llama_spm(path, pieces: list[str], add_space_prefix: bool) -> None:
    """A tiny "llama" GGUF whose vocabulary is Llama 2's layout: <unk>, <s>, </s>, the 256 byte
    tokens, then pieces with descending scores (the merge order)."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = [2, 3, 3, *([6] * 256), *([1] * len(pieces))]
    scores = [0.0, 0.0, 0.0, *([0.0] * 256), *(-float(i) for i in range(len(pieces)))]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(add_space_prefix)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def llama_spm(gemma_path, tmp_path_factory):
    """Pieces borrowed from Gemma's vocabulary, ranked by their Gemma order: every single character
    (as a SentencePiece vocabulary has) and the first 40k longer pieces (Latin, CJK, Arabic,
    Devanagari words and parts of them), a realistic multilingual merge table."""
    metadata = read_gguf_header(gemma_path).metadata
    tokens, types = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]
    pieces = [t for i, (t, k) in enumerate(zip(tokens, types))
              if k == 1 and t.strip() and " " not in t and (len(t) == 1 or i < 40000)]
    folder = tmp_path_factory.mktemp("llama_spm")
    _write_llama_spm(folder / "spm.gguf", pieces, add_space_prefix=True)
    _write_llama_spm(folder / "spm-noprefix.gguf", pieces, add_space_prefix=False)
    return folder


@pytest.fixture(scope="module")
def llama_pair(llama_spm):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_gguf_fields(read_gguf_header(llama_spm / "spm.gguf").metadata)
    theirs = transformers.AutoTokenizer.from_pretrained(str(llama_spm), gguf_file="spm.gguf")
    return ours, theirs


@pytest.mark.parametrize("text", TEXTS)
def test_llama_style_encoding_matches_transformers(llama_pair, text: str) -> None:
    ours, theirs = llama_pair
    assert ours.encode(text) == theirs.encode(text)
    ids = ours.encode(text)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    # Round trip, except: Gemma's control tokens are plain text to this vocabulary, and a text that
    # already starts with a space gets no extra prefix (tokenizers' Metaspace, as in transformers)
    # while decoding still drops one leading space.
    if "<start_of_turn>" not in text and not text.startswith(" "):
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == text


def test_llama_style_space_prefix_follows_the_metadata(llama_pair, llama_spm) -> None:
    """add_space_prefix true: "Hello" is encoded as "▁Hello" (the first piece of text only);
    false: no prefix. (transformers' GGUF loader always prefixes, so false is checked alone.)"""
    ours, _ = llama_pair
    plain = Tokenizer.from_gguf_fields(read_gguf_header(llama_spm / "spm-noprefix.gguf").metadata)
    assert ours.id_to_token(ours.encode("Hello", add_special_tokens=False)[0]).startswith("\u2581")
    assert not plain.id_to_token(plain.encode("Hello", add_special_tokens=False)[0]).startswith("\u2581")
    for text in ("Hello world", " two  spaces", "中文"):
        assert plain.decode(plain.encode(text)) == text
    # A base model's plain completion prompt starts with BOS, written by the template.
    assert ours.chat_template == PLAIN_COMPLETION_TEMPLATE and ours.bos_token == "<s>"


def test_llama_style_streaming_keeps_word_spaces(llama_pair) -> None:
    """The decoder strips the prefix space of the first piece only: streamed pieces keep the
    spaces between words."""
    ours, _ = llama_pair
    text = "The cat sat on the mat, 中文 and 😀 too."
    ids = ours.encode(text)
    detok = IncrementalDetokenizer(ours)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == ours.decode(ids) == text
