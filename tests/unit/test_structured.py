"""Structured output on a tiny random Llama (byte tokenizer): every finished output obeys its
constraint, whatever the batch, n, prefix cache or preemption; bad specs fail before generation."""

from __future__ import annotations

import json
import re

import jsonschema  # noqa: E402
import pytest
import xgrammar  # noqa: E402,F401

from tests.tiny_models import write_tiny_llama  # noqa: E402
from zili import LLM, SamplingParams  # noqa: E402
from zili.engine.runner import kv_bytes_per_block  # noqa: E402
from zili.structured.backend import choice_ebnf, token_bytes  # noqa: E402
from zili.structured.spec import Limits, StructuredOutput  # noqa: E402

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    "ok": {"type": "boolean"}}, "required": ["name", "age", "tags"]}


def _nested(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


PROMPTS = ["Hello there", "The capital of France is", "def fib(n):", "1, 2, 3, 4,", "你好，世界", "Once upon a time"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-structured"))


def make_llm(tiny_dir, num_blocks=512, block_size=4, **kw) -> LLM:
    import torch

    from zili.models.hf_config import model_config_from_hf

    cfg = model_config_from_hf(json.loads((tiny_dir / "config.json").read_text()))
    kw.setdefault("max_num_seqs", 32)
    return LLM(str(tiny_dir), dtype="float32", block_size=block_size,
               kv_cache_memory=num_blocks * kv_bytes_per_block(cfg, block_size, torch.float32), **kw)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return make_llm(tiny_dir)


def assert_pool_free(llm: LLM) -> None:
    kv = llm.engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks and kv.tables == {}
    assert llm.engine.outputs.num_sequences == 0  # no per-sequence output state (matchers) left behind


def finished_texts(outputs) -> list[str]:
    return [c.text for o in outputs for c in o.outputs if c.finish_reason == "stop"]


# ---- specs ---------------------------------------------------------------------------------------

def test_spec_forms_normalise():
    assert SamplingParams(structured={"json": PERSON}).structured == StructuredOutput.json(PERSON)
    assert SamplingParams(structured={"json": json.dumps(PERSON)}).structured.schema() == PERSON
    assert SamplingParams(structured={"regex": "[0-9]+"}).structured.kind == "regex"
    assert SamplingParams(structured={"choice": ["a", "b", "a"]}).structured.choices() == ["a", "b"]
    assert SamplingParams(structured={"json_object": True}).structured.kind == "json_object"
    assert SamplingParams(structured={"grammar": 'root ::= "x"'}).structured.kind == "grammar"
    assert SamplingParams().structured is None


@pytest.mark.parametrize("structured, message", [
    ({"json": {"type": "strnig"}}, "invalid"),
    ({"json": {"type": "object", "properties": {"a": {"minimum": "zero"}}}}, r"/properties/a/minimum"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": [1, 2]}, "must be an object"),
    ({"json": {"properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(1000)}}},
     "too large"),
    ({"json": _nested(70)}, "nested more than"),
    ({"json": {"type": "array", "items": {"type": "string", "maxLength": 10**7}}}, "maxLength=10000000"),
    ({"json": {"type": "string", "pattern": "^x{1,50000}$"}}, "repetition counts"),
    ({"regex": "[a-z]{99999}"}, "repetition counts"),
    ({"grammar": 'root ::= "a"{20000}'}, "repetition counts"),
    ({"regex": ""}, "non-empty"),
    ({"choice": []}, "non-empty"),
    ({"choice": "yes"}, "list of strings"),
    ({"grammar": "  "}, "root"),
    ({"json": {}, "regex": "a"}, "exactly one"),
    ({"jsn": {}}, "unknown key"),
    ("yes", "must be a StructuredOutput"),
])
def test_bad_specs_are_rejected_by_sampling_params(structured, message):
    with pytest.raises(ValueError, match=message) as e:
        SamplingParams(structured=structured)
    assert str(e.value).startswith("SamplingParams.structured")


def test_size_limit_is_the_documented_one():
    limit = Limits.current().max_spec_chars
    big = {"type": "object", "description": "x" * limit}
    with pytest.raises(ValueError, match=f"{limit} \\(ZILI_STRUCTURED_MAX_SPEC_CHARS\\)"):
        StructuredOutput.json(big)


def test_token_bytes_of_the_byte_tokenizer(llm):
    tok = llm.tokenizer
    table = token_bytes(tok, llm.engine.model_config.vocab_size)
    for text in ["a", " ", "\n", "é", "你"]:
        assert b"".join(table[i] for i in tok.encode(text, add_special_tokens=False)) == text.encode()
    for special in tok.all_special_ids:
        assert table[special] == b""


def test_choice_literals_are_escaped(llm):
    options = ['say "hi"', "back\\slash", "two\nlines", "ünï", "{x}"]
    grammar = llm.engine.compile_structured(StructuredOutput.choice(options))
    for option in options:
        matcher = llm.engine.inputs.new_matcher(grammar)
        assert matcher.accept_string(option) and matcher.is_completed(), (option, choice_ebnf(options))


# ---- the engine ------------------------------------------------------------------------------

def test_json_schema_batch_with_n_and_sampling(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=120, n=3, seed=7, structured={"json": PERSON})
    outputs = llm.generate(PROMPTS, params)
    texts = finished_texts(outputs)
    assert len(texts) >= 0.8 * 3 * len(PROMPTS)
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(texts)) > 1  # n > 1 sequences each sample their own
    assert_pool_free(llm)


def test_regex_choice_grammar_and_json_object(llm):
    specs = [({"regex": r"[A-Z][a-z]{2,5}-[0-9]{3}"}, lambda t: re.fullmatch(r"[A-Z][a-z]{2,5}-[0-9]{3}", t)),
             ({"choice": ["yes", "no", "maybe so"]}, lambda t: t in ("yes", "no", "maybe so")),
             ({"grammar": 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'},
              lambda t: re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", t)),
             ({"json_object": True}, lambda t: isinstance(json.loads(t), dict))]
    params = [SamplingParams(temperature=1.0, max_tokens=60, n=4, seed=i, structured=s) for i, (s, _) in enumerate(specs)]
    outputs = llm.generate(["Answer:"] * len(specs), params)
    for (_, check), out in zip(specs, outputs):
        done = [c.text for c in out.outputs if c.finish_reason == "stop"]
        assert all(check(t) for t in done), done
        assert done or all(c.text.startswith("{") for c in out.outputs)  # a random model rambles in {...}
    assert_pool_free(llm)


def test_constrained_and_free_rows_do_not_leak(llm):
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, free)]
    mixed = llm.generate(PROMPTS * 2, [free] * len(PROMPTS) + [
        SamplingParams(temperature=0, max_tokens=40, structured={"json": PERSON})] * len(PROMPTS))
    assert [o.outputs[0].token_ids for o in mixed[:len(PROMPTS)]] == alone


def test_preemption_and_prefix_cache_keep_grammar_state(tiny_dir, llm):
    params = SamplingParams(temperature=0, max_tokens=80, structured={"json": PERSON})
    system = "You are a form filler. Reply in JSON. "
    prompts = [system + p for p in PROMPTS]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    small = make_llm(tiny_dir, num_blocks=40, max_num_batched_tokens=64)
    got = [o.outputs[0] for o in small.generate(prompts, params)]
    assert small.engine.stats().num_preemptions > 0
    assert [c.token_ids for c in got] == expected
    again = [o.outputs[0].token_ids for o in small.generate(prompts, params)]  # prefix-cache hits
    assert again == expected and small.engine.stats().prefix_cache_hit_rate > 0
    for c in got:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), PERSON)
    assert_pool_free(small)


def test_stream_and_generate_agree(llm):
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=80, structured={"json": PERSON})
    whole = llm.generate(["Fill the form:"], params)[0].outputs[0]
    pieces, last = [], ""
    for out in llm.stream("Fill the form:", params):
        text = out.outputs[0].text
        pieces.append(text[len(last):])
        last = text
    assert "".join(pieces) == whole.text and out.outputs[0].token_ids == whole.token_ids


def test_invalid_spec_rejected_before_generation(llm):
    engine = llm.engine
    bad = [StructuredOutput("json", json.dumps({"$ref": "#/$defs/missing"})),
           StructuredOutput.regex("(unclosed"), StructuredOutput.grammar("root ::= ")]
    for spec in bad:
        with pytest.raises(ValueError, match="cannot be used"):
            engine.add_request("bad", "Hello", SamplingParams(structured=spec))
        assert "bad" not in engine.requests
    assert not engine.scheduler.waiting and engine.outputs.num_sequences == 0


def test_compiled_grammars_are_cached(llm):
    engine = llm.engine
    first = engine.compile_structured(StructuredOutput.json(PERSON))
    assert engine.compile_structured(StructuredOutput.json(json.loads(json.dumps(PERSON)))) is first


def test_unconstrained_requests_never_build_the_backend(tiny_dir):
    fresh = make_llm(tiny_dir, num_blocks=64)
    fresh.generate(PROMPTS[:2], SamplingParams(max_tokens=4))
    assert fresh.engine.inputs._grammar_backend is None


def test_grammar_end_finishes_under_ignore_eos(llm):
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=30, ignore_eos=True, n=4,
                            structured={"choice": ["alpha", "beta"]})
    out = llm.generate(["Pick:"], params)[0]
    assert {c.finish_reason for c in out.outputs} == {"stop"}
    assert {c.text for c in out.outputs} <= {"alpha", "beta"}


def test_min_tokens_does_not_fight_the_grammar(llm):
    params = SamplingParams(temperature=1.0, seed=2, max_tokens=30, min_tokens=10, structured={"choice": ["ok"]})
    out = llm.generate(["Say ok:"], params)[0].outputs[0]
    assert (out.text, out.finish_reason) == ("ok", "stop")


def test_abort_releases_constrained_sequences(llm):
    engine = llm.engine
    engine.add_request("ab", "Hello", SamplingParams(max_tokens=50, n=2, structured={"json": PERSON}))
    engine.step()
    engine.abort_request("ab")
    while engine.has_unfinished_requests():
        engine.step()
    assert_pool_free(llm)
