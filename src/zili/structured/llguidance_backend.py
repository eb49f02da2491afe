"""llguidance as zili's second grammar library (Microsoft's llguidance, the Earley-parser-based
constrained decoder behind vLLM's and SGLang's `llguidance` backend).

`LLGuidanceCompiler` turns a StructuredOutput (JSON schema, JSON object, regex, choice, EBNF grammar)
into an `LLGuidanceGrammar`; each sequence gets an `LLGuidanceMatcher`, which speaks the same matcher
protocol as xgrammar's GrammarMatcher (zili.structured.backend.StructuredMatcher): bitmask, accept,
rollback, termination and the forced continuation jump-forward decoding appends.

Semantics kept equal to the xgrammar path:
- the vocabulary is zili's own token bytes (backend.token_bytes), nothing is fetched;
- JSON whitespace is zili's fixed `, ` / `: ` (JSON_SEPARATORS);
- `strict` (OpenAI's): strict mode closes every object and array the schema does not close itself
  (`additionalProperties: false`, `items: false` / `additionalItems: false` written out), as xgrammar's
  strict_mode does, and an unimplemented keyword is an error (llguidance's `lenient: false`); with
  strict false the schema compiles as JSON Schema reads it and unimplemented keywords are ignored
  (`lenient: true`; zili.structured.approximations names them in the zili-warnings header); strict
  unset tries strict mode first and falls back to that;
- a refused schema is a ValueError naming the deepest sub-schema llguidance refuses on its own.
Structural tags (tool calls) stay xgrammar's: llguidance's tag format differs (GrammarBackend routes them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance
import torch
from llguidance.gbnf_to_lark import gbnf_to_lark

from zili.structured.spec import StructuredOutput, as_strict, locate_schema_failure

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: token bytes, special ids, the end token and an encoder."""

    def __init__(self, tokenizer: Any, token_bytes: list[bytes]) -> None:
        eos = list(tokenizer.eos_token_ids)
        self.eos_token_id = eos[0] if eos else len(token_bytes) - 1
        self.bos_token_id = None
        # Special tokens and lm_head padding have no bytes: llguidance wants a name it never matches.
        self.special_token_ids = [i for i, b in enumerate(token_bytes) if not b]
        self.tokens = [b if b else b"<|zili_special_%d|>" % i for i, b in enumerate(token_bytes)]
        self._backend = tokenizer.backend

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return list(self._backend.encode(text, add_special_tokens=False).ids)


