"""The web console's files and route, without a browser (tests/e2e/test_web_ui.py drives it in Chromium)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from zili.extract import SYSTEM_PROMPT
from zili.server import launcher
from zili.server.app import ServerSettings, build_app
from zili.server.web_ui import WEB_DIR

REPO = Path(__file__).resolve().parents[2]
TABLES = {lang: json.loads((WEB_DIR / "i18n" / f"{lang}.json").read_text()) for lang in ("en", "zh-CN")}
# What a browser fetches before the page is usable: the page, its style, every module, the
# vendored libraries, the translation tables, the forms and the icon.
FIRST_PAINT = ["index.html", "style.css", "icon.svg", "i18n/en.json", "i18n/zh-CN.json",
               "vendor/marked.esm.js", "vendor/purify.min.js", *[p.name for p in WEB_DIR.glob("*.js")]]


class _PageParser(HTMLParser):
    """Collects bare text, inline scripts / styles / handlers, and the i18n keys of index.html."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.bare_text: list[str] = []
        self.inline: list[str] = []
        self.keys: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        for name, value in attrs:
            if name.startswith("data-i18n"):
                self.keys.add(value or "")
            if name.startswith("on") or name == "style":
                self.inline.append(f"<{tag} {name}=...>")
        if tag == "script" and "src" not in names:
            self.inline.append("<script> without src")
        if tag == "style":
            self.inline.append("<style>")
        if tag not in ("meta", "link", "input", "br", "img"):
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.stack:
            while self.stack.pop() != tag:
                pass

    def handle_data(self, data: str) -> None:
        if data.strip():
            self.bare_text.append(f"{'/'.join(self.stack)}: {data.strip()!r}")


def _page() -> _PageParser:
    parser = _PageParser()
    parser.feed((WEB_DIR / "index.html").read_text())
    return parser


def test_page_has_no_text_outside_the_tables_and_no_inline_code():
    page = _page()
    # The one bare text is the <title> a plain fetch sees before i18n.js runs: the English table's title.
    assert page.bare_text == [f"html/head/title: {TABLES['en']['app.title']!r}"]
    assert page.inline == []
    assert page.keys <= set(TABLES["en"]), page.keys - set(TABLES["en"])


def test_translation_tables_cover_every_key_the_code_uses():
    assert set(TABLES["en"]) == set(TABLES["zh-CN"])
    for key, text in TABLES["en"].items():  # the same {placeholders} in both languages
        assert set(re.findall(r"\{(\w+)\}", text)) == set(re.findall(r"\{(\w+)\}", TABLES["zh-CN"][key])), key
    used = set()
    for script in WEB_DIR.glob("*.js"):
        source = script.read_text()
        used |= set(re.findall(r"\bt\(\"([\w.-]+)\"", source))
        used |= set(re.findall(r"\"((?:error|key|chat|extract|usage|role|common|field)\.[\w-]+)\"", source))
    assert used, "no t(...) calls found: the pattern is out of date"
    assert used <= set(TABLES["en"]), used - set(TABLES["en"])
    assert all(not re.search(r"[A-Za-z]{4,}", TABLES["zh-CN"][k]) for k in ("tab.chat", "chat.send", "chat.stop"))


def test_built_in_forms_are_the_examples():
    for form_id, example in [("invoice", "invoice"), ("financial-report", "financial-report")]:
        shipped = json.loads((WEB_DIR / "forms" / f"{form_id}.json").read_text())
        assert shipped == json.loads((REPO / "examples" / example / "form.json").read_text())


