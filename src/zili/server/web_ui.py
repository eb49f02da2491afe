"""The web console at `/`: a static page (chat, form extraction, usage) for people who do not use the API.

The page (src/zili/server/web/, shipped as package data) is plain HTML, CSS and ES modules with two
vendored libraries (marked, DOMPurify; rebuilt from pinned npm versions by webui/build.sh). It makes
no request outside this server: every response carries a Content-Security-Policy allowing only
this origin, no inline script or style, and no framing. `zili serve --no-web-ui` leaves it out.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

from zili.extract import SYSTEM_PROMPT

WEB_DIR = Path(__file__).with_name("web")
FORMS_DIR = WEB_DIR / "forms"

# 'self' only; no inline script or style (model output that slipped through the sanitiser still
# could not run); images only from this origin or data: URLs; nothing may frame the page.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "font-src 'self'",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",  # revalidate (ETag) so an upgraded server's page is picked up
}


class _WebAssets(StaticFiles):
    """StaticFiles with the console's security headers on every answer."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


@lru_cache(maxsize=1)
def extraction_config() -> dict[str, Any]:
    """What the extract view needs: the built-in forms (JSON schemas, by id) and `zili extract`'s system prompt."""
    forms = [{"id": path.stem, "schema": json.loads(path.read_text(encoding="utf-8"))}
             for path in sorted(FORMS_DIR.glob("*.json"))]
    return {"system_prompt": SYSTEM_PROMPT, "forms": forms}


def mount_web_ui(app: FastAPI) -> None:
    """Serve the console: `/` (the page), `/ui/extract.json` (forms) and `/ui/*` (its static files)."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    @app.get("/ui/extract.json", include_in_schema=False)
    async def forms() -> JSONResponse:
        return JSONResponse(extraction_config(), headers=SECURITY_HEADERS)

    app.mount("/ui", _WebAssets(directory=WEB_DIR), name="web-ui")
