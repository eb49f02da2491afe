"""The web console in headless Chromium against a real `zili serve` (and, for what a model cannot be
made to say on demand, a fake /v1 endpoint behind the same page and route).

Screenshots of the chat and extract views go to webui/screenshots/ (git-ignored).
"""

from __future__ import annotations

import csv
import io
import json
import re
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import jsonschema
import pytest
from selenium.webdriver.support.ui import Select

from tests.e2e.browser import REPO, Browser, FakeOpenAIServer
from tests.e2e.server_process import API_KEY, MODEL, ServerProcess
from zili.server.web_ui import WEB_DIR

# One sequence at a time and one waiting: a third request is a deterministic 429. The admin key
# turns on the governance ledger (zili.governance) that the usage view reads. Eager steps and torch's
# own kernels (ZILI_CPU_KERNELS=0): these tests are about the page, not the compiled step or the C++
# kernels (built on first use, minutes on two busy cores, and tested on their own).
WEB_ARGS = ["--enforce-eager", "--max-num-seqs", "1", "--max-queue", "1", "--max-tokens-cap", "1024"]
ADMIN_KEY = "sk-zili-admin-test"
EN = json.loads((WEB_DIR / "i18n" / "en.json").read_text())
ZH = json.loads((WEB_DIR / "i18n" / "zh-CN.json").read_text())
REPORT = REPO / "examples" / "financial-report"
# A generation on a shared, busy 2-core machine can take minutes, so its wait is bounded by progress:
# it fails once neither the page nor the server's token counters moved for STALL_TIMEOUT seconds (a
# hang), or after GENERATION_TIMEOUT seconds in all.
GENERATION_TIMEOUT = 600
STALL_TIMEOUT = 120
POLL = 0.25  # seconds between looks at a running generation
XSS_FLAGS = "return [window.__xss1, window.__xss2, window.__xss3, window.__xss4, window.__xss5]"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    database = tmp_path_factory.mktemp("webui-ledger") / "zili.db"
    log = tmp_path_factory.mktemp("webui") / "server.log"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ZILI_CPU_KERNELS", "0")
        srv = ServerProcess([*WEB_ARGS, "--admin-key", ADMIN_KEY, "--database-url", f"sqlite:///{database}"], log)
    try:
        srv.wait_healthy(timeout=GENERATION_TIMEOUT)  # loading takes minutes on a shared, busy machine
    except BaseException:
        srv.stop()
        raise
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(server: ServerProcess) -> Iterator[Browser]:
    """An English console with the API key entered (through the dialog a 401 opens)."""
    browser = Browser("en-US")
    try:
        browser.open(server.url)
        _enter_key(browser, API_KEY)
        yield browser
    finally:
        browser.quit()


@pytest.fixture
def console(page: Browser, server: ServerProcess) -> Browser:
    """The module's console, freshly loaded from the server for each test.

    A reload drops what an earlier test left in the page (an opened batch, results, a generation
    still streaming: closing its connection aborts it on the server), a new chat keeps earlier turns
    out of the prompt, and the server is idle again before the test starts: one slow or failed test
    cannot make the next one fail.
    """
    page.js("window.__stale = true")
    page.driver.get(server.url + "/")
    page.wait(lambda d: page.js("return window.__stale === undefined && document.body.dataset.ready === 'true'"), 60)
    if page.js("return document.getElementById('key-dialog').open"):
        _enter_key(page, API_KEY)  # an earlier test left the session without a key
    _models_loaded(page)
    page.find("#new-chat").click()  # no earlier test's turns in this test's prompts
    idle = server.wait_idle(timeout=60)
    assert idle["zili_num_requests_running"] == 0 and idle["zili_num_requests_waiting"] == 0, idle
    return page


def _enter_key(browser: Browser, key: str) -> None:
    browser.wait(lambda d: browser.js("return document.getElementById('key-dialog').open"), 60)
    browser.find("#key-input").send_keys(key)
    browser.find("#key-save").click()


def _models_loaded(browser: Browser) -> None:
    browser.wait(lambda d: browser.js("return document.getElementById('model-select').options.length") > 0, 60)


