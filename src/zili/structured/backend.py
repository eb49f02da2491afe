"""GrammarBackend: StructuredOutput -> compiled grammar -> one matcher per sequence -> allowed-token
bitmasks applied to a batch of logits.

Two grammar libraries sit behind this seam (vLLM's `structured_outputs_config.backend`; zili's
`EngineConfig.structured_outputs_backend`):
- "xgrammar" (xgrammar 0.2): every kind of constraint;
- "llguidance" (zili.structured.llguidance_backend): JSON schemas, JSON objects, regexes, choices and
  EBNF grammars; structural tags (tool calls) still compile with xgrammar, whose tag format they use;
- "auto" (the default): xgrammar, and llguidance for a JSON schema xgrammar refuses. On the corpus of
  real schemas in benchmarks/schema_coverage.py, each library compiles schemas the other refuses, and
  xgrammar's path is the one the approximation table (zili.structured.approximations), jump-forward's
  spellings and the tool-call tags were checked against: first xgrammar, then the union
  (benchmarks/notes/structured.md has the numbers).
Both libraries' matchers meet `StructuredMatcher` and both bitmasks are xgrammar's layout (int32
words, bit i of word j allows token 32j + i), so one batch may mix them.

The tokenizer description both need (the bytes each token id stands for) is built from our own
Tokenizer, so nothing is fetched from the hub.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from typing import Sequence as Seq

import torch

if TYPE_CHECKING:
    import xgrammar as xgr

from zili.structured import spec
from zili.structured.llguidance_backend import LLGuidanceCompiler
from zili.structured.spec import StructuredOutput

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "xgrammar", "llguidance")

JSON_SEPARATORS = (", ", ": ")  # fixed whitespace: small models otherwise drift into endless blank space
CACHE_SIZE = 256  # compiled grammars kept, least recently used dropped first


def _xgrammar():
    """The xgrammar module, imported on first use: it brings transformers and tvm_ffi with it (~50 MiB
    resident), which a server that never gets a structured request does not hold."""
    import xgrammar

    return xgrammar


def token_bytes(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """The bytes each token id decodes to; b"" for special tokens (never allowed by a grammar) and
    for ids past the tokenizer's vocabulary (lm_head padding)."""
    backend = tokenizer.backend
    vocab: dict[str, int] = backend.get_vocab(with_added_tokens=True)
    added = backend.get_added_tokens_decoder()
    decode = _vocab_decoder(vocab)
    out = [b""] * vocab_size
    for token, i in vocab.items():
        if i >= vocab_size:
            continue
        if i in added:
            out[i] = b"" if added[i].special else added[i].content.encode("utf-8")
        else:
            out[i] = decode(token)
    return out


def _vocab_decoder(vocab: dict[str, int]):
    from zili.tokenizer import _byte_to_unicode

    if "<0x0A>" in vocab:  # SentencePiece with byte fallback (Llama 2, Mistral)
        def byte_fallback(token: str) -> bytes:
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                return bytes([int(token[3:5], 16)])
            return token.replace("\u2581", " ").encode("utf-8")
        return byte_fallback
    spelled = {c: b for b, c in _byte_to_unicode().items()}
    sample = list(vocab)[:2000]
    if sum(all(c in spelled for c in t) for t in sample) >= 0.95 * len(sample):  # GPT-2 byte-level BPE
        def byte_level(token: str) -> bytes:
            try:
                return bytes(spelled[c] for c in token)
            except KeyError:
                return token.encode("utf-8")
        return byte_level
    return lambda token: token.replace("\u2581", " ").encode("utf-8")


class StructuredMatcher(Protocol):
    """One sequence's grammar state, as the engine uses it (xgrammar's GrammarMatcher has these; so does
    zili.structured.llguidance_backend.LLGuidanceMatcher)."""

    def accept_token(self, token_id: int) -> bool:
        """Advance by one token; False if the grammar does not allow it (state unchanged)."""
        ...

    def is_terminated(self) -> bool:
        """True once an end token was accepted."""
        ...

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> object:
        """Write row `index` of the int32 allowed-token bitmask [batch, ceil(vocab / 32)]."""
        ...

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (speculative drafts, jump-forward probes)."""
        ...

    def find_jump_forward_string(self) -> str:
        """The longest text every continuation starts with (whole UTF-8 characters); state unchanged."""
        ...


class CompiledGrammar(Protocol):
    """A constraint compiled for one vocabulary by one library (`backend`); a matcher per sequence."""

    @property
    def backend(self) -> str:
        ...

    def new_matcher(self) -> StructuredMatcher:
        ...


@dataclass(frozen=True)
class XGrammarGrammar:
    """xgrammar's compiled grammar behind CompiledGrammar."""

    compiled: xgr.CompiledGrammar
    backend: str = "xgrammar"

    def new_matcher(self) -> StructuredMatcher:
        return _xgrammar().GrammarMatcher(self.compiled)


