"""Scoring prompts and embeddings over HTTP (issue 21, items 1 and 10), on a real `zili serve` of
the default SmolLM2 GGUF in float32 with unquantized weights, against transformers loading the same
GGUF in float32 (the oracle): /v1/completions with echo and logprobs (what lm-evaluation-harness
sends, and lm-eval itself on a local multiple-choice task), and /v1/embeddings.

Tolerances: both sides compute in float32 from the same dequantized weights, but with different
attention kernels and summation orders; one token's logprob agrees to 2e-4, a sum over a few tokens
to 1e-3, a unit-norm embedding's components to 1e-4.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests.e2e.server_process import MODEL, ServerProcess, start_server

pytestmark = pytest.mark.slow

TOKEN_ATOL = 2e-4
SUM_ATOL = 1e-3
EMBEDDING_ATOL = 1e-4
DATA = Path(__file__).resolve().parents[1] / "data" / "lm_eval_mc"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory, "scoring", ["--dtype", "float32", "--quantization", "none",
                                                     "--enforce-eager", "--max-num-seqs", "8"], api_key=None)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.http() as client:
        yield client


@pytest.fixture(scope="module")
def hf(hf_smollm2_model, hf_smollm2_tokenizer):
    """transformers' model and tokenizer of the same GGUF, float32 (built once per session: tests/conftest.py)."""
    return hf_smollm2_model, hf_smollm2_tokenizer


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row p is the log-softmax after ids[:p + 1]."""
    with torch.no_grad():
        return torch.log_softmax(hf[0](torch.tensor([ids])).logits[0].float(), dim=-1)


def complete(http: httpx.Client, **body) -> dict:
    r = http.post("/v1/completions", json={"model": MODEL, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


# ---- /v1/completions: echo + logprobs ---------------------------------------------------------


def test_echo_logprobs_score_the_prompt_like_transformers(http, hf):
    prompt = "The capital of France is Paris. Its river is the Seine; ünïcödé 日本."
    ids = hf[1].encode(prompt, add_special_tokens=False)
    body = complete(http, prompt=prompt, echo=True, logprobs=3, max_tokens=0)
    (choice,) = body["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == 0
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert len(lp["tokens"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first
    ref = hf_logprobs(hf, ids)
    expected = [ref[p - 1, ids[p]].item() for p in range(1, len(ids))]
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=TOKEN_ATOL)
    for p in range(1, len(ids)):
        top = lp["top_logprobs"][p]
        best = max(top.values())
        assert best == pytest.approx(ref[p - 1].max().item(), abs=TOKEN_ATOL)
        if "\ufffd" not in lp["tokens"][p]:  # (tokens holding part of a character all print as U+FFFD)
            assert top[lp["tokens"][p]] == lp["token_logprobs"][p]  # the prompt's own token is always listed
    # offsets: each token starts where the text before it ends; the last one ends at the text's end
    assert lp["text_offset"][0] == 0
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][-1] < len(prompt)


def test_batch_of_token_id_prompts_then_generation(http, hf):
    texts = ["Question: What do bees make?\nAnswer: honey", "1, 2, 3, 4, 5,", "The sky is"]
    prompts = [hf[1].encode(t, add_special_tokens=False) for t in texts]
    body = complete(http, prompt=prompts, echo=True, logprobs=1, max_tokens=2, ignore_eos=True)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for ids, text, choice in zip(prompts, texts, body["choices"]):
        lp = choice["logprobs"]
        assert choice["text"].startswith(text)
        assert len(lp["token_logprobs"]) == len(ids) + 2  # the prompt's tokens, then the two generated
        full = list(ids)
        for _ in range(2):  # greedy, as the server decodes at temperature 0
            full.append(int(hf_logprobs(hf, full)[-1].argmax()))
        assert choice["text"] == text + hf[1].decode(full[len(ids):])
        ref = hf_logprobs(hf, full)
        expected = [ref[p - 1, full[p]].item() for p in range(1, len(full))]
        assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=TOKEN_ATOL)
        assert lp["text_offset"][len(ids)] == len(text)  # the first generated token starts after the echo


def test_streamed_scores_equal_the_whole_response(http):
    body = {"model": MODEL, "prompt": ["Once upon a time", "SELECT * FROM"], "echo": True, "logprobs": 2,
            "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    whole = complete(http, **{k: v for k, v in body.items() if k != "model"})
    texts: dict[int, str] = {}
    logprobs: dict[int, dict[str, list]] = {}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:])["choices"]:
                texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                if c["logprobs"] is not None:
                    acc = logprobs.setdefault(c["index"], {})
                    for key, values in c["logprobs"].items():
                        acc.setdefault(key, []).extend(values)
    for choice in whole["choices"]:
        i = choice["index"]
        assert texts[i] == choice["text"]
        assert logprobs[i]["tokens"] == choice["logprobs"]["tokens"]
        assert logprobs[i]["text_offset"] == choice["logprobs"]["text_offset"]
        assert logprobs[i]["token_logprobs"][1:] == pytest.approx(choice["logprobs"]["token_logprobs"][1:],
                                                                  abs=1e-6)


def test_scoring_again_hits_no_stale_cache(http, server):
    """The second scoring of a prompt finds its blocks cached; its logprobs must still be computed."""
    prompt = "A long shared system prompt that fills a few KV blocks of sixteen tokens each, then a question."
    first = complete(http, prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    complete(http, prompt=prompt, max_tokens=1)  # a plain request that may reuse the cached prefix
    second = complete(http, prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    a, b = first["choices"][0]["logprobs"], second["choices"][0]["logprobs"]
    assert b["tokens"] == a["tokens"]
    assert b["token_logprobs"][1:] == pytest.approx(a["token_logprobs"][1:], abs=1e-6)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    m = server.wait_idle()
    assert m["zili_kv_cache_free_blocks"] == m["zili_kv_cache_total_blocks"]


def test_max_tokens_zero_needs_echo_and_legacy_completions(http):
    r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 0, "echo": True, "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 0, "echo": True, "logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    body = complete(http, prompt="Hello there", max_tokens=0, echo=True)  # echo alone: the prompt, no logprobs
    assert body["choices"][0]["text"] == "Hello there" and body["choices"][0]["logprobs"] is None


# ---- lm-evaluation-harness --------------------------------------------------------------------


def test_lm_eval_multiple_choice_runs_and_matches_transformers(server, hf, tmp_path):
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "zili_mc.yaml").write_text(
        (DATA / "zili_mc.yaml").read_text().replace("DATA_FILE", str(DATA / "zili_mc.jsonl")))
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "ds"),
           "OPENAI_API_KEY": "unused"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
           f"model={MODEL},base_url={server.url}/v1/completions,num_concurrent=1,max_retries=1,"
           "tokenized_requests=True,tokenizer_backend=remote",
           "--tasks", "zili_mc", "--include_path", str(task_dir), "--batch_size", "4",
           "--output_path", str(out), "--log_samples"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    (samples_file,) = out.rglob("samples_zili_mc_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 6
    (results_file,) = out.rglob("results_*.json")
    acc = json.loads(results_file.read_text())["results"]["zili_mc"]["acc,none"]
    assert 0 <= acc <= 1
    tokenizer = hf[1]
    for sample in samples:
        # lm-eval 0.4.13 logs {"gen_args_i": {"arg_0": context, "arg_1": continuation}} and stringified
        # [[loglikelihood, is_greedy]] per choice
        arguments = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
        assert len(arguments) == len(sample["doc"]["choices"]) == len(sample["resps"])
        for (context, continuation), resp in zip(arguments, sample["resps"]):
            got = resp[0][0]
            # lm-eval's own split: trailing spaces of the context move to the continuation
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = tokenizer.encode(context + continuation, add_special_tokens=False)
            ctx = tokenizer.encode(context, add_special_tokens=False)
            ref = hf_logprobs(hf, whole)
            expected = sum(ref[p - 1, whole[p]].item() for p in range(len(ctx), len(whole)))
            assert float(got) == pytest.approx(expected, abs=SUM_ATOL), (context, continuation)


# ---- /v1/embeddings ---------------------------------------------------------------------------


def embed(http: httpx.Client, **body) -> dict:
    r = http.post("/v1/embeddings", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def hf_embedding(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        hidden = hf[0](torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]  # after the final norm
    return torch.nn.functional.normalize(hidden.mean(0), dim=0)


def test_embeddings_equal_transformers_mean_pooled_states(http, hf):
    texts = ["The cat sat on the mat.", "Embeddings map text to vectors.", "你好，世界"]
    body = embed(http, input=texts)
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2]
    ids = [hf[1].encode(t, add_special_tokens=False) for t in texts]
    assert body["usage"] == {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}
    for d, token_ids in zip(body["data"], ids):
        vector = torch.tensor(d["embedding"])
        assert d["object"] == "embedding" and vector.shape == (576,)
        torch.testing.assert_close(vector, hf_embedding(hf, token_ids), atol=EMBEDDING_ATOL, rtol=0)


def test_embeddings_batch_equals_alone_and_base64_and_token_ids(http, hf):
    texts = ["alpha beta gamma", "a much longer sentence about the weather in Paris in the spring", "x"]
    batch = embed(http, input=texts)["data"]
    for text, d in zip(texts, batch):
        (alone,) = embed(http, input=text)["data"]
        assert alone["embedding"] == pytest.approx(d["embedding"], abs=1e-6)
    encoded = embed(http, input=texts, encoding_format="base64")["data"]
    for d, e in zip(batch, encoded):
        decoded = np.frombuffer(base64.b64decode(e["embedding"]), dtype="<f4")
        assert decoded.tolist() == pytest.approx(d["embedding"], abs=1e-6)
    ids = [hf[1].encode(t, add_special_tokens=False) for t in texts]
    by_ids = embed(http, input=ids)["data"]
    for d, e in zip(batch, by_ids):
        assert e["embedding"] == pytest.approx(d["embedding"], abs=1e-6)
    (one,) = embed(http, input=ids[0], dimensions=576)["data"]  # the model's own size is accepted
    assert one["embedding"] == pytest.approx(batch[0]["embedding"], abs=1e-6)


@pytest.mark.parametrize("body, status, param", [
    ({"input": "hi", "dimensions": 64}, 400, "dimensions"),
    ({"input": []}, 400, "input"),
    ({"input": ""}, 400, "input"),
    ({"input": [[]]}, 400, "input"),
    ({"input": [10**9]}, 400, "input"),
    ({"input": [-1]}, 400, "input"),
    ({"input": "\ud800"}, 400, "input"),
    ({"input": 5}, 400, "input"),
    ({"input": [1, "a"]}, 400, "input"),
    ({"input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "hi", "model": "gpt-4"}, 404, "model"),
])
def test_bad_embedding_requests_get_openai_errors(http, body, status, param):
    # json.dumps escapes a lone surrogate as \\ud800, which httpx's own encoder refuses to send
    r = http.post("/v1/embeddings", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"].split(".")[0] == param and error["message"]  # a type error names its path: input.str


def test_no_kv_block_is_left_behind(http, server):
    embed(http, input=["one", "two", "three"] * 4)
    complete(http, prompt=["one", "two"], echo=True, logprobs=1, max_tokens=0)
    m = server.wait_idle()
    assert m["zili_kv_cache_free_blocks"] == m["zili_kv_cache_total_blocks"]
