"""Hostile request bodies for the fuzz test: every field of every request model, hostile values.

The fields come from the pydantic request models themselves (`field_paths`), so a field added to a
model is fuzzed without touching the test. A field nested in an optional object is reached by filling
its parents with a small valid example (`EXAMPLES`, one per request model class; the test fails naming
a model class that has none). The values (`hostile_values`, a hypothesis strategy, plus `CANONICAL`,
one of each class, sent into every field) are the ones other servers have answered 500 to: lone
UTF-16 surrogates (escaped in the JSON text, which is the only way JSON can carry them), huge and
negative numbers, NaN and Infinity (Python's JSON extension, which Starlette's parser accepts), wrong
types, and nesting deeper than the parsers' recursion limits.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

from hypothesis import strategies as st
from pydantic import BaseModel


@dataclass(frozen=True)
class Raw:
    """JSON text spliced into the body as-is (what json.dumps cannot write: 10**5000, 1e400, deep nesting)."""

    text: str


Path = tuple[str | int, ...]

# ----- which fields exist -----


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a union (Optional included), Annotated unwrapped."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _members(a)]
    return [annotation]


def _models_of(annotation: Any) -> list[tuple[type[BaseModel], bool]]:
    """(model, in_a_list) for each request model reachable from `annotation` (list[Model] included)."""
    found: list[tuple[type[BaseModel], bool]] = []
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            found.append((member, False))
        elif typing.get_origin(member) is list:
            found += [(inner, True) for inner in _members(typing.get_args(member)[0])
                      if isinstance(inner, type) and issubclass(inner, BaseModel)]
    return found


Parents = list[tuple[Path, type[BaseModel]]]


def field_paths(model: type[BaseModel], prefix: Path = (), seen: frozenset[type] = frozenset(),
                free_form: bool = False) -> list[tuple[Path, Parents]]:
    """Every field of `model` and of the request models nested in it, as (path, parents): `parents`
    lists the (path, model) of each enclosing object the body must hold for the field to be read.
    A field whose type is a union of models lists each model's fields (a path may repeat).
    free_form: only the fields that take a free-form object (a dict: schemas, tool parameters)."""
    out: list[tuple[Path, Parents]] = []
    for name, field in model.model_fields.items():
        path = (*prefix, field.alias or name)
        if not free_form or any(typing.get_origin(m) is dict for m in _members(field.annotation)):
            out.append((path, []))
        for inner_model, in_list in _models_of(field.annotation):
            if inner_model in seen | {model}:
                continue
            inner_prefix = (*path, 0) if in_list else path
            for sub_path, parents in field_paths(inner_model, inner_prefix, seen | {model}, free_form):
                out.append((sub_path, [(inner_prefix, inner_model), *parents]))
    return out


def models_in(paths: list[tuple[Path, Parents]]) -> set[type[BaseModel]]:
    return {model for _, parents in paths for _, model in parents}


def set_path(body: Any, path: Path, value: Any) -> None:
    """Put `value` at `path`, making the lists and objects on the way that do not exist yet."""
    target = body
    for key, next_key in zip(path[:-1], path[1:], strict=True):
        empty: Any = [] if isinstance(next_key, int) else {}
        if isinstance(target, list):
            while len(target) <= key:  # type: ignore[operator]
                target.append(None)
        if not isinstance(target[key] if isinstance(target, list) else target.get(key), list | dict):
            target[key] = empty
        target = target[key]
    last = path[-1]
    if isinstance(target, list) and isinstance(last, int):
        while len(target) <= last:
            target.append(None)
    target[last] = value


def get_path(body: Any, path: Path) -> Any:
    for key in path:
        try:
            body = body[key]
        except (KeyError, IndexError, TypeError):
            return None
    return body


def body_with(base: dict[str, Any], path: Path, parents: Parents, value: Any,
              examples: dict[type, dict[str, Any]]) -> dict[str, Any]:
    """`base` with `value` at `path`, each enclosing object replaced by its model's example."""
    body = json.loads(json.dumps(base))
    for parent_path, parent_model in parents:
        set_path(body, parent_path, json.loads(json.dumps(examples[parent_model])))
    set_path(body, path, value)
    return body


# ----- hostile values -----

_PLACEHOLDER = "\x00zili-raw-{}\x00"