class GrammarMask:
    """The allowed-token bitmask rows of one step's constrained sequences, applied in one op."""

    def __init__(self, bitmask: torch.Tensor, rows: list[int], vocab_size: int) -> None:
        self.bitmask = bitmask  # [num sampled sequences, ceil(vocab / 32)] int32, CPU
        self.rows = rows
        self.vocab_size = vocab_size

    def apply(self, logits: torch.Tensor) -> None:
        """Set every token a row's grammar forbids to -inf, in place. logits: [N, V]."""
        bitmask = self.bitmask if self.bitmask.device == logits.device else \
            self.bitmask.to(logits.device, non_blocking=True)
        _xgrammar().apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, indices=self.rows)


class GrammarBackend:
    """The grammar seam: compiles StructuredOutputs with the chosen library (`backend`, one of BACKENDS),
    caches them, and builds each step's bitmask. `token_bytes` (per token id) is also read by
    jump-forward decoding."""

    def __init__(self, tokenizer: Any, vocab_size: int, max_threads: int = 2, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"structured_outputs_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend = backend
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        stop = list(tokenizer.eos_token_ids) or None
        self.token_bytes = token_bytes(tokenizer, vocab_size)  # per token id; also read by jump-forward decoding
        xgr = _xgrammar()
        self.info = xgr.TokenizerInfo(self.token_bytes, xgr.VocabType.RAW,
                                      vocab_size=vocab_size, stop_token_ids=stop)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=False)
        self._llguidance: LLGuidanceCompiler | None = None  # built on first use
        self._cache: OrderedDict[tuple[str, str, bool | None], CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()  # compile() may be called from a thread other than the engine's
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    @property
    def llguidance(self) -> LLGuidanceCompiler:
        with self._lock:
            if self._llguidance is None:
                self._llguidance = LLGuidanceCompiler(self.tokenizer, self.token_bytes)
            return self._llguidance

    # ---- compiling ---------------------------------------------------------------------------
    def compile(self, structured: StructuredOutput) -> CompiledGrammar:
        """Compile (or fetch from the cache). ValueError names what the compiler could not accept and,
        for a JSON schema, where in the schema."""
        key = structured.cache_key
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        if self.backend == "llguidance" and structured.kind != "structural_tag":
            try:
                compiled: CompiledGrammar = self.llguidance.compile(structured)
            except ValueError as e:
                raise ValueError(f"the {_NAMES[structured.kind]} cannot be used (llguidance): {e}") from None
        else:
            try:
                compiled = XGrammarGrammar(self._compile(structured))
            except (RuntimeError, ValueError, TypeError) as e:
                where = locate_schema_failure(structured.schema(), structured.strict is not False) \
                    if structured.kind == "json" else None
                at = f" (at {where or '/'})" if where is not None else ""
                refused = f"the {_NAMES[structured.kind]} cannot be used{at}: {_first_line(e)}"
                if self.backend != "auto" or structured.kind != "json":
                    raise ValueError(refused) from None
                try:  # auto: a schema xgrammar refuses may still compile with llguidance
                    compiled = self.llguidance.compile(structured)
                except ValueError as second:
                    raise ValueError(f"{refused}; llguidance: {second}") from None
                logger.info("structured output: xgrammar refused a JSON schema (%s); compiled with llguidance",
                            _first_line(e))
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, s: StructuredOutput) -> xgr.CompiledGrammar:
        xgr = _xgrammar()
        if s.kind == "json":
            try:
                grammar = json_schema_grammar(s.spec, strict=s.strict is not False)
            except (RuntimeError, ValueError, TypeError):
                if s.strict is not None:
                    raise
                # Not asked for strict mode: a schema that needs more than it lists (minItems without
                # items, minProperties beyond its properties) compiles as JSON Schema reads it.
                grammar = json_schema_grammar(s.spec, strict=False)
            return self.compiler.compile_grammar(json_safe(grammar))
        if s.kind == "json_object":
            grammar = xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False,
                                                   separators=JSON_SEPARATORS, strict_mode=False)
            return self.compiler.compile_grammar(json_safe(grammar))
        if s.kind == "structural_tag":
            return self.compiler.compile_grammar(json_safe(xgr.Grammar.from_structural_tag(s.spec)))
        if s.kind == "regex":
            return self.compiler.compile_regex(s.spec)
        if s.kind == "choice":
            return self.compiler.compile_grammar(choice_ebnf(s.choices()))
        if s.kind == "grammar":
            return self.compiler.compile_grammar(s.spec)
        raise ValueError(f"unknown structured-output kind {s.kind!r}")

    # ---- decoding ----------------------------------------------------------------------------
    def new_matcher(self, compiled: CompiledGrammar) -> StructuredMatcher:
        return compiled.new_matcher()

    def build_mask(self, seqs: Seq[Any]) -> GrammarMask | None:
        """The bitmask for one step: rows of the sequences that carry a grammar (`seq.grammar`)."""
        rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if not rows:
            return None
        if self._bitmask.shape[0] < len(seqs):
            self._bitmask = _xgrammar().allocate_token_bitmask(max(len(seqs), 2 * self._bitmask.shape[0]), self.vocab_size)
        bitmask = self._bitmask[:len(seqs)]
        for i in rows:
            seqs[i].grammar.fill_next_token_bitmask(bitmask, i)
        return GrammarMask(bitmask, rows, self.vocab_size)


