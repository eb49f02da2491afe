"""Tokenizer: HF `tokenizers` for text <-> ids, jinja2 for chat templates, and an incremental
detokenizer for streaming.

A checkpoint builds its Tokenizer either from `tokenizer.json` (HF directories) or from the
`tokenizer.ggml.*` metadata of a GGUF file, which holds the vocabulary, merges and token types
but no pre-tokenizer: that is named by `tokenizer.ggml.pre` and rebuilt here from the split rules
each name stands for (the same rules llama.cpp applies).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from zili.weights.errors import UnsupportedModelError

# Used when a checkpoint carries no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# For base models without a chat template and without ChatML's tokens in their vocabulary (Gemma 3
# 270M): the conversation's texts, one after another, as a plain completion prompt after BOS.
PLAIN_COMPLETION_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% for message in messages %}{{ message['content'] }}{% if not loop.last %}{{ '\n\n' }}{% endif %}"
    "{% endfor %}"
)

# llama.cpp token types (tokenizer.ggml.token_type).
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4
# SentencePiece's word-boundary mark, which stands for a space inside the vocabulary.
_SPM_SPACE = "\u2581"
# Architectures whose SentencePiece GGUF vocabularies follow Gemma's conventions: no space prefix,
# spaces turned into the boundary mark by a normalizer, runs of spaces stored as real spaces, and
# merges ranked by the tokens' order in the file (their scores do not follow the merge order).
_GEMMA_SPM_ARCHITECTURES = ("gemma", "gemma2", "gemma3")

# Split rules of the byte-level BPE pre-tokenizers, by `tokenizer.ggml.pre` name.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_KINDS = {
    # GPT-2's rules, applied by the ByteLevel pre-tokenizer itself.
    "default": "gpt2", "gpt2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2",
    # GPT-2's rules after cutting every digit apart (StarCoder-trained vocabularies, SmolLM).
    "smollm": "digits+gpt2", "starcoder": "digits+gpt2", "refact": "digits+gpt2", "codeshell": "digits+gpt2",
    "command-r": "digits+gpt2", "exaone": "digits+gpt2", "minerva-7b": "digits+gpt2",
    "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3", "smaug-bpe": "llama3", "dbrx": "llama3",
    "falcon3": "llama3", "pixtral": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2", "megrez": "qwen2",
}


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte, the alphabet of byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelling[b] = chr(b)
        else:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def _byte_level_pre_tokenizer(pre: str, source: str) -> pre_tokenizers.PreTokenizer:
    kind = _PRE_TOKENIZER_KINDS.get(pre)
    if kind is None:
        raise UnsupportedModelError(
            f"{source}: GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; supported: "
            f"{', '.join(sorted(_PRE_TOKENIZER_KINDS))}."
        )
    byte_level_gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "gpt2":
        return byte_level_gpt2
    if kind == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level_gpt2])
    split = _LLAMA3_SPLIT if kind == "llama3" else _QWEN2_SPLIT
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _bos_eos_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> processors.TemplateProcessing:
    """Post-processor that wraps each sequence in BOS and/or EOS."""
    head = [bos[0]] if bos else []
    tail = [eos[0]] if eos else []
    single = [*head, "$A", *tail]
    pair = [*single, *head, "$B:1", *tail]
    return processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=[t for t in (bos, eos) if t]
    )


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Text <-> token ids, plus the chat template. Wraps a `tokenizers.Tokenizer`."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        extra_eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.chat_template = chat_template
        self.bos_token_id = self.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = self.token_to_id(eos_token) if eos_token else None
        self.pad_token_id = self.token_to_id(pad_token) if pad_token else None
        eos_ids = [self.eos_token_id, *extra_eos_token_ids]
        self.eos_token_ids: list[int] = list(dict.fromkeys(int(i) for i in eos_ids if i is not None))

    # ---- construction ----

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        tokenizer_config: Mapping[str, Any] | None = None,
        *,
        extra_eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
    ) -> "Tokenizer":
        """From an HF `tokenizer.json` and the dict of its `tokenizer_config.json`."""
        cfg = dict(tokenizer_config or {})
        backend = BackendTokenizer.from_file(str(path))
        tok = cls(
            backend,
            bos_token=_token_content(cfg.get("bos_token")),
            eos_token=_token_content(cfg.get("eos_token")),
            pad_token=_token_content(cfg.get("pad_token")),
            unk_token=_token_content(cfg.get("unk_token")),
            extra_eos_token_ids=extra_eos_token_ids,
            chat_template=chat_template or cfg.get("chat_template"),
        )
        # Some tokenizer.json files leave adding BOS to the Python class (`add_bos_token` in the config).
        if cfg.get("add_bos_token") and tok.bos_token is not None and tok.bos_token_id is not None:
            probe = backend.encode("a").ids
            if not probe or probe[0] != tok.bos_token_id:
                backend.post_processor = _bos_eos_processor((tok.bos_token, tok.bos_token_id), None)
        return tok

    @classmethod
    def placeholder(cls, vocab_size: int, eos_token_ids: Sequence[int] = ()) -> "Tokenizer":
        """A stand-in for a checkpoint without tokenizer files (random-weight speed runs): token id i
        is the word "<i>", whitespace separates words, and text decodes to those words."""
        vocab = {f"<{i}>": i for i in range(vocab_size)}
        backend = BackendTokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        eos = [i for i in eos_token_ids if 0 <= int(i) < vocab_size]
        return cls(backend, eos_token=f"<{eos[0]}>" if eos else None, extra_eos_token_ids=eos)

    @classmethod
    def from_gguf_fields(cls, metadata: Mapping[str, Any], source: str = "GGUF") -> "Tokenizer":
        """From a GGUF file's metadata (the `tokenizer.ggml.*` keys and `tokenizer.chat_template`).

        `tokenizer.ggml.model` "gpt2" is byte-level BPE (Llama 3, Qwen, SmolLM); "llama" is a
        SentencePiece BPE vocabulary (Gemma, Llama 2, Mistral), see `_sentencepiece_from_gguf`.
        Anything else raises UnsupportedModelError naming the model and what is supported.
        """
        model = metadata.get("tokenizer.ggml.model")
        if model == "llama":
            return _sentencepiece_from_gguf(cls, metadata, source)
        if model != "gpt2":
            raise UnsupportedModelError(
                f"{source}: tokenizer model {model!r} (tokenizer.ggml.model) is not supported; supported: "
                "'gpt2' (byte-level BPE: Llama 3, Qwen2/3, SmolLM) and 'llama' (SentencePiece BPE: Gemma, "
                "Llama 2, Mistral)."
            )
        tokens: list[str] = metadata["tokenizer.ggml.tokens"]
        types: list[int] = metadata.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
        spelling = _byte_to_unicode()
        alphabet = set(spelling.values())
        vocab: dict[str, int] = {}
        for i, (token, kind) in enumerate(zip(tokens, types)):
            if kind == _TOKEN_NORMAL and not set(token) <= alphabet:
                token = "".join(spelling[b] for b in token.encode("utf-8"))
            vocab.setdefault(token, i)
        merges = [tuple(m.split(" ")) for m in metadata.get("tokenizer.ggml.merges", [])]
        backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        backend.pre_tokenizer = _byte_level_pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"), source)
        backend.decoder = decoders.ByteLevel()

        def token_of(key: str) -> str | None:
            i = metadata.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        bos, eos, pad, unk = (token_of(k) for k in ("bos_token_id", "eos_token_id", "padding_token_id",
                                                    "unknown_token_id"))
        # Control tokens are matched whole and are special (skipped when decoding); user-defined
        # ones are matched whole but kept. A control token spelled outside the byte alphabet is a
        # converter mislabel, left alone so the vocabulary keeps the size the model expects.
        special = [t for t, k in zip(tokens, types) if k == _TOKEN_CONTROL and set(t) <= alphabet]
        special += [t for t in (bos, eos) if t is not None and t not in special]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        user = [t for t, k in zip(tokens, types) if k == _TOKEN_USER_DEFINED]
        if user:
            backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
        if add_bos or add_eos:
            backend.post_processor = _bos_eos_processor(
                (bos, vocab[bos]) if add_bos and bos is not None else None,
                (eos, vocab[eos]) if add_eos and eos is not None else None,
            )
        extra_eos = [metadata[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                     if k in metadata]
        return cls(backend, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
                   extra_eos_token_ids=extra_eos, chat_template=metadata.get("tokenizer.chat_template"))

    # ---- text <-> ids ----

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        ids = {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        ids.update(i for i in (self.bos_token_id, self.eos_token_id, self.pad_token_id) if i is not None)
        return sorted(ids)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # ---- chat ----

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation the way transformers' `apply_chat_template(tokenize=False)` does."""
        template = _compile_template(self.chat_template or CHATML_TEMPLATE)
        variables = {
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            "unk_token": self.unk_token, "pad_token": self.pad_token,
            **_plain(kwargs),
        }
        return template.render(
            messages=_plain(list(messages)),
            tools=_plain(list(tools)) if tools is not None else None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )


