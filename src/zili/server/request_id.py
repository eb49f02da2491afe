"""`x-request-id` on every response: the client's own id echoed, or a new one.

OpenAI's API sends `x-request-id` with every answer and its SDKs expose it (`response._request_id`,
`APIError.request_id`) so a user can quote it in a bug report; vLLM echoes a client's
`X-Request-Id`. An id a client sends is echoed only when it is a short run of visible ASCII (so a
hostile header cannot inject anything into logs or responses); otherwise the server makes one.
"""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
_ACCEPTABLE = re.compile(rb"[!-~]{1,128}")  # visible ASCII, no spaces, at most 128 bytes


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


class RequestIdMiddleware:
    """ASGI middleware: sets `x-request-id` on the response (HTTP only); the id is also kept in
    `scope["state"]["request_id"]` for handlers that want to log it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == HEADER.encode()), None)
        request_id = given.decode("ascii") if given is not None and _ACCEPTABLE.fullmatch(given) else new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers[HEADER] = request_id
                warnings = scope["state"].get("zili_warnings")  # set by a handler (server.inputs)
                if warnings:
                    headers["zili-warnings"] = warnings
            await send(message)

        await self.app(scope, receive, send_with_id)