def _set(browser: Browser, css: str, value: str) -> None:
    element = browser.find(css)
    browser.js("arguments[0].closest('details')?.setAttribute('open', '')", element)
    element.clear()
    element.send_keys(value)
    browser.js("arguments[0].dispatchEvent(new Event('change'))", element)


def _last_meta(browser: Browser) -> str:
    return browser.text("#messages .message:last-child .meta") or ""


def _send(browser: Browser, text: str) -> None:
    browser.js("document.getElementById('tab-chat').click()")
    browser.find("#prompt").send_keys(text)
    browser.find("#send").click()


def _answer_done(browser: Browser) -> bool:
    return browser.js("return document.getElementById('send').hidden") is False and bool(_last_meta(browser))


def _wait_answer_done(browser: Browser, timeout: float = 30) -> str:
    """For answers that come at once (errors, a stop, a fake server)."""
    browser.wait(lambda d: _answer_done(browser), timeout)
    return _last_meta(browser)


def _wait_generation(browser: Browser, server: ServerProcess, done: Callable[[], object], shown: Callable[[], object],
                     what: str) -> None:
    """Waits for `done()` while the real model works; fails fast when nothing moves (see STALL_TIMEOUT).

    Progress is what the page shows (`shown()`) or the server's token counters, which also move
    while the page has nothing to show yet (a queued request, a long prefill).
    """
    start = moved = time.monotonic()
    last = None
    while not done():
        now = time.monotonic()
        metrics = server.metrics()
        state = (shown(), metrics["zili_prompt_tokens_total"], metrics["zili_generation_tokens_total"])
        if state != last:
            last, moved = state, now
        if now - moved > STALL_TIMEOUT or now - start > GENERATION_TIMEOUT:
            pytest.fail(f"{what}: nothing moved for {now - moved:.0f} s ({now - start:.0f} s in all); the page "
                        f"shows {state[0]!r}; server: {metrics}\n{server.log_tail()}")
        time.sleep(POLL)


def _wait_answer(browser: Browser, server: ServerProcess) -> str:
    """The meta line of a chat answer from the real model, once it is complete."""
    _wait_generation(browser, server, lambda: _answer_done(browser),
                     lambda: browser.text("#messages .message:last-child .content"), "a chat answer")
    return _last_meta(browser)


def _record_renders(browser: Browser) -> None:
    """Keeps every text the last answer shows while it streams (a MutationObserver in the page)."""
    browser.js("""
        window.__renders = [];
        new MutationObserver(() => {
          const c = document.querySelector('#messages .message:last-child .content');
          if (c) window.__renders.push(c.textContent);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    """)


def test_401_asks_for_a_key_and_keeps_it_in_the_session_only(console: Browser):
    browser = console
    browser.js("sessionStorage.clear()")
    browser.driver.refresh()
    browser.wait(lambda d: browser.js("return document.getElementById('key-dialog').open"), 60)
    assert browser.text("#key-reason") == EN["key.reasonNeeded"]
    browser.find("#key-input").send_keys("sk-wrong")
    browser.find("#key-save").click()
    browser.wait(lambda d: browser.text("#key-reason") == EN["key.reasonRefused"], 30)
    browser.find("#key-cancel").click()
    browser.wait(lambda d: browser.text("#notice-text") == EN["error.keyRefused"], 30)
    assert browser.js("return document.getElementById('model-select').options.length") == 0
    # With no key at all, a chat turn's 401 becomes a message in the conversation.
    browser.js("sessionStorage.clear()")
    _send(browser, "Hello")
    browser.wait(lambda d: browser.js("return document.getElementById('key-dialog').open"), 30)
    browser.find("#key-cancel").click()
    assert _wait_answer_done(browser) == EN["error.keyNeeded"]
    browser.find("#key-button").click()
    _enter_key(browser, API_KEY)
    _models_loaded(browser)
    assert browser.js("return document.getElementById('model-select').value") == MODEL
    assert browser.js("return sessionStorage.getItem('zili.apiKey')") == API_KEY
    stored = browser.js("return JSON.stringify(Object.assign({}, localStorage))")
    assert API_KEY not in stored