def test_vendored_libraries_match_the_pinned_versions_and_keep_their_licences():
    lock = json.loads((REPO / "webui" / "package-lock.json").read_text())["packages"]
    package = json.loads((REPO / "webui" / "package.json").read_text())["dependencies"]
    versions = dict(line.split()[:2] for line in (WEB_DIR / "vendor" / "VERSIONS").read_text().splitlines())
    for name in ("marked", "dompurify"):
        assert package[name] == lock[f"node_modules/{name}"]["version"] == versions[name]
    assert f"marked v{versions['marked']}" in (WEB_DIR / "vendor" / "marked.esm.js").read_text()[:200]
    assert f"DOMPurify {versions['dompurify']}" in (WEB_DIR / "vendor" / "purify.min.js").read_text()[:200]
    assert "Permission is hereby granted, free of charge" in (WEB_DIR / "vendor" / "LICENSE.marked.md").read_text()
    assert "Apache License" in (WEB_DIR / "vendor" / "LICENSE.dompurify.txt").read_text()


def test_first_paint_assets_under_200_kb():
    total = sum((WEB_DIR / name).stat().st_size for name in set(FIRST_PAINT))
    total += len(json.dumps(json.loads(json.dumps({"forms": [json.loads(p.read_text())
                                                            for p in (WEB_DIR / "forms").glob("*.json")]}))))
    assert total < 200 * 1024, total


def _client(web_ui: bool = True) -> TestClient:
    engine = SimpleNamespace(ready=False, dead_error=None, stats=lambda: None)
    return TestClient(build_app(ServerSettings(served_model_name="m", api_keys=["secret"], web_ui=web_ui), engine))


def _csp(response) -> dict[str, str]:
    return {d.split()[0]: d.partition(" ")[2] for d in response.headers["content-security-policy"].split("; ")}


def test_page_and_assets_carry_a_strict_content_security_policy():
    client = _client()
    for path, media in [("/", "text/html"), ("/ui/app.js", "javascript"), ("/ui/style.css", "text/css"),
                        ("/ui/i18n/zh-CN.json", "application/json"), ("/ui/extract.json", "application/json")]:
        response = client.get(path)
        assert response.status_code == 200, path
        assert media in response.headers["content-type"], path
        csp = _csp(response)
        assert csp["default-src"] == csp["script-src"] == csp["style-src"] == csp["connect-src"] == "'self'"
        assert csp["object-src"] == csp["base-uri"] == "'none'" and csp["frame-ancestors"] == "'none'"
        assert "unsafe" not in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"
    assert client.head("/").status_code == 200
    # The page is open (it asks for the key itself); the API behind it is not.
    assert client.get("/v1/models").status_code == 401


def test_assets_stay_inside_the_web_folder():
    client = _client()
    for path in ["/ui/../web_ui.py", "/ui/%2e%2e/web_ui.py", "/ui/..%2fapp.py", "/ui/missing.js"]:
        response = client.get(path)
        assert response.status_code == 404, path
        assert "mount_web_ui" not in response.text


def test_extraction_config_serves_the_forms_and_the_cli_prompt():
    body = _client().get("/ui/extract.json").json()
    assert body["system_prompt"] == SYSTEM_PROMPT
    assert {f["id"] for f in body["forms"]} == {"invoice", "financial-report"}


def test_web_ui_is_not_in_the_openapi_schema():
    paths = _client().get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/ui") for p in paths)


def test_no_web_ui_flag_leaves_the_page_out(monkeypatch: pytest.MonkeyPatch):
    apps = []
    # Stop at the point the server would start: the app is built, the model is not loaded.
    monkeypatch.setattr(launcher._DrainingServer, "run", lambda self, *a, **k: apps.append(self.config.app))
    for flags, status in [(["--no-web-ui"], 404), ([], 200)]:
        result = CliRunner().invoke(_serve_cli(), ["smollm2-135m", "--port", "1", *flags])
        assert result.exit_code == 0, result.output
        response = TestClient(apps[-1]).get("/")
        assert response.status_code == status
    assert TestClient(apps[-2]).get("/").json()["error"]["type"] == "not_found_error"


def _serve_cli() -> typer.Typer:
    cli = typer.Typer()
    cli.command()(launcher.serve)
    return cli
