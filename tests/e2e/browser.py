"""Headless Debian Chromium driven by Selenium (Debian's chromium-driver), for the web console's tests.

No browser is downloaded: `make test` installs the `chromium` and `chromium-driver` packages, and
Selenium is pointed at them (its own driver manager is never asked).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.e2e.server_process import free_port
from zili.server.web_ui import mount_web_ui

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "webui" / "screenshots"  # git-ignored (webui/.gitignore)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900"]


def require_chromium() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not found: `make test` installs Debian's chromium and "
                           "chromium-driver (or run: apt-get install -y chromium chromium-driver)")


class Browser:
    """One Chromium with a fresh profile; the console's language comes from `lang` (Accept-Language)."""

    def __init__(self, lang: str = "en-US") -> None:
        require_chromium()
        self.profile = Path(tempfile.mkdtemp(prefix="zili-chromium-"))
        self.downloads = self.profile / "downloads"
        self.downloads.mkdir()
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in [*CHROMIUM_ARGS, f"--user-data-dir={self.profile / 'profile'}", f"--lang={lang}"]:
            options.add_argument(arg)
        options.add_experimental_option("prefs", {"intl.accept_languages": lang,
                                                  "download.default_directory": str(self.downloads)})
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        self.driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
        self.driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                                    {"behavior": "allow", "downloadPath": str(self.downloads)})
        self.console: list[dict[str, Any]] = []
        self.requests: list[str] = []

    def open(self, url: str) -> None:
        self.driver.get(url)
        self.wait(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"), 30)

    def wait(self, condition: Callable[[Any], Any], timeout: float = 60.0, poll: float = 0.1) -> Any:
        # Each poll is a WebDriver round trip (CPU the server under test shares): no faster than needed.
        return WebDriverWait(self.driver, timeout, poll_frequency=poll).until(condition)

    def find(self, css: str):  # noqa: ANN201 (a selenium WebElement)
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def finds(self, css: str) -> list:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def text(self, css: str) -> str:
        return self.js("return document.querySelector(arguments[0])?.textContent ?? null", css)

    def collect_logs(self) -> None:
        """Drains the console and the network log into self.console / self.requests."""
        self.console += self.driver.get_log("browser")
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                self.requests.append(message["params"]["request"]["url"])

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def wait_download(self, name: str, timeout: float = 10.0) -> Path:
        path = self.downloads / name
        deadline = time.monotonic() + timeout
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return path

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


class FakeOpenAIServer:
    """The console's own routes (zili.server.web_ui) plus canned /v1 answers, on a thread.

    For what a real model cannot be made to say on demand: hostile markup in an answer, and
    reasoning_content deltas. `replies` is a list of (reasoning, content) answered in turn.
    """

    MODEL = "fake-model"

    def __init__(self) -> None:
        self.replies: list[tuple[str, str]] = []
        self.bodies: list[dict[str, Any]] = []
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> JSONResponse:
            return JSONResponse({"object": "list", "data": [{"id": self.MODEL, "object": "model"}]})

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> StreamingResponse:
            self.bodies.append(await request.json())
            reasoning, content = self.replies.pop(0)
            return StreamingResponse(self._stream(reasoning, content), media_type="text/event-stream")

        mount_web_ui(app)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _stream(self, reasoning: str, content: str):  # noqa: ANN202
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": self.MODEL}

        def event(delta: dict[str, Any], finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"

        yield event({"role": "assistant", "content": ""})
        for i in range(0, len(reasoning), 8):
            yield event({"reasoning_content": reasoning[i:i + 8]})
            await asyncio.sleep(0.005)
        for i in range(0, len(content), 8):
            yield event({"content": content[i:i + 8]})
            await asyncio.sleep(0.005)
        yield event({}, "stop")
        usage = {"prompt_tokens": 11, "completion_tokens": 42, "total_tokens": 53}
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