def test_chat_turn_streams_into_the_page(console: Browser, server: ServerProcess):
    page = console
    _set(page, "#max-tokens", "16")
    _set(page, "#temperature", "0")
    _record_renders(page)
    _send(page, "Write three sentences about the sea.")
    meta = _wait_answer(page, server)
    answer = page.text("#messages .message:last-child .content").strip()
    renders = [r.strip() for r in page.js("return window.__renders") if r.strip()]
    assert answer, meta
    # The answer grew in the page piece by piece before it was complete.
    partial = {r for r in renders if r != answer and answer.startswith(r)}
    assert len(partial) >= 2, renders
    match = re.fullmatch(r"(\d+) tokens \(prompt (\d+)\) · ([\d.]+) tokens/s · first token after ([\d.]+) s.*", meta)
    assert match, meta
    assert 1 <= int(match[1]) <= 16 and int(match[2]) > 5 and float(match[3]) > 0
    history = json.loads(page.js("return localStorage.getItem('zili.chats')"))
    [chat] = [c for c in history if c["id"] == page.js("return localStorage.getItem('zili.currentChat')")]
    assert chat["messages"][-2]["content"] == "Write three sentences about the sea."
    assert chat["messages"][-1]["content"].strip().startswith(answer.split()[0])
    page.screenshot("chat")


def test_stop_aborts_the_request_and_frees_every_kv_block(console: Browser, server: ServerProcess):
    page = console
    _set(page, "#max-tokens", "1000")
    _set(page, "#temperature", "0.7")
    finished_before = _finished(server)
    generated_before = server.metrics()["zili_generation_tokens_total"]
    _send(page, "Write a very long story about a dragon who learns to cook, with many chapters.")
    content = "#messages .message:last-child .content"
    _wait_generation(page, server, lambda: (page.text(content) or "").strip(), lambda: page.text(content),
                     "the first words of a long answer")
    busy = server.metrics()
    assert busy["zili_num_requests_running"] == 1
    assert busy["zili_kv_cache_free_blocks"] < busy["zili_kv_cache_total_blocks"]
    page.find("#stop").click()
    assert _wait_answer_done(page) == EN["chat.stopped"]
    idle = server.wait_idle(timeout=30)
    assert idle["zili_num_requests_running"] == 0 and idle["zili_num_requests_waiting"] == 0
    assert idle["zili_kv_cache_free_blocks"] == idle["zili_kv_cache_total_blocks"]
    assert _finished(server) == finished_before  # it was aborted, not finished
    assert idle["zili_generation_tokens_total"] - generated_before < 1000


def _finished(server: ServerProcess) -> float:
    return sum(v for k, v in server.metrics().items() if k.startswith("zili_request_success_total"))


