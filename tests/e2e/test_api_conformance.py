"""API conformance (issue 21): request ids, tokenizer info, model cards, assistant prefill.

Each value is checked against an outside reference: the openai SDK's own `request_id`,
lm-evaluation-harness's RemoteTokenizer reading /tokenizer_info, transformers' chat templating of
the same GGUF (`continue_final_message=True`).
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.e2e.server_process import MODEL, ServerProcess
from zili.weights.resolve import ALIASES, alias_path


@pytest.fixture(scope="module")
def hf_tokenizer(hf_smollm2_tokenizer):
    assert alias_path(ALIASES[MODEL]) is not None  # the servers' model is the session's SmolLM2 GGUF
    return hf_smollm2_tokenizer


# ----- x-request-id (item 9) -----


def test_every_response_carries_a_request_id(server: ServerProcess, http: httpx.Client):
    seen = set()
    for method, path, body, headers in [
        ("GET", "/health", None, {}), ("GET", "/metrics", None, {}), ("GET", "/v1/models", None, {}),
        ("GET", "/no/such/path", None, {}), ("POST", "/v1/completions", {"prompt": "a", "max_tokens": 0}, {}),
        ("POST", "/v1/completions", {"prompt": "a", "max_tokens": 1}, {"Authorization": "Bearer wrong"}),
        ("POST", "/v1/chat/completions", {"messages": []}, {}),
    ]:
        r = http.request(method, path, json=body, headers=headers)
        rid = r.headers.get("x-request-id")
        assert rid and rid not in seen, (path, r.status_code, r.headers)
        seen.add(rid)
    r = httpx.post(server.url + "/v1/completions", content=b"x" * 300_000, headers=server.headers)
    assert r.status_code == 413 and r.headers.get("x-request-id")


def test_a_client_request_id_is_echoed_and_a_hostile_one_replaced(http: httpx.Client):
    r = http.get("/v1/models", headers={"X-Request-Id": "my-trace-0042"})
    assert r.headers["x-request-id"] == "my-trace-0042"
    for bad in ("a b", "x" * 200, "\x7f"):
        r = http.get("/v1/models", headers={"X-Request-Id": bad})
        assert r.headers["x-request-id"] != bad and r.headers["x-request-id"].startswith("req_")


def test_the_openai_sdk_exposes_the_request_id(client: openai.OpenAI):
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=1)
    assert reply._request_id and reply._request_id.startswith("req_")
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.request_id and err.value.request_id.startswith("req_")


# ----- /tokenizer_info and /v1/models (item 9) -----


def test_tokenizer_info_serves_lm_eval_remote_tokenizer(server: ServerProcess, hf_tokenizer):
    from lm_eval.utils import RemoteTokenizer  # lm-evaluation-harness's `tokenizer_backend=remote`

    remote = RemoteTokenizer(server.url + "/v1/completions", auth_token=server.api_key)
    assert remote.eos_token == hf_tokenizer.eos_token and remote.eos_token_id == hf_tokenizer.eos_token_id
    assert remote.bos_token == hf_tokenizer.bos_token and remote.bos_token_id == hf_tokenizer.bos_token_id
    text = "Héllo wörld, 你好 🙂"
    assert remote.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)
    chat = [{"role": "user", "content": "Hi"}]
    assert remote.apply_chat_template(chat, add_generation_prompt=True) == hf_tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)


def test_tokenizer_info_needs_the_api_key(server: ServerProcess):
    assert httpx.get(server.url + "/tokenizer_info").status_code == 401


def test_model_card_fields_clients_read(server: ServerProcess, client: openai.OpenAI):
    card = client.models.retrieve(MODEL)
    assert card.owned_by == "zili" and card.object == "model"
    assert abs(card.created - time.time()) < 24 * 3600  # a Unix time in seconds, not ms or 0
    assert card.model_extra["max_model_len"] == 2048  # the server's --max-model-len
    assert [m.model_extra["max_model_len"] for m in client.models.list().data] == [2048]


# ----- assistant prefill (item 8) -----

PREFILL = [{"role": "system", "content": "Answer briefly."},
           {"role": "user", "content": "List three fruits."},
           {"role": "assistant", "content": "Sure! 1. Apple 2."}]


def test_continue_final_message_renders_as_transformers_does(http: httpx.Client, hf_tokenizer):
    expected = hf_tokenizer.apply_chat_template(PREFILL, tokenize=True, add_generation_prompt=False,
                                                continue_final_message=True, return_dict=False)
    r = http.post("/tokenize", json={"messages": PREFILL, "add_generation_prompt": False,
                                     "continue_final_message": True})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == list(expected)


def test_continue_final_message_continues_the_assistant_text(http: httpx.Client, hf_tokenizer):
    expected = list(hf_tokenizer.apply_chat_template(PREFILL, tokenize=True, add_generation_prompt=False,
                                                     continue_final_message=True, return_dict=False))
    body = {"model": MODEL, "messages": PREFILL, "add_generation_prompt": False, "continue_final_message": True,
            "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["usage"]["prompt_tokens"] == len(expected)
    # The same prompt tokens through the legacy endpoint give the same greedy continuation.
    same = http.post("/v1/completions", json={"model": MODEL, "prompt": expected, "max_tokens": 6,
                                              "temperature": 0, "ignore_eos": True}).json()
    assert reply["choices"][0]["message"]["content"] == same["choices"][0]["text"]
    # Without prefill the model opens a new assistant turn: a different prompt.
    fresh = http.post("/v1/chat/completions", json={**body, "continue_final_message": False,
                                                    "add_generation_prompt": True}).json()
    assert fresh["usage"]["prompt_tokens"] != len(expected)


@pytest.mark.parametrize("messages,flags", [
    (PREFILL, {"continue_final_message": True}),  # add_generation_prompt defaults to true
    (PREFILL, {"continue_final_message": True, "add_generation_prompt": True}),
    (PREFILL[:2], {"continue_final_message": True, "add_generation_prompt": False}),
])
def test_continue_final_message_refusals(http: httpx.Client, messages, flags):
    for path in ("/v1/chat/completions", "/tokenize"):
        r = http.post(path, json={"messages": messages, "max_tokens": 2, **flags})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "continue_final_message"


# ----- token bytes in logprobs (item 2) -----

# SmolLM2's byte-level vocabulary spells these characters over several tokens each.
SPLIT_TEXT = "你好世界"
EOS = "<|im_end|>"  # the stop token: reported with its logprob, not part of the text


def test_chat_logprob_bytes_rebuild_the_text(http: httpx.Client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello in Chinese."}], "max_tokens": 20,
            "logprobs": True, "top_logprobs": 2, "structured_outputs": {"choice": [SPLIT_TEXT]}}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == SPLIT_TEXT
    tokens = [t for t in choice["logprobs"]["content"] if t["token"] != EOS]
    assert len(tokens) > len(SPLIT_TEXT)  # some tokens hold part of a character...
    assert b"".join(bytes(t["bytes"]) for t in tokens) == SPLIT_TEXT.encode()  # ...and their bytes rebuild it
    for t in tokens:
        for alt in t["top_logprobs"]:
            assert bytes(alt["bytes"]).decode("utf-8", errors="replace") == alt["token"], alt


def test_completion_text_offsets_do_not_drift(http: httpx.Client):
    body = {"model": MODEL, "prompt": "Greeting:", "max_tokens": 20, "logprobs": 1,
            "structured_outputs": {"choice": [SPLIT_TEXT + " ok"]}}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    text, offsets = choice["text"], choice["logprobs"]["text_offset"]
    kept = [i for i, t in enumerate(choice["logprobs"]["tokens"]) if t != EOS]
    tokens, offsets = [choice["logprobs"]["tokens"][i] for i in kept], [offsets[i] for i in kept]
    assert text == SPLIT_TEXT + " ok"
    assert offsets == sorted(offsets) and offsets[0] == 0
    # a token made of whole characters starts exactly where its text does (before, each partial
    # token counted as one character, "\ufffd", and every later offset drifted)
    whole = [(o, t) for o, t in zip(offsets, tokens) if "\ufffd" not in t]
    assert whole and all(text[o:].startswith(t) for o, t in whole), (offsets, tokens)
    assert text[whole[-1][0]:] == whole[-1][1]
