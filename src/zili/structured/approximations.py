"""Where zili's JSON-schema grammar is looser than the schema: the constraints it accepts but does not enforce.

The grammar backend (xgrammar 0.2, structured/backend.py) turns a schema into a grammar. Some
keywords it cannot express and drops, some it weakens (`oneOf` becomes `anyOf`); the output is
then valid JSON of the right shape that may still fail the schema. `approximations(schema)` lists
each such place as a JSON pointer and what is lost, so the server can say so (the `zili-warnings`
response header) or, under `strict: true`, refuse the schema with a 400 naming the place.

Each entry in the tables below was checked against the backend (tests/unit/test_structured_strictness.py
compiles the schema and feeds it an instance that breaks the keyword: the grammar accepts it). A keyword
the backend learns to enforce makes that test fail, and the entry goes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Keywords the grammar ignores entirely: what each would have required.
IGNORED = {
    "not": "the value must not match a schema",
    "uniqueItems": "array items must be distinct",
    "contains": "the array must contain a matching item",
    "minContains": "the array must contain a number of matching items",
    "maxContains": "the array must contain a number of matching items",
    "if": "a conditional schema (if / then / else)",
    "dependentRequired": "properties required when another is present",
    "dependentSchemas": "schemas applied when a property is present",
    "dependencies": "properties or schemas required when another property is present",
}
# `format` values the grammar enforces; any other format is accepted as a plain string.
ENFORCED_FORMATS = frozenset({
    "date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uri-reference",
    "uri-template", "uuid", "json-pointer", "relative-json-pointer"})
# Regex constructs the grammar's regex engine drops (lookarounds) or cannot express (backreferences).
_LOOKAROUND = re.compile(r"\(\?<?[=!]")
_BACKREFERENCE = re.compile(r"\\[1-9]|\\k<")
# Sub-schemas, by keyword: a schema (dict), a list of schemas, or a map of name -> schema.
_SCHEMA = ("items", "additionalProperties", "additionalItems", "unevaluatedProperties", "unevaluatedItems",
           "propertyNames", "contains", "not", "if", "then", "else")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


@dataclass(frozen=True)
class Approximation:
    """One place where the grammar is looser than the schema. `pointer`: RFC 6901 JSON pointer into the
    schema ("" is the root); `keyword`: the schema keyword; `what`: what is not enforced, in words."""

    pointer: str
    keyword: str
    what: str

    def __str__(self) -> str:
        return f"{self.pointer or '/'}: {self.keyword} is not enforced ({self.what})"


def approximations(schema: Any, limit: int = 50) -> list[Approximation]:
    """Every place (up to `limit`) where a grammar compiled from `schema` accepts output the schema
    rejects, in document order."""
    out: list[Approximation] = []
    _walk(schema, "", out, limit)
    return out[:limit]


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _walk(node: Any, pointer: str, out: list[Approximation], limit: int) -> None:
    if len(out) >= limit or not isinstance(node, dict):
        return
    out.extend(_here(node, pointer))
    for key in _SCHEMA:
        if key in node:
            _walk(node[key], f"{pointer}/{key}", out, limit)
    for key in _SCHEMA_LISTS:
        if isinstance(node.get(key), list):
            for i, item in enumerate(node[key]):
                _walk(item, f"{pointer}/{key}/{i}", out, limit)
    if isinstance(node.get("items"), list):  # draft 4-7 tuple form
        for i, item in enumerate(node["items"]):
            _walk(item, f"{pointer}/items/{i}", out, limit)
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for name, item in node[key].items():
                _walk(item, f"{pointer}/{key}/{_escape(str(name))}", out, limit)


def _here(node: dict[str, Any], pointer: str) -> list[Approximation]:
    found = [Approximation(f"{pointer}/{key}", key, what) for key, what in IGNORED.items()
             if key in node and not (key in ("minContains", "maxContains") and "contains" in node)]
    if "oneOf" in node and isinstance(node["oneOf"], list) and len(node["oneOf"]) > 1:
        found.append(Approximation(f"{pointer}/oneOf", "oneOf",
                                   "exactly one branch must match; compiled as anyOf, at least one"))
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
        found.append(Approximation(f"{pointer}/allOf", "allOf", "every branch must match; only partly combined"))
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        for key in ("minLength", "maxLength"):
            if key in node:
                found.append(Approximation(f"{pointer}/{key}", key, "a length limit beside a pattern is dropped"))
        if _LOOKAROUND.search(pattern):
            found.append(Approximation(f"{pointer}/pattern", "pattern", "lookahead / lookbehind assertions are dropped"))
        if _BACKREFERENCE.search(pattern):
            found.append(Approximation(f"{pointer}/pattern", "pattern", "backreferences are not supported"))
    fmt = node.get("format")
    if isinstance(fmt, str) and fmt not in ENFORCED_FORMATS and node.get("type") in ("string", None):
        found.append(Approximation(f"{pointer}/format", "format", f"format {fmt!r} is not checked"))
    step = node.get("multipleOf")
    if isinstance(step, float) and not step.is_integer():
        found.append(Approximation(f"{pointer}/multipleOf", "multipleOf", "a fractional multipleOf is dropped"))
    ref = node.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        found.append(Approximation(f"{pointer}/$ref", "$ref",
                                   "a reference outside this schema is not fetched; any value is accepted there"))
    return found