def encode(body: Any) -> bytes:
    """The body as JSON text: lone surrogates as \\uXXXX escapes, NaN/Infinity as Python writes them,
    Raw values spliced in verbatim."""
    raws: list[str] = []

    def swap(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value.text)
            return _PLACEHOLDER.format(len(raws) - 1)
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    text = json.dumps(swap(body), allow_nan=True)  # ensure_ascii: a lone surrogate becomes "\ud800"
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(_PLACEHOLDER.format(i)), raw)
    return text.encode("utf-8")


def deep(depth: int, kind: Literal["list", "dict"] = "list") -> Raw:
    if kind == "list":
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a":' * depth + "1" + "}" * depth)


# Sent into every field: one of each class a 5xx has come from elsewhere.
CANONICAL: list[Any] = ["a\udfffb\ud800", 2**64 + 1, float("nan"), {"\udc00": [None, float("inf")]}, deep(5000)]
# Sent into every field in turn (field i gets ROTATING[i % len]): every class reaches every endpoint.
ROTATING: list[Any] = [
    -1, "<script>alert(1)</script>{{7*7}}%s\x00\u202e", -(2**63) - 1, 0, Raw("1" * 5000), Raw("-1e400"),
    float("inf"), 1e308, None, True, 1.5, "1", [], {}, [{"\ud800": [None]}], deep(5000, "dict"), deep(600),
    deep(600, "dict"), "\ud83d",
]


# Sent into every free-form object field (schemas, tool parameters, ...): JSON schemas that have
# broken schema compilers (non-finite and 64-bit-overflowing bounds, impossible sizes, bad regexes,
# reference cycles), and hostile keys and values inside an otherwise valid object.
SCHEMAS: list[Any] = [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": Raw("1e400")}}},
    {"type": "integer", "maximum": 9223372036854776000}, {"type": "integer", "minimum": -(2**70)},
    {"type": "string", "maxLength": 2**64}, {"type": "array", "minItems": 2**40}, {"type": "string", "pattern": "(a"},
    {"type": "string", "pattern": "a{99999999999}"}, {"enum": [float("nan")]}, {"const": float("-inf")},
    {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}, {"$ref": "#/nope"}, {"$ref": "http://x.invalid/s"},
    {"type": "number", "multipleOf": 1e-320}, {"type": "string", "minLength": 5, "maxLength": 2},
    {"type": "object", "properties": {"\ud800": {"type": "string"}}}, {"type": "object", "required": ["\udc00"]},
    {"type": "object", "patternProperties": {"(": {}}}, {"allOf": [{"type": "string"}, {"type": "integer"}]},
    {"type": ["string", "nope"]}, {"type": "object", "properties": {"a": deep(600, "dict")}},
]


def values_for(index: int) -> list[Any]:
    """The hostile values the `index`-th field gets: CANONICAL and one of ROTATING."""
    return [*CANONICAL, ROTATING[index % len(ROTATING)]]


_surrogate_text = st.text(st.characters(categories=["Cs", "Lu", "Cc", "So", "Zs"]), max_size=12)
_scalars = st.one_of(
    _surrogate_text,
    st.integers(min_value=2**31), st.integers(max_value=-1), st.integers(-5, 50),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 5e-324]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(),
)


def hostile_values() -> st.SearchStrategy[Any]:
    """Scalars of every hostile class, and lists / objects of them (object keys hostile too), and
    deep nesting."""
    nested = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(_surrogate_text, inner, max_size=3), max_leaves=8)
    return st.one_of(nested, st.integers(100, 20_000).map(deep),
                     st.integers(100, 20_000).map(lambda d: deep(d, "dict")))


# ----- what a response may be -----


def shape_problem(status: int, body: bytes, anthropic: bool) -> str | None:
    """Why this response breaks the contract (None: it keeps it): 2xx or 4xx only, and a 4xx in the
    endpoint's error shape (OpenAI's everywhere, Anthropic's on /v1/messages)."""
    if not (200 <= status < 300 or 400 <= status < 500):
        return f"status {status}"
    if status >= 400:
        try:
            error = json.loads(body)
        except ValueError:
            return "an error body that is not JSON"
        if anthropic:
            ok = (isinstance(error, dict) and error.get("type") == "error" and isinstance(error.get("error"), dict)
                  and isinstance(error["error"].get("type"), str) and isinstance(error["error"].get("message"), str))
        else:
            inner = error.get("error") if isinstance(error, dict) else None
            ok = (isinstance(inner, dict) and set(inner) == {"message", "type", "param", "code"}
                  and isinstance(inner["message"], str) and isinstance(inner["type"], str))
        if not ok:
            return "an error not in the endpoint's shape"
    return None