class _HeldBusy:
    """Long streaming requests that hold the server's one running slot, then its one queue place."""

    def __init__(self, server: ServerProcess) -> None:
        self.server, self.stop = server, threading.Event()
        self.threads: list[threading.Thread] = []

    def add(self, running: int, waiting: int) -> None:
        """One more request; returns once the server shows `running` running and `waiting` waiting."""
        thread = threading.Thread(target=self._hold, daemon=True)
        thread.start()
        self.threads.append(thread)
        deadline = time.monotonic() + 300
        while True:
            m = self.server.metrics()
            if m["zili_num_requests_running"] == running and m["zili_num_requests_waiting"] == waiting:
                return
            assert time.monotonic() < deadline, m
            time.sleep(0.05)

    def _hold(self) -> None:
        body = {"model": MODEL, "prompt": "Count forever:", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=self.server.url, headers=self.server.headers, timeout=600) as client:
            with client.stream("POST", "/v1/completions", json=body) as response:
                for _ in response.iter_lines():
                    if self.stop.is_set():
                        return

    def release(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def test_429_and_400_are_shown_as_messages(console: Browser, server: ServerProcess):
    page = console
    _set(page, "#max-tokens", "16")
    _set(page, "#temperature", "0")
    held = _HeldBusy(server)
    try:
        held.add(running=1, waiting=0)
        held.add(running=1, waiting=1)
        _send(page, "Hello again")
        meta = _wait_answer_done(page, 60)
    finally:
        held.release()
    assert meta.startswith("The server is busy right now. Try again in 1 s."), meta
    server.wait_idle(timeout=60)
    _set(page, "#temperature", "-1")
    _send(page, "Hello")
    meta = _wait_answer_done(page, 60)
    _set(page, "#temperature", "0")
    assert meta.startswith('The server refused the setting "Temperature":'), meta
    assert "temperature" in meta.split(":", 1)[1]


def _extract_view(browser: Browser, form: str) -> None:
    browser.find("#tab-extract").click()
    Select(browser.find("#form-select")).select_by_value(form)


def _run_extraction(browser: Browser, server: ServerProcess, count: int) -> list[dict]:
    """Runs the extract view and returns its `count` result cards (name, JSON text, error, table headers)."""
    browser.find("#extract-run").click()
    done = "return document.getElementById('extract-run').hidden === false"
    _wait_generation(browser, server, lambda: browser.js(done),
                     lambda: (browser.text("#extract-status"), len(browser.finds("#extract-results .result"))),
                     f"an extraction of {count} document(s)")
    assert len(browser.finds("#extract-results .result")) == count, browser.text("#extract-status")
    return browser.js("""return [...document.querySelectorAll('#extract-results .result')].map(r => ({
        name: r.querySelector('h3').textContent, json: r.querySelector('.result-json')?.textContent ?? null,
        error: r.querySelector('.error')?.textContent ?? null,
        headers: [...r.querySelectorAll('.result-table th')].map(th => th.textContent)}))""")


def test_extraction_of_an_example_report_validates_against_its_form(console: Browser, server: ServerProcess):
    """A built-in form and a document of examples/; the financial report's filled form is about half
    as many tokens as an invoice's (the longest generation of this module)."""
    page = console
    form = json.loads((REPORT / "form.json").read_text())
    _extract_view(page, "financial-report")
    page.find("#document-files").send_keys(str(REPORT / "report-nordlicht.txt"))
    page.wait(lambda d: "NORDLICHT" in page.js("return document.getElementById('document-input').value").upper(), 10)
    [result] = _run_extraction(page, server, 1)
    assert result["error"] is None, result
    assert result["name"] == "report-nordlicht.txt"
    value = json.loads(result["json"])
    jsonschema.validate(value, form)
    assert set(form["required"]) <= set(result["headers"])
    assert page.text("#extract-status") == EN["extract.done"].format(count=1)
    page.screenshot("extract")


# A small pasted form keeps the batch quick: the batch test is about files in and one file out.
SMALL_FORM = {"type": "object", "required": ["company", "currency"], "properties": {
    "company": {"type": "string", "maxLength": 40}, "currency": {"enum": ["USD", "EUR", "GBP", "other"]}}}


def test_batch_extraction_downloads_json_lines_and_csv(console: Browser, server: ServerProcess):
    page = console
    _extract_view(page, "custom")
    _set(page, "#schema-input", json.dumps(SMALL_FORM))
    docs = [REPORT / "report-orbital.txt", REPORT / "report-nordlicht.txt"]
    page.find("#document-files").send_keys("\n".join(str(p) for p in docs))
    page.wait(lambda d: len(page.finds("#batch-list li")) == 2, 10)
    results = _run_extraction(page, server, 2)
    assert [r["name"] for r in results] == [p.name for p in docs]
    page.find("#download-jsonl").click()
    lines = [json.loads(line) for line in page.wait_download("forms.jsonl").read_text().splitlines()]
    assert [line["document"] for line in lines] == [p.name for p in docs]
    for line, result in zip(lines, results):
        jsonschema.validate(line["form"], SMALL_FORM)
        assert line["form"] == json.loads(result["json"])
    page.find("#download-csv").click()
    rows = list(csv.DictReader(io.StringIO(page.wait_download("forms.csv").read_text())))
    assert [row["document"] for row in rows] == [p.name for p in docs]
    assert [(row["company"], row["currency"]) for row in rows] == \
        [(line["form"]["company"], line["form"]["currency"]) for line in lines]


def test_markup_in_a_real_models_output_is_shown_as_text(console: Browser, server: ServerProcess):
    """The model is made to emit markup (a form whose fields are constants) and the page shows it inertly.

    The document is typed in after a batch of files was opened: the typed text replaces the batch
    (the page once kept the batch and filled the files' forms instead).
    """
    page = console
    markup = "<img src=x onerror=window.__xss1=1><a href=javascript:window.__xss3=1>x</a>"
    hostile = {"type": "object", "required": ["html"], "properties": {"html": {"const": markup}}}
    _extract_view(page, "custom")
    _set(page, "#schema-input", json.dumps(hostile))
    page.find("#document-files").send_keys(f"{REPORT / 'report-orbital.txt'}\n{REPORT / 'report-nordlicht.txt'}")
    page.wait(lambda d: len(page.finds("#batch-list li")) == 2, 10)
    _set(page, "#document-input", "A.")
    assert page.finds("#batch-list li") == []
    [result] = _run_extraction(page, server, 1)
    assert result["name"] == EN["extract.pastedName"]
    assert json.loads(result["json"]) == {"html": markup}
    assert markup in page.text("#extract-results .result-table td")
    assert page.js("return document.querySelectorAll('#extract-results img, #extract-results script, "
                   "#extract-results a').length") == 0
    assert page.js(XSS_FLAGS) == [None] * 5


def test_markdown_answers_are_sanitised_and_reasoning_is_collapsed(page: Browser):
    """Hostile markdown and HTML in an answer (from a fake endpoint: a real model cannot be made to say it).

    The module's browser goes to the fake server's origin (the next test's `console` brings it back).
    """
    fake = FakeOpenAIServer()
    hostile = ("Here is **bold** and `code`.\n\n```python\nprint('hi')\n```\n\n"
               "<img src=x onerror=\"window.__xss1=1\">\n\n"
               "[click me](javascript:window.__xss2=1)\n\n"
               "<a href=\"javascript:window.__xss3=1\">raw link</a>\n\n"
               "<script>window.__xss4=1</script><svg onload=\"window.__xss5=1\"></svg>"
               "<iframe src=\"javascript:window.__xss5=1\"></iframe>\n\n"
               "![remote](https://example.com/tracker.png)\n")
    fake.replies.append(("First I consider the question. Then I answer.", hostile))
    browser = page
    browser.collect_logs()  # only this page's requests are looked at below
    browser.requests.clear()
    try:
        browser.open(fake.url)
        _models_loaded(browser)
        _send(browser, "Say something dangerous")
        meta = _wait_answer_done(browser)
        assert meta.startswith("42 tokens (prompt 11) · ")
        content = "#messages .message:last-child .content"
        assert browser.text(f"{content} strong") == "bold"
        assert browser.text(f"{content} pre code") == "print('hi')\n"
        links = browser.js(f"return [...document.querySelectorAll('{content} a')]"
                           ".map(a => [a.textContent, a.getAttribute('href')])")
        assert links == [["click me", None], ["raw link", None]]
        dangerous = browser.js("return document.querySelectorAll('#messages img, #messages script, #messages svg, "
                               "#messages iframe, #messages [onerror], #messages [onload]').length")
        assert dangerous == 0
        for link in browser.finds(f"{content} a"):
            link.click()
        time.sleep(0.5)
        assert browser.js(XSS_FLAGS) == [None] * 5
        assert browser.driver.current_url.startswith(fake.url)
        reasoning = browser.find("#messages .message:last-child details.reasoning")
        assert reasoning.is_displayed() and reasoning.get_attribute("open") is None
        assert browser.text("#messages .message:last-child .reasoning summary") == EN["chat.reasoning"]
        assert browser.text("#messages .message:last-child .reasoning-text") == \
            "First I consider the question. Then I answer."
        # The request the page sent: the whole history, streaming with usage.
        body = fake.bodies[-1]
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["messages"][-1] == {"role": "user", "content": "Say something dangerous"}
        browser.collect_logs()
        origin = fake.url
        outside = [u for u in browser.requests if re.match(r"(https?|wss?)://", u) and not u.startswith(origin)]
        assert outside == []
        assert any(u.endswith("/ui/vendor/purify.min.js") for u in browser.requests)
        sizes = browser.js("""return performance.getEntriesByType('navigation')
            .concat(performance.getEntriesByType('resource'))
            .filter(e => !new URL(e.name).pathname.startsWith('/v1/'))
            .reduce((total, e) => total + e.encodedBodySize, 0)""")
        assert 50_000 < sizes < 200 * 1024
        # This fake server keeps no ledger: the usage view says so.
        browser.find("#tab-usage").click()
        browser.find("#usage-load").click()
        browser.wait(lambda d: browser.text("#usage-status") == EN["usage.missing"], 30)
    finally:
        fake.stop()


def test_chinese_interface_renders(server: ServerProcess):
    browser = Browser("zh-CN")
    try:
        browser.open(server.url)
        browser.wait(lambda d: browser.js("return document.getElementById('key-dialog').open"), 60)
        assert browser.text("#key-reason") == ZH["key.reasonNeeded"]
        browser.find("#key-input").send_keys(API_KEY)
        browser.find("#key-save").click()
        _models_loaded(browser)
        assert browser.js("return document.documentElement.lang") == "zh-CN"
        assert browser.driver.title == ZH["app.title"]
        shown = browser.js("return Object.fromEntries([...document.querySelectorAll('[data-i18n]')]"
                           ".map(e => [e.dataset.i18n, e.textContent]))")
        assert shown and all(text == ZH[key] for key, text in shown.items())
        assert browser.find("#prompt").get_attribute("placeholder") == ZH["chat.placeholder"]
        browser.screenshot("chat-zh")
        # The switch: English, then back to Chinese; the choice is remembered.
        Select(browser.find("#lang-select")).select_by_value("en")
        assert browser.text("#tab-chat") == EN["tab.chat"] and browser.text("#send") == EN["chat.send"]
        Select(browser.find("#lang-select")).select_by_value("zh-CN")
        browser.driver.refresh()
        browser.wait(lambda d: browser.text("#tab-extract") == ZH["tab.extract"], 30)
    finally:
        browser.quit()


def _load_usage(browser: Browser, key: str, by: str) -> None:
    browser.find("#tab-usage").click()
    _set(browser, "#admin-key", key)
    Select(browser.find("#usage-by")).select_by_value(by)
    browser.js("document.getElementById('usage-status').textContent = ''")
    browser.find("#usage-load").click()
    browser.wait(lambda d: browser.text("#usage-status") != EN["usage.loading"], 30)


def test_usage_view_reads_the_ledger_with_the_admin_key(console: Browser, server: ServerProcess):
    page = console
    # One short request of this test's own, so the ledger has tokens whatever ran before.
    with server.http() as client:
        client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}).raise_for_status()
    _load_usage(page, "sk-not-the-admin-key", "day")
    assert page.text("#usage-status") == EN["usage.denied"]
    _load_usage(page, API_KEY, "day")  # a user's key is not an admin key
    assert page.text("#usage-status").startswith(EN["usage.forbidden"].split("{")[0])
    _load_usage(page, ADMIN_KEY, "day")
    assert page.text("#usage-status") == ""
    ledger = httpx.get(server.url + "/admin/v1/usage", params={"by": "day"},
                       headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]
    table = page.js("""const t = document.querySelector('#usage-table table');
        return {head: [...t.tHead.rows[0].cells].map(c => c.textContent),
                rows: [...t.tBodies[0].rows].map(r => [...r.cells].map(c => c.textContent))}""")
    assert table["head"] == list(ledger[0])
    columns = [table["head"].index(k) for k in ("day", "requests", "prompt_tokens", "completion_tokens")]
    assert [[r[c] for c in columns] for r in table["rows"]] == \
        [[str(row[k]) for k in ("day", "requests", "prompt_tokens", "completion_tokens")] for row in ledger]
    assert sum(row["requests"] for row in ledger) >= 1 and sum(row["completion_tokens"] for row in ledger) > 0
    _load_usage(page, ADMIN_KEY, "key")
    assert page.js("return document.querySelectorAll('#usage-table tbody tr').length") >= 1
    assert page.js("return sessionStorage.getItem('zili.adminKey')") == ADMIN_KEY
    assert ADMIN_KEY not in page.js("return JSON.stringify(Object.assign({}, localStorage))")
