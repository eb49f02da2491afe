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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zili import envs

KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")

MAX_CHOICES = 1024
_COUNT_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


@dataclass(frozen=True)
class Limits:
    """zili's own caps on a constraint (not the grammar library's), read from the environment at each
    check (zili.envs): grammar size and compile time grow with them, so they bound what one request
    can cost. Each refusal names the cap and its variable."""

    max_spec_chars: int  # ZILI_STRUCTURED_MAX_SPEC_CHARS
    max_schema_depth: int  # ZILI_STRUCTURED_MAX_SCHEMA_DEPTH
    max_count: int  # ZILI_STRUCTURED_MAX_COUNT: minLength ... maxProperties
    max_regex_repeat: int  # ZILI_STRUCTURED_MAX_REGEX_REPEAT: {n,m} in regexes, patterns, grammars

    @classmethod
    def current(cls) -> Limits:
        return cls(envs.get_int(envs.ZILI_STRUCTURED_MAX_SPEC_CHARS), envs.get_int(envs.ZILI_STRUCTURED_MAX_SCHEMA_DEPTH),
                   envs.get_int(envs.ZILI_STRUCTURED_MAX_COUNT), envs.get_int(envs.ZILI_STRUCTURED_MAX_REGEX_REPEAT))


@dataclass(frozen=True)
class StructuredOutput:
    """`kind` is one of KINDS; `spec` is its canonical text (JSON for schemas, choices and tags).

    `strict` (JSON schemas only; OpenAI's `strict`): True compiles the schema in strict mode (no
    properties or items beyond those it lists) and refuses one the grammar would only approximate
    (zili.structured.approximations); False compiles it as JSON Schema reads it (additional
    properties and items allowed unless forbidden); None (not given) tries strict mode first and
    falls back to False when the schema needs it (e.g. `{"type": "array", "minItems": 1}`)."""

    kind: str
    spec: str = ""
    strict: bool | None = None

    # ---- constructors ------------------------------------------------------------------------
    @classmethod
    def json(cls, schema: Any, strict: bool | None = None) -> StructuredOutput:
        """A JSON schema: a dict, its JSON text, or a pydantic model class. ValueError names a schema
        that is invalid, past zili's caps (Limits), or (strict=True) only approximated, with where."""
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
        if strict:
            check_exact(schema)
        return cls("json", _canonical(schema), strict)

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
    def cache_key(self) -> tuple[str, str, bool | None]:
        return (self.kind, self.spec, self.strict)

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
    limit = Limits.current().max_spec_chars
    if len(text) > limit:
        raise ValueError(f"the {kind} constraint is too large: {len(text)} characters, this server's limit is "
                         f"{limit} (ZILI_STRUCTURED_MAX_SPEC_CHARS)")


def _depth(value: Any, limit: int, level: int = 0) -> int:
    if level > limit:
        return level
    if isinstance(value, dict):
        return max((_depth(v, limit, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, limit, level + 1) for v in value), default=level)
    return level


def _check_repeats(kind: str, text: str, where: str = "") -> None:
    limit = Limits.current().max_regex_repeat
    for match in _REPEAT.finditer(text):
        counts = [int(g) for g in match.groups() if g]
        if max(counts) > limit:
            raise ValueError(f"the {kind} repeats {match.group(0)}{where}: repetition counts above {limit} "
                             f"are past this server's limit (ZILI_STRUCTURED_MAX_REGEX_REPEAT)")


