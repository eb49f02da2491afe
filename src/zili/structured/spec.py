"""StructuredOutput: what a request's output must be, checked for shape when it is made.

One of: a JSON schema (`json`), any JSON object (`json_object`), a regular expression (`regex`),
one of a list of strings (`choice`), an EBNF grammar (`grammar`, xgrammar's GBNF dialect) or an
xgrammar structural tag (`structural_tag`, used for tool calls). Only shapes and sizes are checked
here; compiling against a tokenizer (and the errors that only a compiler finds) happens when the
engine accepts the request, before any token is generated.

This module imports neither torch nor xgrammar: SamplingParams validates through it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")

MAX_SPEC_CHARS = 64 * 1024  # a schema, grammar or regex longer than this is refused
MAX_SCHEMA_DEPTH = 32  # nesting of JSON containers within a schema
MAX_CHOICES = 1024
# Grammar size grows with repetition counts (and so does compile time: seconds at millions), so
# counts are capped: lengths and item counts in schemas, {n,m} in regexes, patterns and grammars.
MAX_REPEAT = 10_000
MAX_REGEX_REPEAT = 1_000
_COUNT_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


@dataclass(frozen=True)
class StructuredOutput:
    """`kind` is one of KINDS; `spec` is its canonical text (JSON for schemas, choices and tags)."""

    kind: str
    spec: str = ""

    # ---- constructors ------------------------------------------------------------------------
    @classmethod
    def json(cls, schema: Any) -> StructuredOutput:
        """A JSON schema: a dict, its JSON text, or a pydantic model class."""
        to_schema = getattr(schema, "model_json_schema", None) if isinstance(schema, type) else None
        if callable(to_schema):  # a pydantic model class
            schema = to_schema()
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"a JSON schema must be an object (or true/false), got {type(schema).__name__}")
        check_json_schema(schema)
        return cls("json", _canonical(schema))

    @classmethod
    def json_object(cls) -> StructuredOutput:
        return cls("json_object", "")

    @classmethod
    def regex(cls, pattern: str) -> StructuredOutput:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("a regex constraint must be a non-empty string")
        _check_size("regex", pattern)
        _check_repeats("regex", pattern)
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Any) -> StructuredOutput:
        if isinstance(options, (str, bytes)) or not isinstance(options, (list, tuple)):
            raise ValueError("a choice constraint must be a list of strings")
        if not options or not all(isinstance(o, str) and o for o in options):
            raise ValueError("a choice constraint must be a non-empty list of non-empty strings")
        if len(options) > MAX_CHOICES:
            raise ValueError(f"a choice constraint has {len(options)} options; at most {MAX_CHOICES} are allowed")
        spec = _canonical(list(dict.fromkeys(options)))
        _check_size("choice", spec)
        return cls("choice", spec)

    @classmethod
    def grammar(cls, ebnf: str) -> StructuredOutput:
        if not isinstance(ebnf, str) or not ebnf.strip():
            raise ValueError("a grammar constraint must be a non-empty EBNF string with a `root` rule")
        _check_size("grammar", ebnf)
        _check_repeats("grammar", ebnf)
        return cls("grammar", ebnf)

    @classmethod
    def structural_tag(cls, tag: Any) -> StructuredOutput:
        if isinstance(tag, str):
            try:
                tag = json.loads(tag)
            except json.JSONDecodeError as e:
                raise ValueError(f"the structural tag is not valid JSON: {e}") from None
        if not isinstance(tag, dict):
            raise ValueError("a structural tag must be a JSON object")
        spec = _canonical(tag)
        _check_size("structural_tag", spec)
        return cls("structural_tag", spec)

    @classmethod
    def parse(cls, value: Any) -> StructuredOutput:
        """Accept a StructuredOutput or a dict with exactly one of KINDS, e.g. {"json": schema},
        {"regex": "[0-9]+"}, {"choice": ["yes", "no"]}, {"grammar": ebnf}, {"json_object": True}."""
        if isinstance(value, StructuredOutput):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"must be a StructuredOutput or a dict with one of {', '.join(KINDS)}; "
                             f"got {type(value).__name__}")
        given = {k: v for k, v in value.items() if v is not None and v is not False}
        unknown = sorted(set(given) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; expected one of {', '.join(KINDS)}")
        if len(given) != 1:
            raise ValueError(f"exactly one of {', '.join(KINDS)} must be given, got "
                             f"{', '.join(given) or 'none'}")
        (kind, spec), = given.items()
        if kind == "json_object":
            return cls.json_object()
        return getattr(cls, kind)(spec)

    # ---- views -------------------------------------------------------------------------------
    @property
    def cache_key(self) -> tuple[str, str]:
        return (self.kind, self.spec)

    def schema(self) -> Any:
        """The JSON schema of a `json` constraint ({"type": "object"} for `json_object`)."""
        if self.kind == "json":
            return json.loads(self.spec)
        if self.kind == "json_object":
            return {"type": "object"}
        raise ValueError(f"a {self.kind} constraint has no JSON schema")

    def choices(self) -> list[str]:
        if self.kind != "choice":
            raise ValueError(f"a {self.kind} constraint has no choices")
        return json.loads(self.spec)

    def __repr__(self) -> str:
        spec = self.spec if len(self.spec) <= 80 else self.spec[:77] + "..."
        return f"StructuredOutput({self.kind}={spec!r})"


def _canonical(value: Any) -> str:
    # Key order is kept: it is the order in which object properties are generated.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _check_size(kind: str, text: str) -> None:
    if len(text) > MAX_SPEC_CHARS:
        raise ValueError(f"the {kind} constraint is too large: {len(text)} characters, the limit is {MAX_SPEC_CHARS}")


def _depth(value: Any, limit: int, level: int = 0) -> int:
    if level > limit:
        return level
    if isinstance(value, dict):
        return max((_depth(v, limit, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, limit, level + 1) for v in value), default=level)
    return level


def _check_repeats(kind: str, text: str) -> None:
    for match in _REPEAT.finditer(text):
        counts = [int(g) for g in match.groups() if g]
        if max(counts) > MAX_REGEX_REPEAT:
            raise ValueError(f"the {kind} repeats {match.group(0)}: repetition counts above {MAX_REGEX_REPEAT} "
                             f"are not supported")


def _check_counts(value: Any) -> None:
    """Repetition bounds anywhere in a schema: length / item counts and patterns."""
    if isinstance(value, list):
        for item in value:
            _check_counts(item)
        return
    if not isinstance(value, dict):
        return
    for key, item in value.items():
        if key in _COUNT_KEYWORDS and isinstance(item, (int, float)) and not isinstance(item, bool) \
                and item > MAX_REPEAT:
            raise ValueError(f"the JSON schema has {key}={item}: at most {MAX_REPEAT} is supported")
        if key == "pattern" and isinstance(item, str):
            _check_repeats("JSON schema pattern", item)
        _check_counts(item)


def check_json_schema(schema: Any) -> None:
    """Refuse a schema that is too large, too deep, or not a valid JSON schema (per its meta-schema)."""
    _check_size("JSON schema", _canonical(schema))
    if _depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise ValueError(f"the JSON schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")
    _check_counts(schema)
    try:
        from jsonschema import exceptions, validators
    except ImportError:  # the compiler still catches what it cannot handle
        return
    try:
        validators.validator_for(schema, default=validators.Draft202012Validator).check_schema(schema)
    except exceptions.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise ValueError(f"the JSON schema is invalid: {e.message}" + (f" (at /{where})" if where else "")) from None