# --------------------------------------------------------------------------------------------
# SentencePiece vocabularies in GGUF files
# --------------------------------------------------------------------------------------------


def sentencepiece_merges(tokens: Sequence[str], ranks: Mapping[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary (a GGUF stores the pieces, not the merges).

    Every split of a piece into two pieces that are both in the vocabulary is a merge; merges are
    ranked by the piece's rank, best (highest) first, ties broken by the longer left then right part,
    then by the parts' ids. This is how SentencePiece's BPE picks which pair to join (the highest-
    scoring resulting piece), and the order HF's converters (`generate_merges`) produce, so that the
    same vocabulary tokenizes identically here and in transformers.
    """
    ids = {token: i for i, token in enumerate(tokens)}  # a repeated piece keeps its last id
    found: list[tuple[float, int, int, str, str]] = []
    for piece in ranks:
        local = []
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                local.append((ids[left], ids[right], left, right))
        local.sort()
        rank = ranks[piece]
        found.extend((rank, len(left), len(right), left, right) for _, _, left, right in local)
    # Stable sort on the key only, best first: equal keys keep the order they were found in.
    found.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)
    return [(left, right) for _, _, _, left, right in found]


def _sentencepiece_from_gguf(cls: type[Tokenizer], metadata: Mapping[str, Any], source: str) -> Tokenizer:
    """A SentencePiece BPE vocabulary (`tokenizer.ggml.model` "llama") as an HF `tokenizers` BPE.

    The GGUF keeps the pieces with their scores and token types (1 normal, 2 unknown, 3 control,
    4 user-defined, 6 byte). Rebuilt here: BPE merges derived from the pieces (ranked by score, or
    by file order for Gemma), byte fallback to the `<0xNN>` pieces for characters outside the
    vocabulary, the space prefix (`tokenizer.ggml.add_space_prefix`, default true as in llama.cpp)
    as a Metaspace pre-tokenizer on the first piece of text only, control tokens as special tokens
    matched whole, user-defined ones as plain added tokens, and BOS/EOS added per
    `tokenizer.ggml.add_bos_token` (default true) / `add_eos_token`. The components are those of
    transformers' GGUF loader (`gguf_file=`), which the tests hold this to.
    """
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
    gemma = metadata.get("general.architecture") in _GEMMA_SPM_ARCHITECTURES
    if gemma:
        # Gemma stores its pieces of 2+ spaces as spaces; its normalizer looks them up as boundary marks.
        pieces = [_SPM_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        ranks: dict[str, float] = {t: -float(i) for i, t in enumerate(pieces)}
    else:
        pieces = tokens
        scores = metadata.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
        ranks = dict(zip(pieces, (float(s) for s in scores)))
    vocab = {t: i for i, t in enumerate(pieces)}

    def token_of(key: str) -> str | None:
        i = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos, pad, unk = (token_of(k) for k in ("bos_token_id", "eos_token_id", "padding_token_id",
                                                "unknown_token_id"))
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=sentencepiece_merges(pieces, ranks), fuse_unk=True,
                                          byte_fallback=True, unk_token=unk if gemma else None))
    decode_steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        backend.normalizer = normalizers.Replace(" ", _SPM_SPACE)
    else:
        add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=_SPM_SPACE, prepend_scheme="first" if add_prefix else "never", split=False)
        if add_prefix:
            decode_steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(decode_steps)

    special = [t for t, k in zip(tokens, types) if k == _TOKEN_CONTROL]
    special += [t for t in (bos, eos, unk, pad) if t is not None and t not in special]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(special)])
    known = backend.get_vocab()
    user = [t for t, k in zip(tokens, types) if k == _TOKEN_USER_DEFINED and t in known]
    if user:
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", True)) and bos is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        backend.post_processor = _bos_eos_processor(
            (bos, known[bos]) if add_bos and bos is not None else None,  # both were added as special tokens
            (eos, known[eos]) if add_eos and eos is not None else None)
    extra_eos = [metadata[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in metadata]
    template = metadata.get("tokenizer.chat_template")
    if template is None and "<|im_start|>" not in known:
        template = PLAIN_COMPLETION_TEMPLATE
    return cls(backend, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
               extra_eos_token_ids=extra_eos, chat_template=template)


# --------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant spans for training): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # Chat templates come with downloaded checkpoints: untrusted code, hence the sandbox.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    return _environment().from_string(source)


def _plain(value: Any) -> Any:
    """Template inputs rebuilt from JSON-like types (pydantic models and dataclasses become dicts),
    so the sandboxed template sees data, not objects with methods."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump(exclude_none=True))
    return str(value)


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text pieces.

    Byte-level tokens can end inside a UTF-8 character, so a piece is released only when the
    decoded tail is complete (does not end in U+FFFD). Each step decodes only the tokens since the
    last released boundary (`prefix_offset`: the start of the context window that makes decoding
    stable; `read_offset`: where the released text ends), so `add` costs O(window), not O(total).
    The concatenation of all pieces, `flush()` included, equals `tokenizer.decode(token_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def _advance(self, force: bool) -> str:
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset)
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not force):
            if force:
                self.prefix_offset = self.read_offset = len(self.token_ids)
            return ""
        piece = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += piece
        return piece

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly "")."""
        self.token_ids.append(int(token_id))
        return self._advance(force=False)

    def flush(self) -> str:
        """Release whatever is held back (an unfinished character at the very end, decoded as U+FFFD)."""
        if self.read_offset == len(self.token_ids):
            return ""
        return self._advance(force=True)