def _check_counts(value: Any, limit: int, pointer: str = "") -> None:
    """Repetition bounds anywhere in a schema: length / item counts and patterns."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_counts(item, limit, f"{pointer}/{i}")
        return
    if not isinstance(value, dict):
        return
    for key, item in value.items():
        here = f"{pointer}/{str(key).replace('~', '~0').replace('/', '~1')}"
        if key in _COUNT_KEYWORDS and isinstance(item, (int, float)) and not isinstance(item, bool) \
                and item > limit:
            raise ValueError(f"the JSON schema has {key}={item} at {here}: this server's limit is {limit} "
                             f"(ZILI_STRUCTURED_MAX_COUNT)")
        if key == "pattern" and isinstance(item, str):
            _check_repeats("JSON schema pattern", item, f" at {here}")
        _check_counts(item, limit, here)


def check_json_schema(schema: Any) -> None:
    """Refuse a schema that is too large, too deep, or not a valid JSON schema (per its meta-schema)."""
    limits = Limits.current()
    _check_size("JSON schema", _canonical(schema))
    if _depth(schema, limits.max_schema_depth) > limits.max_schema_depth:
        raise ValueError(f"the JSON schema is nested more than {limits.max_schema_depth} levels deep, this "
                         f"server's limit (ZILI_STRUCTURED_MAX_SCHEMA_DEPTH)")
    _check_counts(schema, limits.max_count)
    try:
        from jsonschema import exceptions, validators
    except ImportError:  # the compiler still catches what it cannot handle
        return
    try:
        validators.validator_for(schema, default=validators.Draft202012Validator).check_schema(schema)
    except exceptions.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise ValueError(f"the JSON schema is invalid: {e.message}" + (f" (at /{where})" if where else "")) from None


def check_exact(schema: Any) -> None:
    """ValueError naming the first places where the grammar would only approximate `schema`
    (strict: true refuses them instead of weakening the constraint silently)."""
    from zili.structured.approximations import approximations

    loose = approximations(schema, limit=4)
    if loose:
        raise ValueError("strict mode: the grammar cannot enforce this schema exactly: " + "; ".join(map(str, loose))
                         + ". Remove those keywords, or send strict: false to accept the approximation")


# Where a schema holds sub-schemas (JSON Schema 2020-12 and drafts 4-7): keyword -> "one" | "list" | "map".
# "one" is a schema (draft 4-7 `items` may also be a list of them), "list" a list of schemas, "map" name -> schema.
SUB_SCHEMAS = {"properties": "map", "patternProperties": "map", "$defs": "map", "definitions": "map",
               "dependentSchemas": "map", "items": "one", "additionalProperties": "one", "additionalItems": "one",
               "unevaluatedProperties": "one", "unevaluatedItems": "one", "contains": "one", "propertyNames": "one",
               "not": "one", "if": "one", "then": "one", "else": "one", "prefixItems": "list", "anyOf": "list",
               "oneOf": "list", "allOf": "list"}


def rewrite_schema(schema: Any, patch: Callable[[dict[str, Any], set[str]], None]) -> Any:
    """A copy of `schema` in which every schema object, innermost first, has been passed to
    `patch(node, types)` (`node` a fresh dict `patch` may change in place; `types` the type names its
    `type` keyword declares). Sub-schemas are found through SUB_SCHEMAS; `schema` is not changed."""
    if isinstance(schema, list):
        return [rewrite_schema(item, patch) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key, shape in SUB_SCHEMAS.items():
        value = out.get(key)
        if shape == "map" and isinstance(value, dict):
            out[key] = {name: rewrite_schema(item, patch) for name, item in value.items()}
        elif value is not None and shape != "map":
            out[key] = rewrite_schema(value, patch)
    declared = out.get("type")
    patch(out, {t for t in (declared if isinstance(declared, list) else [declared]) if isinstance(t, str)})
    return out


def as_json_schema_reads(schema: Any) -> Any:
    """`schema` with JSON Schema's defaults written out, for a compiler that applies strict defaults.

    In strict mode (OpenAI's structured outputs; xgrammar's `strict_mode`, which its structural tags
    always use) an object admits only the properties it lists and an array only the items it lists;
    JSON Schema itself allows more unless `additionalProperties` / `items` forbid it. This writes
    `additionalProperties: true` on every object schema that sets neither it nor
    `unevaluatedProperties`, `items: true` on every array schema without `items`, and
    `additionalItems: true` beside a draft 4-7 tuple `items` list, so a strict compiler reads the
    schema as JSON Schema does. A copy; `schema` is not changed."""
    return rewrite_schema(schema, _open_defaults)


def _open_defaults(node: dict[str, Any], types: set[str]) -> None:
    if ("object" in types or "properties" in node or "patternProperties" in node) \
            and "additionalProperties" not in node and "unevaluatedProperties" not in node:
        node["additionalProperties"] = True
    if "array" in types or "prefixItems" in node:
        if "items" not in node:
            node["items"] = True
        elif isinstance(node["items"], list) and "additionalItems" not in node:
            node["additionalItems"] = True


def as_strict(schema: Any) -> Any:
    """`schema` in strict mode (OpenAI's structured outputs; xgrammar's strict_mode), for a compiler
    that reads JSON Schema's defaults (llguidance): every object schema that sets none of
    `additionalProperties`, `unevaluatedProperties` and `patternProperties` gets
    `additionalProperties: false`, every array schema without `items` gets `items: false` (with
    `prefixItems`, that closes the tuple). A copy; `schema` is not changed."""
    return rewrite_schema(schema, _close)


def _close(node: dict[str, Any], types: set[str]) -> None:
    if ("object" in types or "properties" in node) and "additionalProperties" not in node \
            and "unevaluatedProperties" not in node and "patternProperties" not in node:
        node["additionalProperties"] = False
    if ("array" in types or "prefixItems" in node) and "items" not in node:
        node["items"] = False


def locate_schema_failure(schema: Any, fails: Callable[[dict[str, Any]], bool]) -> str | None:
    """The RFC 6901 JSON pointer of the deepest sub-schema of `schema` that `fails` on its own ("" for
    the root), None when `schema` is not an object or `fails(schema)` is false (the failure was elsewhere).

    A grammar library's messages name no place in the schema; a client with a large schema needs one.
    `fails(node)` says whether the library refuses `node` (a schema object); each sub-schema is passed
    with the root's `$defs` / `definitions` beside it, so that its references resolve. The walk goes
    down the first failing sub-schema (SUB_SCHEMAS order) at each level; where none fails, a local
    `$ref` whose target fails on its own moves the place to that target."""
    if not isinstance(schema, dict) or not fails(schema):
        return None
    defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}

    def fails_alone(node: Any) -> bool:
        return isinstance(node, dict) and fails({**defs, **node})

    pointer, node, seen = "", schema, {""}
    while True:
        for key, shape in SUB_SCHEMAS.items():
            value = node.get(key)
            children = (list(value.items()) if shape == "map" and isinstance(value, dict) else
                        list(enumerate(value)) if shape == "list" and isinstance(value, list) else
                        [(None, value)] if shape == "one" and isinstance(value, dict) else [])
            bad = next(((name, child) for name, child in children if fails_alone(child)), None)
            if bad is not None:
                name, node = bad
                pointer = f"{pointer}/{key}" if name is None else f"{pointer}/{key}/{_escape(str(name))}"
                break
        else:
            ref = node.get("$ref")  # a local reference that fails: the place is its target
            if not isinstance(ref, str) or not ref.startswith("#/") or ref[1:] in seen:
                return pointer
            target = resolve_pointer(schema, ref[1:])
            if not fails_alone(target):
                return pointer
            pointer, node = ref[1:], target
            seen.add(pointer)


def _escape(name: str) -> str:
    # RFC 6901: "~" and "/" inside one reference token
    return name.replace("~", "~0").replace("/", "~1")


def resolve_pointer(document: Any, pointer: str) -> Any:
    """The value at an RFC 6901 JSON pointer ("/a/0/b"), None when there is none."""
    for part in pointer.split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(document, dict) and part in document:
            document = document[part]
        elif isinstance(document, list) and part.isdigit() and int(part) < len(document):
            document = document[int(part)]
        else:
            return None
    return document