_NAMES = {"json": "JSON schema", "json_object": "JSON object constraint", "regex": "regex", "choice": "choice list",
          "grammar": "grammar", "structural_tag": "structural tag"}


def json_schema_grammar(schema: str, strict: bool = True) -> xgr.Grammar:
    """The grammar of a JSON schema (its JSON text), zili's whitespace; xgrammar's strict mode forbids
    properties and items the schema does not list. Raises what xgrammar raises."""
    return _xgrammar().Grammar.from_json_schema(schema, any_whitespace=False, separators=JSON_SEPARATORS,
                                                strict_mode=strict)


def locate_schema_failure(schema: Any, strict: bool = True) -> str | None:
    """The JSON pointer of the deepest sub-schema xgrammar refuses to convert on its own ("" for the
    root), None when the root itself converts (the failure was elsewhere, e.g. in compiling); the walk
    is zili.structured.spec.locate_schema_failure. Only the conversion runs (no vocabulary), which
    takes milliseconds."""

    def fails(node: dict[str, Any]) -> bool:
        try:
            json_schema_grammar(json.dumps(node), strict)
        except (RuntimeError, ValueError, TypeError):
            return True
        return False

    return spec.locate_schema_failure(schema, fails)


def _first_line(e: BaseException) -> str:
    # xgrammar prefixes its messages with "[time] /path/file.cc:line: " and its failed checks with
    # "Check failed: (cond) is false: "
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    head, sep, rest = text.partition(": ")
    text = rest if sep and ".cc:" in head else text
    return re.sub(r"^Check failed: \(.*?\) is false: ", "", text)


# xgrammar (0.2.8) spells the characters of a length-bounded JSON string as [^"\\\r\n], which lets
# raw control characters (tab, backspace...) into the string: invalid JSON. Tighten the class.
_LOOSE_JSON_CHAR = r'[^\"\\\r\n]'
_STRICT_JSON_CHAR = r'[^\"\\\0-\x1f]'


# xgrammar's JSON numbers (its basic_integer / basic_number rules) take any number of digits, and a
# small model under greedy decoding can keep appending zeros to "2.2" until max_tokens: an unfinished,
# unparseable form (seen on the extraction workload, benchmarks/notes/extract-accuracy.md).
# llama.cpp's JSON-schema grammar bounds each part of a number to 16 digits (integral-part
# [1-9] [0-9]{0,15}, decimal-part [0-9]{1,16}; common/json-schema-to-grammar.cpp); so do we.
# Numbers with a minimum / maximum get xgrammar's own range rules, already bounded.
MAX_NUMBER_PART_DIGITS = 16
_BOUNDED_NUMBER_PARTS = {
    "[1-9] [0-9]*": f"[1-9] [0-9]{{0, {MAX_NUMBER_PART_DIGITS - 1}}}",  # integral part
    "basic_number_digits{1, -1}": f"basic_number_digits{{1, {MAX_NUMBER_PART_DIGITS}}}",  # fraction, exponent
}
# Scanned left to right: a number part, else a quoted EBNF literal (an enum value, a key) or a character
# class (which may hold a quote), both left alone whatever they spell.
_NUMBER_PART_OR_LITERAL = re.compile("|".join(re.escape(k) for k in _BOUNDED_NUMBER_PARTS)
                                     + r'|"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]')


def json_safe(grammar: xgr.Grammar) -> xgr.Grammar | str:
    """The grammar, with JSON string characters that exclude U+0000-U+001F and JSON numbers of at most
    MAX_NUMBER_PART_DIGITS digits in each part (integral, fraction, exponent), as llama.cpp's grammar
    has them (EBNF text if changed)."""
    text = str(grammar)
    fixed = _NUMBER_PART_OR_LITERAL.sub(lambda m: _BOUNDED_NUMBER_PARTS.get(m.group(0), m.group(0)),
                                        text.replace(_LOOSE_JSON_CHAR, _STRICT_JSON_CHAR))
    return grammar if fixed == text else fixed


def choice_ebnf(options: list[str]) -> str:
    """root ::= "a" | "b" ... with every option spelled as an EBNF string literal."""
    return "root ::= " + " | ".join(_ebnf_literal(o) for o in options)


def _ebnf_literal(text: str) -> str:
    # JSON string escapes (\", \\, \n) are also valid in xgrammar's EBNF literals, but a character
    # past U+FFFF must stay literal: JSON spells it as a surrogate pair (\ud83d\ude00), which xgrammar
    # reads as two code points and encodes as six bytes of invalid UTF-8 (CESU-8).
    return json.dumps(text, ensure_ascii=False)