class LLGuidanceMatcher:
    """One sequence's llguidance state behind xgrammar's matcher interface (StructuredMatcher).

    llguidance stops by itself once nothing but the end can follow (`}` of a JSON object) and an
    unexpected token puts its matcher in a permanent error state; xgrammar terminates only when the end
    token is accepted and leaves its state unchanged on a refused token. This adapter keeps xgrammar's
    semantics: a refused token returns False and changes nothing; `is_terminated()` is true after an
    accepted end token; `rollback(n)` undoes the last n accepted tokens, the end token included."""

    def __init__(self, matcher: llguidance.LLMatcher, stop_token_ids: frozenset[int]) -> None:
        self._m = matcher
        self._stop = stop_token_ids
        self._accepted: list[int] = []

    def accept_token(self, token_id: int) -> bool:
        if self._m.is_error() or self.is_terminated():
            return False
        if token_id in self._stop:
            # The end token is kept out of llguidance: a matcher rolled back over a consumed end is no
            # longer accepting (llguidance 1.9), and spec decoding / jump-forward roll back over ends.
            if not self._m.is_accepting():
                return False
        elif self._m.is_stopped() or self._m.try_consume_tokens([token_id]) != 1:
            return False
        self._accepted.append(token_id)
        return True

    def is_terminated(self) -> bool:
        return bool(self._accepted) and self._accepted[-1] in self._stop

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        # The matcher writes row `index` of the int32 [batch, ceil(vocab / 32)] CPU bitmask in place.
        # (Not through llguidance.torch: that module runs torch.compile at import, which would pull
        # dynamo and Inductor, ~140 MiB, into every eager server.)
        row = bitmask[index]
        if bitmask.dtype != torch.int32 or not row.is_contiguous() or bitmask.device.type != "cpu":
            raise ValueError("the grammar bitmask must be a contiguous int32 CPU tensor")
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > len(self._accepted):
            raise ValueError(f"cannot roll back {num_tokens} tokens: only {len(self._accepted)} were accepted")
        consumed = num_tokens - (1 if num_tokens and self.is_terminated() else 0)  # the end is not in llguidance
        if consumed and not self._m.rollback(consumed):
            raise RuntimeError(f"llguidance could not roll back {consumed} tokens: {self._m.get_error()}")
        del self._accepted[len(self._accepted) - num_tokens:]

    def find_jump_forward_string(self) -> str:
        """The bytes every continuation starts with (llguidance's forced bytes), whole UTF-8 characters."""
        if self._m.is_error() or self.is_terminated():
            return ""
        forced = self._m.compute_ff_bytes()
        for cut in range(len(forced), max(len(forced) - 4, -1), -1):  # drop a character cut in half
            try:
                return forced[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
        return ""


@dataclass(frozen=True)
class LLGuidanceGrammar:
    """A grammar llguidance has validated for one vocabulary; `new_matcher()` per sequence."""

    tokenizer: llguidance.LLTokenizer
    grammar: str  # llguidance's grammar text
    stop_token_ids: frozenset[int]
    warnings: tuple[str, ...] = ()  # what llguidance ignored (lenient JSON schemas)
    backend: str = "llguidance"

    def new_matcher(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(llguidance.LLMatcher(self.tokenizer, self.grammar, log_level=0), self.stop_token_ids)


class LLGuidanceCompiler:
    """Compiles StructuredOutputs for one vocabulary (`token_bytes`: the bytes of each id, b"" for special
    tokens and padding; `tokenizer`: zili's Tokenizer, for its end tokens and encoder)."""

    def __init__(self, tokenizer: Any, token_bytes: list[bytes]) -> None:
        stop = list(tokenizer.eos_token_ids)
        wrapper = llguidance.TokenizerWrapper(_Vocabulary(tokenizer, token_bytes))
        self.tokenizer = llguidance.LLTokenizer(wrapper, n_vocab=len(token_bytes), eos_token=stop or None)
        self.stop_token_ids = frozenset(stop)

    def compile(self, s: StructuredOutput) -> LLGuidanceGrammar:
        """ValueError with llguidance's message (and, for a JSON schema, where in the schema)."""
        if s.kind == "json":
            schema = s.schema()
            if s.strict is False:
                return self._json(schema, lenient=True)
            try:
                return self._json(as_strict(schema), lenient=s.strict is None)
            except ValueError:
                if s.strict:
                    raise
                return self._json(schema, lenient=True)  # as JSON Schema reads it, as the xgrammar path falls back
        if s.kind == "json_object":
            return self._json({"type": "object"}, lenient=True)
        if s.kind == "regex":
            return self._grammar(llguidance.LLMatcher.grammar_from_regex(s.spec))
        if s.kind == "choice":
            alternatives = " | ".join(json.dumps(option) for option in s.choices())
            return self._grammar(llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}"))
        if s.kind == "grammar":
            try:
                lark = gbnf_to_lark(s.spec)
            except Exception as e:  # noqa: BLE001 - the converter raises plain Exceptions on bad input
                raise ValueError(f"the grammar cannot be read: {e}") from None
            return self._grammar(llguidance.LLMatcher.grammar_from_lark(lark))
        raise ValueError(f"llguidance does not compile {s.kind!r} constraints here")

    def _json(self, schema: Any, lenient: bool) -> LLGuidanceGrammar:
        grammar = self._schema_grammar(schema, lenient)
        try:
            return self._grammar(grammar)
        except ValueError as e:
            where = self.locate_failure(schema, lenient)
            raise ValueError(f"{e} (at {where or '/'})" if where is not None else str(e)) from None

    @staticmethod
    def _schema_grammar(schema: Any, lenient: bool) -> str:
        # zili's fixed whitespace (backend.JSON_SEPARATORS), as llguidance names it
        options: JsonCompileOptions = {"whitespace_flexible": False, "lenient": lenient,
                                       "item_separator": ", ", "key_separator": ": "}
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=options)
        except (ValueError, TypeError, RuntimeError) as e:
            raise ValueError(str(e).strip().splitlines()[0]) from None

    def _grammar(self, grammar: str) -> LLGuidanceGrammar:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise ValueError("; ".join(m.strip().splitlines()[0] for m in messages if m.strip()) or "refused")
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():  # limits only hit when the parser starts (a grammar too large, too complex)
            raise ValueError(matcher.get_error().strip().splitlines()[0])
        return LLGuidanceGrammar(self.tokenizer, grammar, self.stop_token_ids, tuple(messages))

    def locate_failure(self, schema: Any, lenient: bool) -> str | None:
        """The JSON pointer of the deepest sub-schema llguidance refuses on its own ("" for the root),
        None when the root itself compiles (zili.structured.spec.locate_schema_failure walks)."""

        def fails(node: dict[str, Any]) -> bool:
            try:
                grammar = self._schema_grammar(node, lenient)
            except ValueError:
                return True
            return llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)[0]

        return locate_schema_failure(schema, fails)
